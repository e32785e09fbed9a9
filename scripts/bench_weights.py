"""`python scripts/bench_weights.py`: weight formats (fp32, fp16, int8, int4) of one FiCoCo-V build, side by side.

    python scripts/bench_weights.py --out-dir docs/bench              # full: the "wide" model, 3 x 32 tokens
    python scripts/bench_weights.py --smoke --out-dir /tmp/weights     # tiny model, 1 repetition: checks the script

For each format, `python -m export.build --weights FORMAT --variant v --ratio 0.25 --no-verify` of the
benchmark model (`scripts/bench_models.chat_model_dir`: "wide" = CLIP ViT-L/14-336 + a 2048-wide 8-layer
Llama, vocabulary 32000, random weights; "tiny" = the tiny-llava-1.5 preset), with TensorRT-RTX engines for
one compute capability (8.6) when tensorrt-rtx is installed. int8 / int4 are weight-only on the LLM's
linear layers (export/quantize.py, QDQ form; activations fp32, export.build's default, or
--int-precision fp16). Measured:

1. bytes on disk: the LLM (decoder.* graphs, .onnx + external data), embed and vision apart, and the
   engines; int4 / fp16 and int8 / fp16 (target: LLM at int4 <= 0.3x fp16).
2. ONNX Runtime, CPU, intra_op_num_threads = the usable cores: time to first token and decode tokens/s,
   median of --repeats greedy generations of --new-tokens after one warm-up, same picture and prompt
   (target: int4 decode >= 2x fp32 decode), and whether ORT fused the QDQ pairs into MatMulNBits
   (the decoder graphs as ORT_ENABLE_ALL leaves them, saved with `optimized_model_filepath`).
3. the memory plan of LLaVA-1.5-7B under FiCoCo-V 0.25 on an 8 GB Jetson Orin Nano (`ficoco.analysis.memory`):
   int4 and fp16, at max_seq_len 2048 and at the largest max_seq_len that fits.

Random weights: quality is measured on real weights elsewhere. Writes weights.md, weights.json and
weights.log (the exporters' output) to --out-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/bench_weights.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import bench_models as M

FORMATS = ("fp32", "fp16", "int8", "int4")
INSTRUCTION = "Describe the image."
CAPABILITY = "8.6"
NANO = "Jetson Orin Nano 8 GB"
PLAN_MODEL, PLAN_RATIO = "llava-1.5-7b", 0.25


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # bench_models.chat_model_dir kind
    repeats: int
    new_tokens: int
    warmup: int


MODES = {"full": Mode("full", "wide", 3, 32, 1), "smoke": Mode("smoke", "tiny", 1, 8, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench_weights.py", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 repetition of 8 tokens: checks the script")
    p.add_argument("--out-dir", type=Path, default=Path("docs/bench"), help="where weights.md / .json / .log go")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--repeats", type=int, help="timed generations per format (default: 3 full, 1 smoke)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per generation (default: 32 full, 8 smoke)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ORT intra_op threads (default: usable cores)")
    p.add_argument("--max-seq-len", type=int, default=512, help="the builds' max_seq_len (default 512)")
    p.add_argument("--int-precision", choices=("fp32", "fp16"), default="fp32",
                   help="activations (and the unquantized weights) of the int8 / int4 builds (default fp32, export.build's)")
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT-RTX engines")
    p.add_argument("--work-dir", type=Path, help="keep the model and builds here (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "full"]
    args.mode, args.repeats, args.new_tokens = mode, args.repeats or mode.repeats, args.new_tokens or mode.new_tokens
    if min(args.repeats, args.new_tokens, args.threads) < 1:
        p.error("--repeats, --new-tokens and --threads must be >= 1")
    return args


# --------------------------------------------------------------------------- builds


def engines_wanted(args) -> bool:
    return not args.no_engines and importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def build(source: Path, fmt: str, out: Path, args, log: io.StringIO) -> dict:
    """export.build of `source` at `fmt`; {"dir", "argv", "seconds"}."""
    from export.build import main as build_main

    engines = ["--backend", "tensorrt-rtx", "--compute-capability", CAPABILITY] if engines_wanted(args) else ["--backend", "none"]
    precision = ["--precision", args.int_precision] if fmt in ("int8", "int4") and args.int_precision != "fp32" else []
    argv = ["--model", str(source), "--variant", "v", "--ratio", "0.25", "--weights", fmt, *precision, "--no-verify", *engines,
            "--max-seq-len", str(args.max_seq_len), "--out", str(out)]
    print(f"[{fmt}] python -m export.build {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    with M.quiet(log):
        code = build_main(argv)
    if code != 0:
        raise RuntimeError(f"python -m export.build {shlex.join(argv)} failed (exit {code}); see weights.log")
    return {"dir": out, "argv": argv, "seconds": time.perf_counter() - start}


def file_bytes(entry: dict) -> int:
    return entry["bytes"] + sum(e["bytes"] for e in entry.get("external_data", []))


def sizes(manifest: dict) -> dict:
    """Bytes on disk from the manifest: the LLM (decoder.*), embed, vision; the engines likewise."""
    graphs, engines = manifest["graphs"], manifest.get("engines") or {}
    llm = {g: file_bytes(e) for g, e in graphs.items() if g.startswith("decoder.")}
    out = {"llm": sum(llm.values()), "llm_graphs": llm, "embed": file_bytes(graphs["embed"]) if "embed" in graphs else 0,
           "vision": file_bytes(graphs["vision"]), "graphs_total": sum(file_bytes(e) for e in graphs.values())}
    if engines:
        out["engines"] = {g: e["bytes"] for g, e in engines.items()}
        out["engines_llm"] = sum(v for g, v in out["engines"].items() if g.startswith("decoder."))
        out["engines_total"] = sum(out["engines"].values())
    return out


def fusion(directory: Path, manifest: dict, threads: int) -> dict:
    """{graph: node counts before and after ORT_ENABLE_ALL} of the decoder graphs: were the QDQ pairs fused?"""
    import onnx
    import onnxruntime as ort

    def count(model, *ops):
        return {op: sum(n.op_type == op for n in model.graph.node) for op in ops}

    ops, out = ("MatMulNBits", "DequantizeLinear", "MatMul"), {}
    for graph in [g for g in manifest["graphs"] if g.startswith("decoder.")]:
        path = directory / manifest["graphs"][graph]["file"]
        with tempfile.TemporaryDirectory() as scratch:
            options = M.ort_options(threads)
            options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            after = count(onnx.load(options.optimized_model_filepath, load_external_data=False), *ops)
        before = count(onnx.load(str(path), load_external_data=False), *ops)
        out[graph] = {"before": before, "after": after,
                      "fused": after["MatMulNBits"] > 0 and after["DequantizeLinear"] < max(before["DequantizeLinear"], 1)}
    return out


# --------------------------------------------------------------------------- generation


def generate(directory: Path, args) -> dict:
    """Time to first token and decode tokens/s on ONNX Runtime: medians of --repeats after --warmup."""
    image, n, runs = M.test_image(), args.new_tokens, []
    with M.open_pipeline(directory, args.threads) as pipe:
        for i in range(args.mode.warmup + args.repeats):
            result = pipe(image, INSTRUCTION, max_new_tokens=n)
            t = result.timings
            if i >= args.mode.warmup:
                runs.append({"ttft_ms": t.time_to_first_token_ms, "decode_tokens_per_s": t.decode_tokens_per_s,
                             "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
                             "generated": result.tokens.generated, "peak_rss_mb": t.peak_rss_mb})
        backend, prompt = pipe.backend.name, result.tokens.prompt
    median = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tokens_per_s", "vision_ms", "prefill_ms")
              if all(r[k] is not None for r in runs)}
    return {**median, "samples": runs, "token_ids": list(result.token_ids), "backend": backend, "prompt_tokens": prompt}


def measure_format(fmt: str, source: Path, work: Path, args, log: io.StringIO) -> dict:
    from runtime.manifest import read

    made = build(source, fmt, work / f"build-{fmt}", args, log)
    manifest = read(made["dir"])
    row = {"format": fmt, "precision": manifest["precision"], "build_s": made["seconds"], "argv": made["argv"],
           "bytes": sizes(manifest), "quantization": manifest.get("quantization") and {
               k: manifest["quantization"][k] for k in ("weights", "method", "block_size", "graphs")}}
    if fmt in ("int8", "int4"):
        row["fusion"] = fusion(made["dir"], manifest, args.threads)
    print(f"[{fmt}] generating ({args.mode.warmup} warm-up + {args.repeats} x {args.new_tokens} tokens)", flush=True)
    row["generation"] = generate(made["dir"], args)
    if not args.work_dir:
        shutil.rmtree(made["dir"], ignore_errors=True)  # the full builds are GBs: free the disk as we go
    return row


# --------------------------------------------------------------------------- the 7B memory plan


def largest_fitting(config: dict, ficoco, weights: str, vision: str | None) -> int | None:
    """The largest max_seq_len whose plan fits the Orin Nano (the plan grows with it), None if none does."""
    from ficoco.analysis.memory import DEVICES, fits, plan_memory

    nano = [d for d in DEVICES if d.name == NANO]
    ok = lambda n: fits(plan_memory(config, ficoco, n, weights, vision_weights=vision), nano)[0][2]  # noqa: E731
    low = plan_memory(config, ficoco, 2048, weights).visual_tokens + 1
    if not ok(low):
        return None
    high = 131072
    while low < high:  # invariant: ok(low)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def memory_plans() -> dict:
    """LLaVA-1.5-7B, FiCoCo-V 0.25, on the Orin Nano: int4 (vision int4 / fp16) and fp16, at 2048 and at the fit."""
    from ficoco.config import FiCoCoConfig
    from ficoco.analysis.memory import DEVICES, fits, format_plan, plan_dict, plan_memory
    from scripts.flops import load_model_config

    config, ficoco = load_model_config(PLAN_MODEL), FiCoCoConfig("v", ratio=PLAN_RATIO)
    nano = next(d for d in DEVICES if d.name == NANO)
    rows, lines = [], {}
    for label, weights, vision in (("int4 (LLM and vision)", "int4", None), ("int4 LLM, vision fp16", "int4", "fp16"),
                                   ("fp16", "fp16", None)):
        fit = largest_fitting(config, ficoco, weights, vision)
        for n in dict.fromkeys([2048] + ([fit] if fit else [])):
            plan = plan_memory(config, ficoco, n, weights, vision_weights=vision)
            (_, free, ok), = fits(plan, [nano])
            rows.append({"label": label, "max_seq_len": n, "largest_fitting": fit, "free_after": free, "fits": ok,
                         "plan": {k: v for k, v in plan_dict(plan, [nano]).items() if k != "devices"}})
            if weights == "int4" and vision is None:
                lines[n] = format_plan(plan, [nano])
    return {"model": PLAN_MODEL, "setting": f"FiCoCo-V ratio {PLAN_RATIO}", "device": {
        "name": nano.name, "memory": nano.memory, "system_reserve": nano.system_reserve, "available": nano.available},
        "rows": rows, "int4_lines": {str(k): v for k, v in lines.items()}}


# --------------------------------------------------------------------------- report


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnx", "tensorrt-rtx-cu13-bindings", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def ratios(rows: list[dict]) -> dict:
    by = {r["format"]: r for r in rows}
    out = {}
    for fmt in ("int8", "int4"):
        if fmt in by and "fp16" in by:
            out[f"llm_{fmt}_over_fp16"] = by[fmt]["bytes"]["llm"] / by["fp16"]["bytes"]["llm"]
            if "engines_llm" in by[fmt]["bytes"] and "engines_llm" in by["fp16"]["bytes"]:
                out[f"engines_llm_{fmt}_over_fp16"] = by[fmt]["bytes"]["engines_llm"] / by["fp16"]["bytes"]["engines_llm"]
        speed = lambda f: by[f]["generation"].get("decode_tokens_per_s")  # noqa: E731
        if fmt in by and "fp32" in by and speed(fmt) and speed("fp32"):
            out[f"decode_{fmt}_over_fp32"] = speed(fmt) / speed("fp32")
    return out


def targets(r: dict) -> list[dict]:
    out = []
    if "llm_int4_over_fp16" in r:
        out.append({"target": "LLM bytes at int4 <= 0.3x fp16", "measured": f"{r['llm_int4_over_fp16']:.3f}x",
                    "passed": r["llm_int4_over_fp16"] <= 0.3})
    if "decode_int4_over_fp32" in r:
        out.append({"target": "ORT CPU decode at int4 >= 2x fp32", "measured": f"{r['decode_int4_over_fp32']:.2f}x",
                    "passed": r["decode_int4_over_fp32"] >= 2.0})
    return out


def mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def format_rows(results: dict) -> list[str]:
    lines = ["| format | precision | LLM MB (decoder.*) | embed MB | vision MB | engines MB (LLM / all) | build s | "
             "TTFT ms | decode tok/s | ORT fused QDQ -> MatMulNBits |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["formats"]:
        b, g = r["bytes"], r["generation"]
        engines = f"{mb(b['engines_llm'])} / {mb(b['engines_total'])}" if "engines" in b else "-"
        fused = "-" if "fusion" not in r else "; ".join(
            f"{k}: {'yes' if f['fused'] else 'NO'} ({f['after']['MatMulNBits']} MatMulNBits, {f['before']['DequantizeLinear']} -> "
            f"{f['after']['DequantizeLinear']} DequantizeLinear)" for k, f in r["fusion"].items())
        tps = g.get("decode_tokens_per_s")
        lines.append(f"| {r['format']} | {r['precision']} | {mb(b['llm'])} | {mb(b['embed'])} | {mb(b['vision'])} | {engines} | "
                     f"{r['build_s']:.0f} | {g['ttft_ms']:.1f} | {'-' if tps is None else f'{tps:.2f}'} | {fused} |")
    return lines


def format_memory(memory: dict) -> list[str]:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    d = memory["device"]
    lines = [f"## 3. Memory plan: {memory['model']}, {memory['setting']}, on the {d['name']}", "",
             f"Of the {gib(d['memory'])} GiB, the OS share (`ficoco.analysis.memory.DEVICES` system reserve: firmware carve-outs, "
             f"the L4T OS and services, the CUDA context with TensorRT's kernels and the host runtime) is "
             f"{gib(d['system_reserve'])} GiB, leaving {gib(d['available'])} GiB for the build. Shape-only config, no weights read; "
             "activations estimated (`ficoco.analysis.memory.activation_estimate`, prompt_len = max_seq_len). \"int4 (LLM and vision)\" is "
             "`export.build --precision fp16 --weights int4 --quantize-vision`, \"int4 LLM, vision fp16\" the same without "
             "--quantize-vision; KV cache fp16.", "",
             "| weights | max_seq_len | weights GiB | KV cache GiB | activations GiB | total GiB | free GiB | fits |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in memory["rows"]:
        p = r["plan"]
        lines.append(f"| {r['label']} | {r['max_seq_len']} | {gib(p['weight_bytes'])} | {gib(p['kv_bytes'])} | "
                     f"{gib(p['activation_bytes'])} | {gib(p['total'])} | {gib(r['free_after'])} | {'yes' if r['fits'] else 'no'} |")
    lines.append("")
    for label in dict.fromkeys(r["label"] for r in memory["rows"]):
        fit = next(r["largest_fitting"] for r in memory["rows"] if r["label"] == label)
        lines.append(f"- {label}: " + (f"largest max_seq_len that fits: **{fit}**" if fit else "fits at no max_seq_len"))
    for n, plan_lines in memory["int4_lines"].items():
        lines += ["", f"int4 plan at max_seq_len {n} (`python scripts/memory.py --model {memory['model']} --variant v "
                  f"--ratio {PLAN_RATIO} --weights int4 --max-seq-len {n}`):", "", *plan_lines]
    return lines


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [f"# Weight formats: bytes, ONNX Runtime CPU speed, 7B memory plan ({s['mode']} mode)", "",
             f"Model: `{s['kind']}` ({results['model']}), random weights, FiCoCo-V ratio 0.25, max_seq_len {s['max_seq_len']}; "
             f"int8 / int4 weight-only on the LLM's linear layers (QDQ, rtn, block 32), activations {s['int_precision']}. Engines: "
             + (f"TensorRT-RTX, compute capability {CAPABILITY}." if s["engines"] else "none (tensorrt-rtx not installed or --no-engines)."),
             "", "## 1-2. Bytes on disk and ONNX Runtime CPU generation", "",
             f"ONNX Runtime {m['onnxruntime']}, CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads {s['threads']}; "
             f"median of {s['repeats']} greedy generation(s) of {s['new_tokens']} tokens after {s['warmup']} warm-up, "
             f"same picture and prompt ({INSTRUCTION!r}, {results['formats'][0]['generation']['prompt_tokens']} prompt tokens). "
             "MB = 10^6 bytes; TTFT includes preprocessing, vision and prefill.", "", *format_rows(results), ""]
    lines += [f"- {k}: {v:.3f}" for k, v in results["ratios"].items()]
    lines += ["", "## Targets", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'PASS' if t['passed'] else 'FAIL'} |" for t in results["targets"]]
    if s["mode"] == "smoke":
        lines += ["", "Smoke mode: tiny widths, one repetition; the figures check the script, not the formats."]
    lines += ["", *format_memory(results["memory"]), "", "## Machine and commands", ""]
    lines += [f"- {k}: {v}" for k, v in m.items() if k != "load_average_start"]
    lines += [f"- load average (1, 5, 15 min) at start {m['load_average_start']}, at end {results['load_average_end']}",
              f"- duration: {results['duration_s']:.0f} s", "",
              f"The builds' --model is `scripts.bench_models.chat_model_dir({s['kind']!r}, ...)` in a temporary directory.",
              "", "```", results["command"]]
    lines += [f"python -m export.build {shlex.join(r['argv'])}" for r in results["formats"]]
    return "\n".join(lines + ["```", ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, log = time.perf_counter(), io.StringIO()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": {**M.machine(args.threads), **versions()},
               "command": "python scripts/bench_weights.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "settings": {"mode": args.mode.name, "kind": args.mode.kind, "formats": args.formats, "repeats": args.repeats,
                            "warmup": args.mode.warmup, "new_tokens": args.new_tokens, "threads": args.threads,
                            "max_seq_len": args.max_seq_len, "int_precision": args.int_precision, "engines": engines_wanted(args)}}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        with M.quiet(log):
            source = M.chat_model_dir(args.mode.kind, work / "model")
        config = json.loads((source / "config.json").read_text())["text_config"]
        results["model"] = ", ".join(f"{k} {config.get(k)}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                       "num_key_value_heads", "vocab_size"))
        results["formats"] = [measure_format(fmt, source, work, args, log) for fmt in args.formats]
    finally:
        (args.out_dir / "weights.log").write_text(log.getvalue())
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["ratios"] = ratios(results["formats"])
    results["targets"] = targets(results["ratios"])
    results["memory"] = memory_plans()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["duration_s"] = time.perf_counter() - start
    (args.out_dir / "weights.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out_dir / "weights.md").write_text(markdown(results))
    print("\n".join(format_rows(results)) + "\n" + "\n".join(f"{k}: {v:.3f}" for k, v in results["ratios"].items()))
    print(f"wrote {args.out_dir / 'weights.md'}, weights.json, weights.log ({results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
