"""`python scripts/bench.py`: FiCoCo's latency on CPU (ONNX Runtime) against its FLOPs and against Hugging Face.

    python scripts/bench.py --out-dir docs/bench         # the full run (real widths; see MODES)
    python scripts/bench.py --quick --out-dir /tmp/bench  # under 5 minutes on 2 cores
    python scripts/bench.py --smoke --build BUILD_DIR     # seconds-scale settings (the tests)
    python scripts/bench.py --sections decode --out-dir docs/bench   # one section, merged into bench.json

Every figure comes from this one run: the median of --repeats timings after --warmup untimed runs,
set against the unreduced build of the same model (random weights; `scripts/bench_models.py`).

1. vision: vision.onnx (export.trace.graphs) of a CLIP ViT-L/14-336-width LLaVA under FiCoCo-V at each
   ratio, timed round by round on ONNX Runtime; speedup over ratio 1.0 vs `ficoco.analysis.flops.vision_flops`.
2. prefill: the LLM graphs of the build layout (`runtime.names`: decoder.0, and with FiCoCo-L
   reduce.1 and decoder.1) of a Vicuna-7B-width decoder cut to 6 layers (FiCoCo-L acts at layer 4),
   exported as export.build does and chained as the runtime's prefill runs them (empty past
   buffers, the new K/V copied into the cache buffers; the runtime's OrtBackend); 60 text tokens,
   unreduced / FiCoCo-V (k visual tokens) / FiCoCo-L; vs `ficoco.analysis.flops.prefill_flops`.
3. decode: one step at several cache lengths: `runtime.bench.decode_step_ms` on a `runtime.Pipeline`
   over an `export.build` build (the KV cache in place: each step starts at exactly that length),
   and one Hugging Face forward over a DynamicCache of that length; next to the figures from before
   the in-place cache (`bench_report.BEFORE`, full mode), the step(longest)/step(shortest) ratio
   and the runtime's KV cache memory (one copy; two before).
4. FiCoCo's own operations in PyTorch on CPU: every `ficoco.core.vision_step` of the schedule at the
   smallest ratio on inputs of its shapes (x [1, N, C], softmax-row attention [1, N, N], sorted grid
   positions) vs the CLIP layer holding the first step (`ficoco.patch.clip.reducing_layer`) and the
   FiCoCo-V encoder (`ficoco.patch.clip.encode`).
5. chat: time to first token and decode tokens/s, Hugging Face transformers (PyTorch eager mode, its
   default attention) vs the runtime on ONNX Runtime, same model, image, prompt and greedy tokens.

`--sections NAME ...` (vision, ops, prefill, decode, chat) runs only those: their figures replace
the same sections of an existing --out-dir/bench.json (of the same mode), the others are kept, and
bench.md is written from the merged results (bench.png when vision and prefill are both there).

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

from ficoco.analysis import flops as F
from ficoco.plan import BuildPlan
from runtime import names
from scripts import bench_models as M
from scripts import bench_report as R

TEXT_BEFORE, TEXT_AFTER = 5, 55  # the prefill's ~60 text tokens (ficoco.analysis.flops.TEXT_TOKENS)
INSTRUCTION = "Describe the image."
SECTIONS = {"vision": "vision", "ops": "ficoco_ops", "prefill": "prefill", "decode": "decode", "chat": "chat"}  # name: bench.json key


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
        specs[ratio] = (path.parent, partial(M.OrtGraph, path, args.threads, {"pixel_values": pixels}))
    times, together = M.time_graphs(specs, args.repeats, args.warmup)
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
    for key in settings:
        directory = work / f"prefill-{key[0]}-r{key[1]:g}"
        directory.mkdir(parents=True, exist_ok=True)
        with M.quiet(log):
            build = M.export_prefill(model, *key, directory, TEXT_BEFORE, TEXT_AFTER)
        p = build.plan
        info[key] = {"visual_tokens": p.visual_tokens, "language": [[s.layer, s.tokens_in, s.tokens_out] for s in p.language],
                     "graphs": [g for g in build.graph_names if g not in (names.VISION, names.EMBED)]}
        before, features, after = M.prefill_inputs(model, p.visual_tokens, TEXT_BEFORE, TEXT_AFTER)
        inputs = {"before": before.numpy(), "features": features.numpy(), "after": after.numpy()}
        specs[key] = (directory, partial(M.prefill_step, build, inputs, args.threads))
    described, text = M.describe_model(model), F.text_of(model.config.text_config.to_dict())
    del model
    gc.collect()
    times, together = M.time_graphs(specs, args.repeats, args.warmup)
    tokens, full_key = TEXT_BEFORE + TEXT_AFTER, settings[0]
    rows = []
    for key in settings:
        visual, language = info[key]["visual_tokens"], {layer: out for layer, _, out in info[key]["language"]}
        flops, full = F.prefill_flops(text, tokens, visual, language), F.prefill_flops(text, tokens, info[full_key]["visual_tokens"], {})
        speedup = times[full_key]["ms"] / times[key]["ms"]
        rows.append({"variant": key[0], "ratio": key[1], **info[key], **times[key], "speedup": speedup, "tflops": flops / 1e12,
                     "flops_ratio": flops / full, "flops_speedup": full / flops, "efficiency": speedup * flops / full})
    how = ("Timed: the runtime's own prefill (runtime/backend_ort.py through runtime/chain.py): the text rows looked up "
           "in the stored table, the prompt's embeddings through decoder.0 with empty past buffers, its K/V copied into the "
           "cache buffers, then reduce.1 and decoder.1 (FiCoCo-L).")
    return {"model": {**described, "vision": "tiny CLIP (not timed: the prefill takes image features)"},
            "text_tokens": tokens, "interleaved": together, "how": how, "rows": rows}


# --------------------------------------------------------------------------- 3. decode, 5. chat


def ficoco_config(manifest: dict):
    """The build's FiCoCoConfig and a label for it, from its manifest."""
    from ficoco import FiCoCoConfig

    config = FiCoCoConfig.from_dict(manifest["ficoco"])
    amount = f"r={config.ratio:g}" if config.ratio is not None else f"{config.tokens} tokens"
    return config, f"FiCoCo-{config.variant.upper()} {amount}"


@dataclasses.dataclass
class ChatModel:
    """What sections 3 and 5 share: the builds, their manifests, and the same model loaded for Hugging Face."""

    builds: dict
    manifests: dict
    model: object
    processor: object

    @classmethod
    def make(cls, mode: Mode, args, work: Path, log, baseline: bool) -> ChatModel:
        from ficoco.models.presets import load
        from runtime.manifest import read

        from export.reload import source_dir

        builds, source = M.chat_builds(mode, args, work, log, baseline)
        manifests = {key: read(build) for key, build in builds.items()}
        with M.quiet(log):
            model, processor = load(source or source_dir(manifests["ficoco"], args.model))
        return cls(builds, manifests, model, processor)


def bench_chat(mode: Mode, args, chat: ChatModel) -> dict:
    from ficoco import apply, remove

    config, label = ficoco_config(chat.manifests["ficoco"])
    model, builds = chat.model, chat.builds
    image, reps, warm, n = M.test_image(), args.repeats, args.warmup, mode.new_tokens
    hf = partial(M.hf_run, model, chat.processor, image, INSTRUCTION, n)
    rows = [{"system": "Hugging Face eager (PyTorch)", "setting": "unreduced", **M.repeat_runs(hf, reps, warm)}]
    apply(model, config)
    rows.append({"system": "Hugging Face eager (PyTorch)", "setting": label, **M.repeat_runs(hf, reps, warm)})
    remove(model)
    for key in [k for k in ("none", "ficoco") if k in builds]:
        with M.open_pipeline(builds[key], args.threads) as pipe:
            rows.append({"system": "runtime (ONNX Runtime)", "setting": "unreduced" if key == "none" else label,
                         **M.repeat_runs(partial(M.runtime_run, pipe, image, INSTRUCTION, n), reps, warm)})
    hf_tokens = {r["setting"]: r["token_ids"] for r in rows if r["system"].startswith("Hugging")}
    for row in rows:
        row["same_tokens_as_hf"] = row.pop("token_ids") == hf_tokens[row["setting"]]
    manifests = chat.manifests
    described = {"source": manifests["ficoco"]["source"]["model"], "kind": "given build" if args.build else mode.chat,
                 "builds": {k: str(v) for k, v in builds.items()}, "parity_passed": {k: m["parity"]["passed"] for k, m in manifests.items()},
                 "visual_tokens": BuildPlan.from_dict(manifests["ficoco"]["schedule"]).visual_tokens, "new_tokens": n, "instruction": INSTRUCTION,
                 **M.describe_model(model)}
    return {"model": described, "rows": rows}


def bench_decode(mode: Mode, args, chat: ChatModel) -> dict:
    """One decode step at each cache length (the runtime on the FiCoCo build, and Hugging Face), with the
    runtime's KV cache memory: one copy, allocated once; before the in-place cache, two (`bench_report.BEFORE`)."""
    from runtime import bench as runtime_bench

    build = chat.builds["ficoco"]
    repeats = max(args.repeats, 5)
    with M.open_pipeline(build, args.threads) as pipe:
        lengths = [length for length in mode.lengths if length < pipe.build.plan.max_seq_len]  # the lengths the build admits
        runtime = runtime_bench.decode_step_ms(pipe, lengths, repeats=repeats, warmup=args.warmup)
        cache = pipe.backend.cache
        row_bytes = [2 * key.nbytes // max(key.shape[2], 1) for key in cache.keys]  # key + value, one row, per layer
        held = lambda length: sum(b * n for b, n in zip(row_bytes, pipe.build.plan.cache_lengths(length)))  # noqa: E731
        now, max_seq_len = M.cache_bytes(pipe.backend), pipe.build.max_seq_len
        before = {length: R.BEFORE["copies"] * held(length) for length in [*lengths, max_seq_len]}
    hf = M.hf_decode_step_ms(chat.model, lengths, repeats, args.warmup)
    rows = [{"cache_length": L, "runtime_ms": runtime[L], "hf_ms": hf[L], "cache_bytes_before": before[L]} for L in lengths]
    return {"build": str(build), "max_seq_len": max_seq_len,
            "decode_graph": "the FiCoCo build's decoder segments (FiCoCo-V leaves the decoder whole: decoder.0) over the KV "
                            "cache in place (each layer's buffer read where it is, the new row written into it)",
            "cache_bytes": now, "cache_copies": 1, "cache_bytes_before_at_max": before[max_seq_len], "rows": rows}


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python scripts/bench.py", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="under 5 minutes on 2 cores")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="tiny widths: checks the script")
    p.set_defaults(mode="full")
    p.add_argument("--out-dir", type=Path, default=Path("docs/bench"), help="bench.md, bench.json, bench.png, bench.log")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                   help=f"run only these ({', '.join(SECTIONS)}), merged into an existing --out-dir/bench.json")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime intra-op and torch threads")
    p.add_argument("--repeats", type=int, help="timed repetitions (median reported); default per mode")
    p.add_argument("--warmup", type=int, help="untimed runs before timing; default per mode")
    p.add_argument("--build", type=Path, help="an existing FiCoCo build for sections 3 and 5 (skips building the chat model)")
    p.add_argument("--baseline-build", type=Path, help="with --build: the unreduced build of the same model")
    p.add_argument("--model", help="with --build: the checkpoint directory it was made from (not needed for a preset's build)")
    p.add_argument("--work-dir", type=Path, help="keep the exported graphs and builds here (default: a temporary directory)")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    args.repeats = mode.repeats if args.repeats is None else args.repeats
    args.warmup = mode.warmup if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.baseline_build and not args.build:
        p.error("--baseline-build needs --build")
    if args.model and not args.build:
        p.error("--model needs --build")
    args.sections = [name for name in SECTIONS if name in args.sections]  # running order, once each
    return args, mode


def start_results(args, mode: Mode) -> dict:
    """A fresh record, or with --sections the existing bench.json of --out-dir (same mode) to merge into."""
    settings = {**dataclasses.asdict(mode), "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                "ort_session": {"provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_ALL",
                                "intra_op_num_threads": args.threads}}
    existing = args.out_dir / "bench.json"
    if args.sections != list(SECTIONS) and existing.is_file():
        results = json.loads(existing.read_text())
        if results.get("settings", {}).get("name") != mode.name:
            raise ValueError(f"{existing} holds a {results.get('settings', {}).get('name')!r}-mode run; merge {mode.name!r}-mode "
                             "sections into a run of the same mode (or use another --out-dir)")
        args.merged, args.run_date = True, M.machine(args.threads)["date"]
        return results
    machine = M.machine(args.threads)
    args.merged, args.run_date = False, machine["date"]
    return {"machine": machine, "complete": False, "settings": settings}


def run(args, mode: Mode, work: Path, log, results: dict) -> dict:
    """The chosen sections in turn; bench.json is rewritten after each one, so a failure keeps what was measured."""
    started, wanted = time.perf_counter(), args.sections
    torch.set_num_threads(args.threads)

    def section(name, fn, *a):
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        start, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
        results[SECTIONS[name]] = fn(*a)
        results.setdefault("runs", {})[SECTIONS[name]] = {
            "date": args.run_date, "mode": mode.name, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "cpu": M.machine(args.threads)["cpu"], "load_average_start": load, "duration_s": time.perf_counter() - start}
        (args.out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{name}] done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    if "vision" in wanted or "ops" in wanted:
        model = M.random_llava(mode.vision, M.SMALL_TEXT)
        if "vision" in wanted:
            section("vision", bench_vision, mode, args, work, model, log)
        if "ops" in wanted:
            section("ops", bench_ops, mode, args, model)
        del model
        gc.collect()
    if "prefill" in wanted:
        section("prefill", bench_prefill, mode, args, work, log)
    if "decode" in wanted or "chat" in wanted:
        chat = ChatModel.make(mode, args, work, log, baseline="chat" in wanted)
        if "chat" in wanted:
            section("chat", bench_chat, mode, args, chat)
        if "decode" in wanted:
            section("decode", bench_decode, mode, args, chat)
    if not args.merged:  # the header's machine and time are this run's
        results["machine"].update(load_average_end=[round(x, 2) for x in os.getloadavg()], peak_rss_mb=M.peak_rss_mb())
        results["duration_s"] = time.perf_counter() - started
    results["complete"] = all(key in results for key in SECTIONS.values())
    results["targets"] = R.targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args, mode = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = start_results(args, mode)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log = io.StringIO()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ficoco-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, mode, work, log, results)
    finally:
        (args.out_dir / "bench.log").write_text(log.getvalue())
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    (args.out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report = R.markdown(results)
    (args.out_dir / "bench.md").write_text(report)
    R.plot(results, args.out_dir / "bench.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
