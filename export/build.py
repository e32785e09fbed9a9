"""`python -m export.build`: FiCoCo LLaVA -> static-shape ONNX graphs, Polygraphy parity, TensorRT engines.

    python -m export.build --ratio 0.5                                  # tiny-llava-1.5, FiCoCo-V
    python -m export.build --model /models/llava-1.5-7b-hf --variant vl --ratio 0.25 --precision fp16
    python -m export.build --from-onnx builds/NAME --backend tensorrt   # on the device: engines only, no torch

The build is written to a temporary directory beside --out and moved into place
only when every step succeeded. This module imports torch only for a full build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from runtime import manifest as manifest_io

from runtime import names
from .request import BACKENDS, PRECISIONS, VARIANTS, BuildRequest, parse_capability, parse_grid


class Progress:
    """Numbered stages with their time, printed as they finish; `rows` for the summary."""

    def __init__(self, total: int, log: io.StringIO):
        self.total, self.index, self.rows, self.log = total, 0, [], log

    @contextlib.contextmanager
    def stage(self, title: str, quiet: bool = True):
        self.index += 1
        print(f"[{self.index}/{self.total}] {title} ...", flush=True)
        start = time.perf_counter()
        sink = contextlib.ExitStack()
        if quiet:  # the exporters' chatter goes to build.log
            sink.enter_context(contextlib.redirect_stdout(self.log))
            sink.enter_context(contextlib.redirect_stderr(self.log))
            sink.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            sink.callback(logging.getLogger("torch").setLevel, logging.getLogger("torch").level)
            logging.getLogger("torch").setLevel(logging.ERROR)
        with sink:
            yield
        seconds = time.perf_counter() - start
        self.rows.append((title, seconds))
        print(f"      done in {seconds:.1f}s", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llava-1.5", help="preset name or local Hugging Face LLaVA directory")
    p.add_argument("--variant", default="v", choices=VARIANTS)
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens kept, in (0, 1]")
    amount.add_argument("--tokens", type=int, help="visual tokens kept per image")
    amount.add_argument("--tflops", type=float, help="LLM prefill budget in TFLOPs (scripts/flops.py convention)")
    p.add_argument("--out", type=Path, help="build directory (default: builds/MODEL-VARIANT-rRATIO-PRECISION)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="TensorRT flavour for the engines")
    p.add_argument("--compute-capability", nargs="+", default=None, metavar="SM", help="TensorRT-RTX targets, e.g. 8.6 12.0")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--grid", default=None, help="LLaVA-NeXT anyres grid fixed by the build, rows x cols (default 2x2)")
    p.add_argument("--skip-verify", action="store_true", help="build even if a parity check fails")
    p.add_argument("--from-onnx", type=Path, metavar="DIR", help="compile engines for an existing build (no torch)")
    return p.parse_args(argv)


def make_request(args: argparse.Namespace) -> BuildRequest:
    capabilities = tuple(parse_capability(c) for c in args.compute_capability) if args.compute_capability else None
    extra = {"compute_capabilities": capabilities} if capabilities else {}
    return BuildRequest(
        model=args.model, variant=args.variant, ratio=args.ratio, tokens=args.tokens, tflops=args.tflops, out=args.out,
        precision=args.precision, backend=args.backend, max_seq_len=args.max_seq_len, skip_verify=args.skip_verify,
        grid=parse_grid(args.grid) if args.grid else (2, 2), grid_given=args.grid is not None, **extra,
    )


def resolve_flavour(backend: str):
    """The TensorRT flavour, None to skip engines; an explicit backend that is missing is an error."""
    if backend == "none":
        return None
    from .engine import BackendNotInstalledError, load_flavour

    try:
        return load_flavour(backend)
    except BackendNotInstalledError as error:
        if backend == "auto":
            print(f"note: {error}; engines are skipped", flush=True)
            return None
        raise


def check_out_dir(out: Path) -> None:
    if out.exists() and not manifest_io.is_build(out):
        raise ValueError(f"--out {str(out)!r} exists and is not an export.build directory; refusing to overwrite it")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished build into place, replacing an earlier build of the same name."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def engine_profiles(graph_entry: dict, max_seq_len: int, opt: dict[str, int]) -> dict:
    """(min, opt, max) per input: text dims 1..max_seq_len, everything else as exported."""
    profiles = {}
    for tensor in graph_entry["inputs"]:
        low, best, high = [], [], []
        for dim in tensor["shape"]:
            if isinstance(dim, int):
                low.append(dim), best.append(dim), high.append(dim)
            else:
                low.append(1), best.append(min(opt.get(dim, 64), max_seq_len)), high.append(max_seq_len)
        profiles[tensor["name"]] = (tuple(low), tuple(best), tuple(high))
    return profiles


def build_engines(directory: Path, body: dict, request: BuildRequest, flavour, progress: Progress) -> tuple[dict, dict]:
    """Compile every ONNX graph of the build in `directory`; returns (engines entries, tensorrt section)."""
    from .engine import EngineSpec, build_engine

    graphs, visual_tokens, layers = body["graphs"], body["schedule"]["visual_tokens"], body["source"]["text"]["layers"]
    engines, commands = {}, {}
    # optimum shapes: a typical chat prompt, and caches about as long as the prompt with its visual tokens
    opt = {"text_before": 8, "text_after": 32, **{f"past_{i}": visual_tokens + 64 for i in range(layers)}}
    for graph in names.GRAPHS:
        spec = EngineSpec(
            onnx_path=directory / graphs[graph]["file"], engine_path=directory / f"{graph}.engine",
            profiles=engine_profiles(graphs[graph], request.max_seq_len, opt),
            precision=request.precision, compute_capabilities=request.compute_capabilities,
        )
        with progress.stage(f"engine {graph} ({flavour.name})"):
            info = build_engine(spec, flavour, log=lambda *a: None)
        commands[graph] = info.pop("trtexec")
        engines[graph] = {"file": spec.engine_path.name, **info}  # info holds the written bytes' sha256 and size
    section = {"flavour": flavour.name, "version": flavour.version,
               "compute_capabilities": list(request.compute_capabilities) if flavour.name == "tensorrt-rtx" else None,
               "trtexec": commands}
    return engines, section


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "tokenizers", "numpy",
                    "tensorrt", "tensorrt-rtx-cu13-bindings"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def export_and_verify(request: BuildRequest, tmp: Path, progress: Progress) -> dict:
    """Load, patch, export the three graphs and check them; returns the manifest body (without engines)."""
    from . import pipeline, verify
    from .graphs import graph_set

    with progress.stage(f"load {request.model}"):
        model, processor, source = pipeline.load_model(request)
    with progress.stage(f"patch FiCoCo-{request.variant.upper()}"):
        plan, layout = pipeline.patch(model, processor, request)
        graphs = graph_set(model, plan, layout)
        sample = verify.make_sample(processor, model.config.image_token_id, "Describe the image.", verify.NUMPY_DTYPES[request.precision])
        args = pipeline.example_args(graphs, sample)
    large = pipeline.is_large(model)
    entries = {}
    for graph in names.GRAPHS:
        with progress.stage(f"export {graph}.onnx"):
            entries[graph] = pipeline.export_graph(graphs, graph, args[graph], tmp, request.max_seq_len, large)
    with progress.stage("verify (Polygraphy: PyTorch vs ONNX Runtime; greedy decoding end to end)"):
        parity = verify.verify(tmp, model, processor, graphs, request.precision)
    (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    if not parity["passed"] and not request.skip_verify:
        raise VerificationError(parity)
    body = describe_build(request, model, processor, plan, layout)
    body["source"]["path"] = str(source)
    body["tokenizer"] = {**pipeline.copy_tokenizer(source, tmp), **body["tokenizer"]}
    return {**body, "graphs": entries, "flops": pipeline.flops_estimate(model, plan, layout), "parity": parity}


def describe_build(request: BuildRequest, model, processor, plan, layout) -> dict:
    """The manifest's description of the model, the FiCoCo setting and the schedule."""
    from .verify import eos_ids

    text = model.config.text_config
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "model": request.model, "architecture": type(model).__name__,
            "text": {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "kv_heads": text.num_key_value_heads,
                     "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                     "vocab": text.vocab_size, "image_token_id": model.config.image_token_id,
                     "eos_token_ids": sorted(eos_ids(model))},
        },
        "variant": request.variant,
        "ficoco": {**dataclasses.asdict(plan.config), "tflops_budget": request.tflops},
        "schedule": {
            "vision": [[s.layer, s.tokens_in, s.tokens_out] for s in plan.vision],
            "language": [[s.layer, s.tokens_in, s.tokens_out] for s in plan.language_steps(layout.visual_tokens)],
            "patches_per_crop": plan.geometry.patches, "kept_per_crop": layout.kept_per_crop, "crops": layout.crops,
            "grid": list(layout.grid) if layout.grid else None, "visual_tokens": layout.visual_tokens,
        },
        "precision": request.precision, "max_seq_len": request.max_seq_len,
        "preprocess": processor.image_processor.to_dict(),
        "tokenizer": {"image_token": processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id)},
    }


class VerificationError(RuntimeError):
    def __init__(self, parity: dict):
        failed = [f"{g}.{o}" for g, r in parity["graphs"].items() for o, f in r["outputs"].items() if not f["passed"]]
        if not parity["end_to_end"]["passed"]:
            failed.append("end-to-end tokens")
        super().__init__(f"parity check failed: {', '.join(failed)} (see parity.json; --skip-verify builds anyway)")


def reload_for_verify(manifest: dict):
    """(model, processor, graphs) of an existing build, for `python -m export.verify`."""
    from . import pipeline
    from .graphs import graph_set

    request = BuildRequest(
        model=manifest["source"]["path"], variant=manifest["variant"],
        ratio=manifest["ficoco"]["ratio"] if manifest["variant"] != "none" else None,
        tokens=manifest["ficoco"]["tokens"], precision=manifest["precision"], max_seq_len=manifest["max_seq_len"],
        grid=tuple(manifest["schedule"]["grid"] or (2, 2)),
    )
    model, processor, _ = pipeline.load_model(request)
    plan, layout = pipeline.patch(model, processor, request)
    return model, processor, graph_set(model, plan, layout)


def summary(body: dict, progress: Progress, out: Path) -> str:
    schedule, lines = body["schedule"], []
    lines.append(f"\nbuild: {out}")
    lines.append(f"  visual tokens: {schedule['crops']} crop(s) x {schedule['patches_per_crop']} -> {schedule['kept_per_crop']} per crop (FiCoCo-V), "
                 f"{schedule['visual_tokens']} into the LLM" + (f", {schedule['language'][-1][2]} after layer {schedule['language'][-1][0]} (FiCoCo-L)" if schedule["language"] else ""))
    lines.append(f"  {'file':<22}{'MB':>10}")
    for kind in ("graphs", "engines"):
        for graph, entry in body.get(kind, {}).items():
            size = entry["bytes"] + sum(e["bytes"] for e in entry.get("external_data", []))
            lines.append(f"  {entry['file']:<22}{size / 1e6:>10.2f}")
    parity = body["parity"]
    if parity:
        for graph, result in parity["graphs"].items():
            for output, f in result["outputs"].items():
                if not output.startswith("present."):
                    extra = f"  kept-set overlap {f['overlap']:.3f}" if "overlap" in f else ""
                    lines.append(f"  parity {graph}.{output:<16} max_abs {f['max_abs']:.1e}  cosine {f['cosine']:.7f}{extra}")
        lines.append(f"  parity end to end: {'identical' if parity['end_to_end']['passed'] else 'DIFFERENT'} greedy tokens ({len(parity['end_to_end']['onnx_tokens'])})")
    tf = body["flops"]
    lines.append(f"  FLOPs: prefill {tf['tflops']['prefill']:.4f} TFLOPs (unreduced {tf['unreduced_tflops']['prefill']:.4f}, "
                 f"{tf['prefill_reduction']:.2f}x less); vision {tf['tflops']['vision']:.4f} TFLOPs")
    lines.append("  stages: " + ", ".join(f"{title.split(' (')[0]} {seconds:.1f}s" for title, seconds in progress.rows))
    return "\n".join(lines)


def run_build(request: BuildRequest) -> int:
    out = request.out_dir
    check_out_dir(out)
    flavour = resolve_flavour(request.backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    log = io.StringIO()
    progress = Progress(6 + (3 if flavour else 0), log)
    try:
        body = export_and_verify(request, tmp, progress)
        body["engines"], body["tensorrt"] = build_engines(tmp, body, request, flavour, progress) if flavour else ({}, None)
        body["libraries"] = library_versions()
        manifest_io.write(tmp, body)
        (tmp / "build.log").write_text(log.getvalue())
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(body, progress, out))
    return 0


def run_from_onnx(directory: Path, request: BuildRequest) -> int:
    """Engines for an existing build's ONNX graphs, on the target device; no torch or transformers."""
    body = manifest_io.read(directory)
    manifest_io.check_files(directory, body["graphs"])
    flavour = resolve_flavour(request.backend)
    if flavour is None:
        raise ValueError("--from-onnx needs a TensorRT backend: --backend tensorrt or tensorrt-rtx")
    request = BuildRequest(**{**vars(request), "precision": body["precision"], "max_seq_len": body["max_seq_len"]})
    progress = Progress(3, io.StringIO())
    body["engines"], body["tensorrt"] = build_engines(directory, body, request, flavour, progress)
    for key in ("schema", "schema_version"):
        body.pop(key)
    manifest_io.write(directory, body)
    print(summary(body, progress, directory))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .engine import EngineBuildError

    try:
        if args.from_onnx is not None:
            return run_from_onnx(args.from_onnx, make_request(argparse.Namespace(**{**vars(args), "variant": "none", "ratio": None, "tokens": None, "tflops": None})))
        if args.variant != "none" and args.ratio is None and args.tokens is None and args.tflops is None:
            raise ValueError("give --ratio R, --tokens N or --tflops B (or --variant none)")
        return run_build(make_request(args))
    except (ValueError, manifest_io.BuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (VerificationError, EngineBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
