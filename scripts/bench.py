"""`python scripts/bench.py`: FiCoCo's latency on CPU (ONNX Runtime) against its FLOPs and against Hugging Face.

    python scripts/bench.py --out-dir docs/bench         # the full run (real widths; see MODES)
    python scripts/bench.py --quick --out-dir /tmp/bench  # under 5 minutes on 2 cores
    python scripts/bench.py --smoke --build BUILD_DIR     # seconds-scale settings (the tests)

Every figure comes from this one run: the median of --repeats timings after --warmup untimed runs,
set against the unreduced build of the same model (random weights; `scripts/bench_models.py`).

1. vision: vision.onnx (export.graphs) of a CLIP ViT-L/14-336-width LLaVA under FiCoCo-V at each
   ratio, timed round by round on ONNX Runtime; speedup over ratio 1.0 vs `ficoco.flops.vision_flops`.
2. prefill: prefill.onnx of a Vicuna-7B-width decoder cut to 6 layers (FiCoCo-L acts at layer 4),
   60 text tokens, unreduced / FiCoCo-V (k visual tokens) / FiCoCo-L; vs `ficoco.flops.prefill_flops`.
3. decode: one step at several cache lengths: `runtime.bench.decode_step_ms` on a `runtime.Pipeline`
   over an `export.build` build, and one Hugging Face forward over a DynamicCache of that length.
4. FiCoCo's own operations in PyTorch on CPU: every `ficoco.core.vision_step` of the schedule at the
   smallest ratio on inputs of its shapes (x [1, N, C], softmax-row attention [1, N, N], sorted grid
   positions) vs the CLIP layer holding the first step (`ficoco.patch.clip.reducing_layer`) and the
   FiCoCo-V encoder (`ficoco.patch.clip.encode`).
5. chat: time to first token and decode tokens/s, Hugging Face transformers (PyTorch eager mode, its
   default attention) vs the runtime on ONNX Runtime, same model, image, prompt and greedy tokens.

ONNX Runtime: CPU provider, ORT_ENABLE_ALL, intra_op_num_threads = --threads (default: the usable
cores); torch uses as many threads. Writes bench.md, bench.json (rewritten after each section),
bench.png and bench.log (the exporters' output) to --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/bench.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ficoco import flops as F
from scripts import bench_models as M

TEXT_BEFORE, TEXT_AFTER = 5, 55  # the prefill's ~60 text tokens (ficoco.flops.TEXT_TOKENS)
INSTRUCTION = "Describe the image."


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    note: str
    vision: dict  # CLIP widths (sections 1, 4)
    ratios: tuple[float, ...]  # FiCoCo-V ratios of section 1, 1.0 first
    text: dict  # decoder of section 2
    prefill_ratios: tuple[float, ...]
    chat: str  # bench_models.chat_model_dir kind (sections 3, 5)
    chat_ratio: float
    baseline_build: bool  # also build and run the unreduced chat model on the runtime
    lengths: tuple[int, ...]  # decode cache lengths
    new_tokens: int
    repeats: int
    warmup: int = 1


MODES = {
    "full": Mode("full", "real widths", M.CLIP_L_336, (1.0, 0.5, 0.33, 0.22, 0.11), {**M.VICUNA_7B, "num_hidden_layers": 6},
                 (0.33, 0.11), "wide", 0.22, True, (128, 512, 1024, 2048), 32, 5),
    "quick": Mode("quick", "vision ratios 1.0 and 0.11 only; prefill decoder 1024 wide (not 4096); chat model tiny-llava-1.5; "
                  "3 repetitions", M.CLIP_L_336, (1.0, 0.11), M.QUICK_TEXT, (0.11,), "tiny", 0.22, True, (128, 512, 1024, 2048), 32, 3),
    "smoke": Mode("smoke", "tiny widths everywhere (CLIP 64 wide with 15 layers, decoder 128 wide with 5), 2 repetitions: "
                  "checks the script, not the speed", {**M.TINY_CLIP, "num_hidden_layers": 15}, (1.0, 0.11), M.SMOKE_TEXT,
                  (0.11,), "tiny", 0.22, False, (64, 256), 8, 2),
}


# --------------------------------------------------------------------------- 1. vision, 4. FiCoCo ops


def bench_vision(mode: Mode, args, work: Path, model, log) -> dict:
    from ficoco.patch.llava import geometry_of

    geometry, side = geometry_of(model), model.config.vision_config.image_size
    schedules, specs = {}, {}
    pixels = np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32)
    for ratio in mode.ratios:
        path = work / f"vision-r{ratio:g}" / "vision.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        with M.quiet(log):
            schedules[ratio] = M.export_vision(model, ratio, path)
        specs[ratio] = (path, {"pixel_values": pixels})
    times, together = M.time_graphs(specs, args.threads, args.repeats, args.warmup)
    vision = F.vision_of(model.config.vision_config.to_dict())
    full = F.vision_flops(vision, 1, geometry.patches, {}, geometry.feature_layer)
    rows = []
    for ratio in mode.ratios:
        steps = {layer: out for layer, _, out in schedules[ratio]["vision"]}
        flops = F.vision_flops(vision, 1, geometry.patches, steps, geometry.feature_layer)
        speedup = times[mode.ratios[0]]["ms"] / times[ratio]["ms"]
        rows.append({"ratio": ratio, **schedules[ratio], **times[ratio], "speedup": speedup, "gflops": flops / 1e9,
                     "flops_ratio": flops / full, "flops_speedup": full / flops, "efficiency": speedup * flops / full})
    return {"model": M.describe_model(model), "interleaved": together, "feature_layer": geometry.feature_layer,
            "patches": geometry.patches, "rows": rows}


def bench_ops(mode: Mode, args, model) -> dict:
    """FiCoCo-V's steps alone vs their CLIP layer and the encoder, in PyTorch (see module docstring)."""
    from ficoco.core import vision_step
    from ficoco.patch import clip

    ratio = min(mode.ratios)
    plan, _ = M.patched(model, "v", ratio)
    tower, params, hidden = model.model.vision_tower, plan.vision_params, model.config.vision_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    fns = {}
    for step in plan.vision:
        tokens = step.tokens_in + 1
        x = torch.randn(1, tokens, hidden, generator=generator)
        attn = torch.randn(1, tokens, tokens, generator=generator).mul(3).softmax(-1)
        positions = torch.randperm(plan.geometry.patches, generator=generator)[: step.tokens_in].sort().values[None]
        fns[step.layer] = partial(vision_step, x, attn, positions, step.r, params)
    first = plan.vision[0]
    h = torch.randn(1, first.tokens_in + 1, hidden, generator=generator)
    fns["layer"] = partial(clip.reducing_layer, tower.encoder.layers[first.layer], h,
                           torch.arange(first.tokens_in)[None], first.r, params)
    side = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, side, side, generator=generator)
    fns["encoder"] = partial(clip.encode, tower, pixels, plan.vision, plan.geometry.feature_layer, params)
    with torch.no_grad():
        times = M.measure(fns, args.repeats, args.warmup)
    steps_ms = sum(times[s.layer]["ms"] for s in plan.vision)
    return {
        "ratio": ratio, "how": "PyTorch CPU, median per call", "threads": torch.get_num_threads(),
        "steps": [{"layer": s.layer, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out, **times[s.layer]} for s in plan.vision],
        "steps_ms": steps_ms, "layer": {"layer": first.layer, **times["layer"]}, "encoder": times["encoder"],
        "share_of_layer": times[first.layer]["ms"] / times["layer"]["ms"], "share_of_encoder": steps_ms / times["encoder"]["ms"],
    }


# --------------------------------------------------------------------------- 2. prefill


def bench_prefill(mode: Mode, args, work: Path, log) -> dict:
    model = M.random_llava(M.TINY_CLIP, mode.text)
    settings = [("none", 1.0)] + [(v, r) for r in mode.prefill_ratios for v in ("v", "l")]
    info, specs = {}, {}
    for variant, ratio in settings:
        path = work / f"prefill-{variant}-r{ratio:g}" / "prefill.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        with M.quiet(log):
            info[variant, ratio] = M.export_prefill(model, "v" if variant == "none" else variant, ratio, path,
                                                    TEXT_BEFORE, TEXT_AFTER)
        before, features, after = M.prefill_inputs(model, info[variant, ratio]["visual_tokens"], TEXT_BEFORE, TEXT_AFTER)
        specs[variant, ratio] = (path, {"input_ids_before": before, "image_features": features, "input_ids_after": after})
    described, text = M.describe_model(model), F.text_of(model.config.text_config.to_dict())
    del model
    gc.collect()
    times, together = M.time_graphs(specs, args.threads, args.repeats, args.warmup)
    tokens, full_key = TEXT_BEFORE + TEXT_AFTER, settings[0]
    rows = []
    for key in settings:
        visual, language = info[key]["visual_tokens"], {layer: out for layer, _, out in info[key]["language"]}
        flops, full = F.prefill_flops(text, tokens, visual, language), F.prefill_flops(text, tokens, info[full_key]["visual_tokens"], {})
        speedup = times[full_key]["ms"] / times[key]["ms"]
        rows.append({"variant": key[0], "ratio": key[1], **info[key], **times[key], "speedup": speedup, "tflops": flops / 1e12,
                     "flops_ratio": flops / full, "flops_speedup": full / flops, "efficiency": speedup * flops / full})
    return {"model": {**described, "vision": "tiny CLIP (not timed: the prefill graph takes image features)"},
            "text_tokens": tokens, "interleaved": together, "rows": rows}


# --------------------------------------------------------------------------- 3. decode, 5. chat


def ficoco_config(manifest: dict):
    """The build's FiCoCoConfig and a label for it, from its manifest."""
    from ficoco import FiCoCoConfig

    fields = {f.name for f in dataclasses.fields(FiCoCoConfig)}
    config = FiCoCoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["ficoco"].items() if k in fields})
    amount = f"r={config.ratio:g}" if config.ratio is not None else f"{config.tokens} tokens"
    return config, f"FiCoCo-{config.variant.upper()} {amount}"


def bench_chat(mode: Mode, args, work: Path, log) -> tuple[dict, dict]:
    from ficoco import apply, remove
    from ficoco.presets import load
    from runtime import bench as runtime_bench
    from runtime.manifest import read

    from export.reload import source_dir

    builds, source = M.chat_builds(mode, args, work, log)
    manifests = {key: read(build) for key, build in builds.items()}
    config, label = ficoco_config(manifests["ficoco"])
    with M.quiet(log):
        model, processor = load(source or source_dir(manifests["ficoco"]))
    image, reps, warm, n = M.test_image(), args.repeats, args.warmup, mode.new_tokens
    hf = partial(M.hf_run, model, processor, image, INSTRUCTION, n)
    rows = [{"system": "Hugging Face eager (PyTorch)", "setting": "unreduced", **M.repeat_runs(hf, reps, warm)}]
    apply(model, config)
    rows.append({"system": "Hugging Face eager (PyTorch)", "setting": label, **M.repeat_runs(hf, reps, warm)})
    remove(model)
    # a build holds caches shorter than its max_seq_len: time only the lengths it admits
    lengths = [length for length in mode.lengths if length < manifests["ficoco"]["max_seq_len"]]
    decode = {}
    for key in [k for k in ("none", "ficoco") if k in builds]:
        with M.open_pipeline(builds[key], args.threads) as pipe:
            rows.append({"system": "runtime (ONNX Runtime)", "setting": "unreduced" if key == "none" else label,
                         **M.repeat_runs(partial(M.runtime_run, pipe, image, INSTRUCTION, n), reps, warm)})
            if key == "ficoco":
                decode["runtime"] = runtime_bench.decode_step_ms(pipe, lengths, repeats=max(reps, 5), warmup=warm)
    decode["hf"] = M.hf_decode_step_ms(model, lengths, max(reps, 5), warm)
    hf_tokens = {r["setting"]: r["token_ids"] for r in rows if r["system"].startswith("Hugging")}
    for row in rows:
        row["same_tokens_as_hf"] = row.pop("token_ids") == hf_tokens[row["setting"]]
    described = {"source": manifests["ficoco"]["source"]["model"], "kind": "given build" if args.build else mode.chat,
                 "builds": {k: str(v) for k, v in builds.items()}, "parity_passed": {k: m["parity"]["passed"] for k, m in manifests.items()},
                 "visual_tokens": manifests["ficoco"]["schedule"]["visual_tokens"], "new_tokens": n, "instruction": INSTRUCTION,
                 **M.describe_model(model)}
    steps = [{"cache_length": L, "runtime_ms": decode["runtime"][L], "hf_ms": decode["hf"][L]} for L in lengths]
    return ({"model": described, "rows": rows},
            {"build": str(builds["ficoco"]), "decode_graph": "the FiCoCo build's decode.onnx (FiCoCo-V leaves the decoder unchanged)",
             "rows": steps})


# --------------------------------------------------------------------------- report


def targets(results: dict) -> list[dict]:
    """The issue's targets, PASS/FAIL on this run's figures (reported, never asserted)."""
    v, ops, chat = results["vision"]["rows"][-1], results["ficoco_ops"], results["chat"]["rows"]
    pairs = [(hf, rt) for rt in chat if rt["system"].startswith("runtime") for hf in chat
             if hf["system"].startswith("Hugging") and hf["setting"] == rt["setting"]]
    decode = [(hf.get("decode_tokens_per_s", 0), rt.get("decode_tokens_per_s", 0), rt["setting"]) for hf, rt in pairs]
    return [
        {"target": f"vision speedup at ratio {v['ratio']:g} >= 80% of the FLOPs speedup", "passed": v["efficiency"] >= 0.8,
         "measured": f"{v['speedup']:.2f}x measured vs {v['flops_speedup']:.2f}x FLOPs ({v['efficiency']:.0%})"},
        {"target": "FiCoCo operations <= 3% of the vision encoder's time", "passed": ops["share_of_encoder"] <= 0.03,
         "measured": f"{ops['share_of_encoder']:.2%} ({ops['steps_ms']:.1f} of {ops['encoder']['ms']:.0f} ms)"},
        {"target": "runtime decode faster than Hugging Face eager", "passed": all(rt > hf for hf, rt, _ in decode),
         "measured": "; ".join(f"{name}: {rt:.1f} vs {hf:.1f} tokens/s" for hf, rt, name in decode)},
    ]


def table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""]


def widths(model: dict) -> str:
    v, t = model["vision"], model["text"]
    vision = v if isinstance(v, str) else f"CLIP {v['hidden_size']}/{v['intermediate_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads"
    return f"{vision}; Llama {t['hidden_size']}/{t['intermediate_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads, vocabulary {t['vocab_size']}"


def markdown(r: dict) -> str:
    s, m, v, p, o, c, d = (r[k] for k in ("settings", "machine", "vision", "prefill", "ficoco_ops", "chat", "decode"))
    out = [f"# FiCoCo on CPU: latency vs FLOPs and vs Hugging Face ({s['name']} mode)", "",
           f"Mode **{s['name']}** ({s['note']}). {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}, "
           f"onnxruntime {m['onnxruntime']}, transformers {m['transformers']}; {m['date']}; load average {m['load_average_start'][0]:.1f} "
           f"at the start, {m['load_average_end'][0]:.1f} at the end; {r['duration_s'] / 60:.1f} min. Each time is the median of "
           f"{s['repeats']} runs after {s['warmup']} warm-up run(s). ONNX Runtime: CPU provider, ORT_ENABLE_ALL, "
           f"intra_op_num_threads={s['threads']}; torch threads {s['threads']}. Random weights (timing only).", "",
           "## 1. Vision encoder (vision.onnx, FiCoCo-V)", "", f"Model: {widths(v['model'])}.", ""]
    out += table(["ratio", "patches kept", "ms", "speedup", "GFLOPs", "FLOPs speedup", "measured / FLOPs"],
                 [[f"{x['ratio']:g}", x["kept_per_crop"], f"{x['ms']:.0f}", f"{x['speedup']:.2f}x", f"{x['gflops']:.0f}",
                   f"{x['flops_speedup']:.2f}x", f"{x['efficiency']:.0%}"] for x in v["rows"]])
    out += ["## 2. LLM prefill (prefill.onnx)", "", f"Model: {widths(p['model'])}; {p['text_tokens']} text tokens.", ""]
    out += table(["variant", "ratio", "visual tokens (after FiCoCo-L)", "ms", "speedup", "TFLOPs", "FLOPs speedup", "measured / FLOPs"],
                 [[x["variant"], f"{x['ratio']:g}", f"{x['visual_tokens']}" + (f" ({x['language'][-1][2]})" if x["language"] else ""),
                   f"{x['ms']:.0f}", f"{x['speedup']:.2f}x", f"{x['tflops']:.3f}", f"{x['flops_speedup']:.2f}x",
                   f"{x['efficiency']:.0%}"] for x in p["rows"]])
    out += ["## 3. Decode step vs cache length", "", f"The model of section 5; runtime: {d['decode_graph']}; Hugging Face: one forward over a DynamicCache.", ""]
    out += table(["cache length", "runtime ms", "Hugging Face eager ms", "HF / runtime"],
                 [[x["cache_length"], f"{x['runtime_ms']:.2f}", f"{x['hf_ms']:.2f}", f"{x['hf_ms'] / x['runtime_ms']:.2f}x"] for x in d["rows"]])
    out += ["## 4. FiCoCo operations alone (PyTorch, CPU)", "",
            f"Every vision_step of the ratio-{o['ratio']:g} schedule on inputs of its shapes vs the CLIP layer holding the first "
            f"step (layer {o['layer']['layer']}, with its step) and the whole FiCoCo-V encoder.", ""]
    out += table(["quantity", "ms", "share"],
                 [[f"{len(o['steps'])} vision_step calls", f"{o['steps_ms']:.2f}", f"{o['share_of_encoder']:.2%} of the encoder"],
                  [f"vision_step at layer {o['layer']['layer']}", f"{o['steps'][0]['ms']:.2f}", f"{o['share_of_layer']:.2%} of its layer"],
                  [f"CLIP layer {o['layer']['layer']}", f"{o['layer']['ms']:.1f}", ""], ["encoder", f"{o['encoder']['ms']:.0f}", "100%"]])
    out += ["## 5. Hugging Face eager vs the runtime", "", f"Model: {widths(c['model'])}; {c['model']['visual_tokens']} visual tokens "
            f"in the FiCoCo build; {c['model']['new_tokens']} new tokens, greedy; instruction {c['model']['instruction']!r}.", ""]
    out += table(["system", "setting", "time to first token ms", "decode tokens/s", "same tokens as HF"],
                 [[x["system"], x["setting"], f"{x['ttft_ms']:.0f}", f"{x.get('decode_tokens_per_s', float('nan')):.1f}",
                   "yes" if x["same_tokens_as_hf"] else "no"] for x in c["rows"]])
    out += ["## Targets", ""] + table(["target", "measured", "result"],
                                      [[t["target"], t["measured"], "PASS" if t["passed"] else "FAIL"] for t in r["targets"]])
    return "\n".join(out)


def plot(r: dict, path: Path) -> None:
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


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python scripts/bench.py", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="under 5 minutes on 2 cores")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="tiny widths: checks the script")
    p.set_defaults(mode="full")
    p.add_argument("--out-dir", type=Path, default=Path("docs/bench"), help="bench.md, bench.json, bench.png, bench.log")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime intra-op and torch threads")
    p.add_argument("--repeats", type=int, help="timed repetitions (median reported); default per mode")
    p.add_argument("--warmup", type=int, help="untimed runs before timing; default per mode")
    p.add_argument("--build", type=Path, help="an existing FiCoCo build for sections 3 and 5 (skips building the chat model)")
    p.add_argument("--baseline-build", type=Path, help="with --build: the unreduced build of the same model")
    p.add_argument("--work-dir", type=Path, help="keep the exported graphs and builds here (default: a temporary directory)")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    args.repeats = mode.repeats if args.repeats is None else args.repeats
    args.warmup = mode.warmup if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.baseline_build and not args.build:
        p.error("--baseline-build needs --build")
    return args, mode


def run(args, mode: Mode, work: Path, log) -> dict:
    """Every section in turn; bench.json is rewritten after each one, so a failure keeps what was measured."""
    started, results = time.perf_counter(), {"machine": M.machine(args.threads), "complete": False}
    results["settings"] = {**dataclasses.asdict(mode), "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                           "ort_session": {"provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_ALL",
                                           "intra_op_num_threads": args.threads}}
    torch.set_num_threads(args.threads)

    def section(keys, title, fn, *a):
        print(f"[{title}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = fn(*a)
        results.update(zip(keys, out) if len(keys) > 1 else {keys[0]: out})
        (args.out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{title}] done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    model = M.random_llava(mode.vision, M.SMALL_TEXT)
    section(["vision"], "1 vision", bench_vision, mode, args, work, model, log)
    section(["ficoco_ops"], "4 FiCoCo ops", bench_ops, mode, args, model)
    del model
    gc.collect()
    section(["prefill"], "2 prefill", bench_prefill, mode, args, work, log)
    section(["chat", "decode"], "3+5 decode, chat", bench_chat, mode, args, work, log)
    results["machine"].update(load_average_end=[round(x, 2) for x in os.getloadavg()], peak_rss_mb=M.peak_rss_mb())
    results.update(duration_s=time.perf_counter() - started, complete=True)
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args, mode = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ficoco-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, mode, work, log)
    finally:
        (args.out_dir / "bench.log").write_text(log.getvalue())
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    (args.out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (args.out_dir / "bench.md").write_text(report)
    plot(results, args.out_dir / "bench.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
