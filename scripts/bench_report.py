"""bench.md, bench.png and the targets of `scripts/bench.py`, from its bench.json results.

Every section is optional (`bench.py --sections` runs some of them into an existing bench.json):
the report shows the sections the results hold, and notes the ones measured by a later run.
"""

from __future__ import annotations

from pathlib import Path

# Section 3 before the in-place KV cache: docs/bench's full run of 2026-11-21 (AMD EPYC, 2 threads), when
# the runtime's decode returned the whole cache (past and the new row concatenated, ping-pong between
# two copies). Comparable to a full-mode run on that machine only.
BEFORE = {
    "mode": "full", "date": "2026-11-21", "cache": "ping-pong whole-cache decode: past and present, two copies",
    "runtime_ms": {128: 52.73, 512: 65.35, 1024: 64.14, 2048: 101.04},
    "hf_ms": {128: 97.95, 512: 93.83, 1024: 99.40, 2048: 107.65},
    "copies": 2,
}
STEP_RATIO_TARGET = 1.3  # decode step at the longest cache / at the shortest
OLD_PREFILL = "Timed: prefill.onnx, the one prefill graph of the layout before the decoder segments (an earlier run)."


def before_applies(results: dict) -> bool:
    """The BEFORE figures compare with this run's decode section (same mode, so the same model)."""
    run = (results.get("runs") or {}).get("decode") or {}
    return run.get("mode", results["settings"]["name"]) == BEFORE["mode"]


def step_ratio(decode: dict, before: bool) -> tuple[int, int, float, float | None]:
    """(shortest, longest cache length, step(longest) / step(shortest), the same before or None)."""
    rows = sorted(decode["rows"], key=lambda x: x["cache_length"])
    low, high = rows[0]["cache_length"], rows[-1]["cache_length"]
    then = BEFORE["runtime_ms"]
    old = then[high] / then[low] if before and low in then and high in then else None
    return low, high, rows[-1]["runtime_ms"] / rows[0]["runtime_ms"], old


def targets(results: dict) -> list[dict]:
    """The issues' targets, PASS/FAIL on this run's figures (reported, never asserted), for the sections present."""
    out = []
    if "vision" in results:
        v = results["vision"]["rows"][-1]
        out.append({"target": f"vision speedup at ratio {v['ratio']:g} >= 80% of the FLOPs speedup", "passed": v["efficiency"] >= 0.8,
                    "measured": f"{v['speedup']:.2f}x measured vs {v['flops_speedup']:.2f}x FLOPs ({v['efficiency']:.0%})"})
    if "ficoco_ops" in results:
        ops = results["ficoco_ops"]
        out.append({"target": "FiCoCo operations <= 3% of the vision encoder's time", "passed": ops["share_of_encoder"] <= 0.03,
                    "measured": f"{ops['share_of_encoder']:.2%} ({ops['steps_ms']:.1f} of {ops['encoder']['ms']:.0f} ms)"})
    if "chat" in results:
        chat = results["chat"]["rows"]
        pairs = [(hf, rt) for rt in chat if rt["system"].startswith("runtime") for hf in chat
                 if hf["system"].startswith("Hugging") and hf["setting"] == rt["setting"]]
        decode = [(hf.get("decode_tokens_per_s", 0), rt.get("decode_tokens_per_s", 0), rt["setting"]) for hf, rt in pairs]
        out.append({"target": "runtime decode faster than Hugging Face eager", "passed": all(rt > hf for hf, rt, _ in decode),
                    "measured": "; ".join(f"{name}: {rt:.1f} vs {hf:.1f} tokens/s" for hf, rt, name in decode)})
    if "decode" in results and len(results["decode"]["rows"]) > 1:
        low, high, ratio, old = step_ratio(results["decode"], before_applies(results))
        then = f" (before: {old:.2f}x)" if old is not None else ""
        out.append({"target": f"decode step at the longest cache <= {STEP_RATIO_TARGET}x the step at the shortest",
                    "passed": ratio <= STEP_RATIO_TARGET, "measured": f"step({high}) / step({low}) = {ratio:.2f}x{then}"})
    return out


def table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""]


def widths(model: dict) -> str:
    v, t = model["vision"], model["text"]
    vision = v if isinstance(v, str) else f"CLIP {v['hidden_size']}/{v['intermediate_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads"
    return f"{vision}; Llama {t['hidden_size']}/{t['intermediate_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads, vocabulary {t['vocab_size']}"


def header(r: dict) -> list[str]:
    s, m = r["settings"], r["machine"]
    end = m.get("load_average_end", m["load_average_start"])
    took = f"; {r['duration_s'] / 60:.1f} min" if "duration_s" in r else ""
    return [f"# FiCoCo on CPU: latency vs FLOPs and vs Hugging Face ({s['name']} mode)", "",
            f"Mode **{s['name']}** ({s['note']}). {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}, transformers {m['transformers']}; {m['date']}; load average {m['load_average_start'][0]:.1f} "
            f"at the start, {end[0]:.1f} at the end{took}. Each time is the median of "
            f"{s['repeats']} runs after {s['warmup']} warm-up run(s). ONNX Runtime: CPU provider, ORT_ENABLE_ALL, "
            f"intra_op_num_threads={s['threads']}; torch threads {s['threads']}. Random weights (timing only).", ""]


def later_run(r: dict, key: str) -> list[str]:
    """A note under a section measured by a later `--sections` run than the header's."""
    run = (r.get("runs") or {}).get(key)
    if not run or run["date"] == r["machine"]["date"]:
        return []
    return [f"*Measured by a later run (`--sections`): {run['date']}, {run['mode']} mode, {run['repeats']} repeats after "
            f"{run['warmup']} warm-up, {run['threads']} threads, load average {run['load_average_start'][0]:.1f}; {run['cpu']}.*", ""]


def md_vision(v: dict) -> list[str]:
    out = ["## 1. Vision encoder (vision.onnx, FiCoCo-V)", "", f"Model: {widths(v['model'])}.", ""]
    return out + table(["ratio", "patches kept", "ms", "speedup", "GFLOPs", "FLOPs speedup", "measured / FLOPs"],
                       [[f"{x['ratio']:g}", x["kept_per_crop"], f"{x['ms']:.0f}", f"{x['speedup']:.2f}x", f"{x['gflops']:.0f}",
                         f"{x['flops_speedup']:.2f}x", f"{x['efficiency']:.0%}"] for x in v["rows"]])


def md_prefill(p: dict) -> list[str]:
    layout = ("decoder segments and FiCoCo-L reductions, chained as the runtime runs them" if "graphs" in (p["rows"] or [{}])[0]
              else "prefill.onnx")
    out = [f"## 2. LLM prefill ({layout})", "",
           f"Model: {widths(p['model'])}; {p['text_tokens']} text tokens. {p.get('how', OLD_PREFILL)}", ""]
    return out + table(["variant", "ratio", "visual tokens (after FiCoCo-L)", "graphs", "ms", "speedup", "TFLOPs", "FLOPs speedup",
                        "measured / FLOPs"],
                       [[x["variant"], f"{x['ratio']:g}", f"{x['visual_tokens']}" + (f" ({x['language'][-1][2]})" if x["language"] else ""),
                         " + ".join(x.get("graphs", ["prefill"])), f"{x['ms']:.0f}", f"{x['speedup']:.2f}x", f"{x['tflops']:.3f}",
                         f"{x['flops_speedup']:.2f}x", f"{x['efficiency']:.0%}"] for x in p["rows"]])


def md_decode(d: dict, before: bool) -> list[str]:
    out = ["## 3. Decode step vs cache length", "",
           f"The model of section 5; runtime: {d['decode_graph']}; Hugging Face: one forward over a DynamicCache of that length. "
           + (f"Before: the {BEFORE['date']} full run, with the {BEFORE['cache']}." if before else
              "Before figures: full mode only (they were measured on the full-mode model)."), ""]
    then = lambda kind, length: f"{BEFORE[kind][length]:.2f}" if before and length in BEFORE[kind] else "-"  # noqa: E731
    mb = "cache_bytes_before" in (d["rows"][0] if d["rows"] else {})
    out += table(["cache length", "runtime ms", "before ms", "Hugging Face eager ms", "HF before ms", "HF / runtime"]
                 + (["KV cache MB before (2 copies of L rows)"] if mb else []),
                 [[x["cache_length"], f"{x['runtime_ms']:.2f}", then("runtime_ms", x["cache_length"]), f"{x['hf_ms']:.2f}",
                   then("hf_ms", x["cache_length"]), f"{x['hf_ms'] / x['runtime_ms']:.2f}x"]
                  + ([f"{x['cache_bytes_before'] / 1e6:.1f}"] if mb else []) for x in d["rows"]])
    if len(d["rows"]) > 1:
        low, high, ratio, old = step_ratio(d, before)
        out += [f"Step at {high} / step at {low}: **{ratio:.2f}x**" + (f" (before: {old:.2f}x)" if old is not None else "")
                + f"; target <= {STEP_RATIO_TARGET}x.", ""]
    if "cache_bytes" in d:
        out += [f"KV cache memory: **{d['cache_bytes'] / 1e6:.1f} MB**, one copy: every layer's key and value buffer, allocated "
                f"once at its capacity (max_seq_len {d['max_seq_len']}), whatever the length. Before: {BEFORE['copies']} copies of the "
                f"cache at its length, {d['cache_bytes_before_at_max'] / 1e6:.1f} MB at a {d['max_seq_len']}-token sequence.", ""]
    return out


def md_ops(o: dict) -> list[str]:
    out = ["## 4. FiCoCo operations alone (PyTorch, CPU)", "",
           f"Every vision_step of the ratio-{o['ratio']:g} schedule on inputs of its shapes vs the CLIP layer holding the first "
           f"step (layer {o['layer']['layer']}, with its step) and the whole FiCoCo-V encoder.", ""]
    return out + table(["quantity", "ms", "share"],
                       [[f"{len(o['steps'])} vision_step calls", f"{o['steps_ms']:.2f}", f"{o['share_of_encoder']:.2%} of the encoder"],
                        [f"vision_step at layer {o['layer']['layer']}", f"{o['steps'][0]['ms']:.2f}", f"{o['share_of_layer']:.2%} of its layer"],
                        [f"CLIP layer {o['layer']['layer']}", f"{o['layer']['ms']:.1f}", ""], ["encoder", f"{o['encoder']['ms']:.0f}", "100%"]])


def md_chat(c: dict) -> list[str]:
    out = ["## 5. Hugging Face eager vs the runtime", "", f"Model: {widths(c['model'])}; {c['model']['visual_tokens']} visual tokens "
           f"in the FiCoCo build; {c['model']['new_tokens']} new tokens, greedy; instruction {c['model']['instruction']!r}.", ""]
    return out + table(["system", "setting", "time to first token ms", "decode tokens/s", "same tokens as HF"],
                       [[x["system"], x["setting"], f"{x['ttft_ms']:.0f}", f"{x.get('decode_tokens_per_s', float('nan')):.1f}",
                         "yes" if x["same_tokens_as_hf"] else "no"] for x in c["rows"]])


def markdown(r: dict) -> str:
    out = header(r)
    for key, render in (("vision", md_vision), ("prefill", md_prefill), ("decode", None), ("ficoco_ops", md_ops), ("chat", md_chat)):
        if key in r:
            out += later_run(r, key) + (md_decode(r[key], before_applies(r)) if key == "decode" else render(r[key]))
    if r.get("targets"):
        out += ["## Targets", ""] + table(["target", "measured", "result"],
                                          [[t["target"], t["measured"], "PASS" if t["passed"] else "FAIL"] for t in r["targets"]])
    return "\n".join(out)


def plot(r: dict, path: Path) -> bool:
    """bench.png (vision and prefill speedups vs FLOPs); False, and nothing written, without both sections."""
    if "vision" not in r or "prefill" not in r:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = r["vision"]["rows"]
    ratios = [x["ratio"] for x in rows]
    left.plot(ratios, [x["flops_speedup"] for x in rows], "s--", color="tab:gray", label="FLOPs reduction (full / reduced)")
    left.plot(ratios, [0.8 * x["flops_speedup"] for x in rows], ":", color="tab:red", label="target: 80% of FLOPs")
    left.plot(ratios, [x["speedup"] for x in rows], "o-", color="tab:blue", label="measured speedup (ONNX Runtime)")
    left.set(xlim=(1.05, max(0.0, min(ratios) - 0.1)), title="1. vision encoder (FiCoCo-V)", xlabel="ratio (visual tokens kept)", ylabel="x faster than ratio 1.0")
    for x in rows:
        above = x["speedup"] >= x["flops_speedup"]
        left.annotate(f"{x['speedup']:.2f}x", (x["ratio"], x["speedup"]), textcoords="offset points", xytext=(-4, 7 if above else -12),
                      ha="right", fontsize=8, color="tab:blue")
    for variant, color in (("v", "tab:blue"), ("l", "tab:green")):
        pts = [x for x in r["prefill"]["rows"] if x["variant"] in ("none", variant)]  # the unreduced point first
        right.plot([x["ratio"] for x in pts], [x["flops_speedup"] for x in pts], "s--", color=color, alpha=0.45, label=f"FiCoCo-{variant.upper()} FLOPs")
        right.plot([x["ratio"] for x in pts], [x["speedup"] for x in pts], "o-", color=color, label=f"FiCoCo-{variant.upper()} measured")
        for x in pts[1:]:
            right.annotate(f"{x['speedup']:.2f}x", (x["ratio"], x["speedup"]), textcoords="offset points", xytext=(8, 0), fontsize=8, va="center")
    right.set(xlim=left.get_xlim(), title="2. LLM prefill", xlabel="ratio (visual tokens kept)", ylabel="x faster than unreduced")
    for ax in (left, right):
        ax.axhline(1.0, color="black", lw=0.6)
        ax.margins(y=0.12)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle(f"FiCoCo on CPU ({r['settings']['name']} mode): {m['cpu']}, {r['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
