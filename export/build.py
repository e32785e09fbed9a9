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
import sys
import time
from pathlib import Path

from runtime import manifest as manifest_io
from runtime.manifest import Build

from . import gates
from .reload import source_entry
from .request import (BACKENDS, PRECISIONS, QUANT_METHODS, VARIANTS, WEIGHTS, BuildRequest, ModelCheck, parse_capability,
                      parse_grid)
from .from_onnx import ENGINELESS, build_engines, memory_plan, run_from_onnx  # every build, and --from-onnx on the device
from .report import Progress, resolve_flavour, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llava-1.5", help="preset name or local Hugging Face LLaVA directory")
    p.add_argument("--variant", default="v", choices=VARIANTS)
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens kept, in (0, 1]")
    amount.add_argument("--tokens", type=int, help="visual tokens kept per image")
    amount.add_argument("--tflops", type=float, help="LLM prefill budget in TFLOPs (scripts/flops.py convention)")
    p.add_argument("--out", type=Path, help="build directory (default: builds/MODEL-VARIANT-rRATIO-PRECISION)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="the graphs' float type (default fp32, "
                   "or the --weights float type); with --from-onnx, the build's")
    p.add_argument("--weights", default=None, choices=WEIGHTS, help="the LLM's linear weights: int8 per channel or int4 "
                   "block-wise, weight-only (default: the precision's float)")
    p.add_argument("--block-size", type=int, default=32, help="int4: input elements per scale (a power of two >= 16)")
    p.add_argument("--quant-method", default="rtn", choices=QUANT_METHODS,
                   help="rtn (round to nearest) or hqq (int4, calibration-free, slower to build)")
    p.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower's linear layers")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="TensorRT flavour for the engines")
    p.add_argument("--compute-capability", nargs="+", default=None, metavar="SM", help="TensorRT-RTX targets, e.g. 8.6 12.0")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest sequence (prompt and answer) the build "
                   "serves (default: an unreduced image's visual tokens plus 512, rounded up to 1024, at least 2048: "
                   "2048 for LLaVA-1.5, 4096 for LLaVA-NeXT at 2x2); with --from-onnx, the build's")
    p.add_argument("--grid", default=None, help="LLaVA-NeXT anyres grid fixed by the build, rows x cols (default 2x2)")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--allow-parity-failure", action="store_true",
                       help="verify, and publish even if a parity check fails (the manifest marks the build as failed)")
    check.add_argument("--no-verify", action="store_true", help="skip the parity verification (required for bf16)")
    p.add_argument("--from-onnx", type=Path, metavar="DIR", help="compile engines for an existing build (no torch)")
    return p.parse_args(argv)


def make_request(args: argparse.Namespace) -> BuildRequest:
    capabilities = tuple(parse_capability(c) for c in args.compute_capability) if args.compute_capability else None
    extra = {"compute_capabilities": capabilities} if capabilities else {}
    if args.max_seq_len is not None:
        extra["max_seq_len"] = args.max_seq_len
    return BuildRequest(
        model=args.model, variant=args.variant, ratio=args.ratio, tokens=args.tokens, tflops=args.tflops, out=args.out,
        precision=args.precision or (args.weights if args.weights in ("fp32", "fp16") else "fp32"),
        backend=args.backend, weights=args.weights, block_size=args.block_size,
        quant_method=args.quant_method, quantize_vision=args.quantize_vision,
        allow_parity_failure=args.allow_parity_failure, verify=not args.no_verify,
        grid=parse_grid(args.grid) if args.grid else (2, 2), grid_given=args.grid is not None, **extra,
    )


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "tokenizers", "numpy",
                    "tensorrt", "tensorrt-rtx-cu13-bindings"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def export_and_verify(checked: ModelCheck, tmp: Path, progress: Progress) -> dict:
    """Load, patch, export the graphs of the checked plan and verify them; returns the manifest body (without engines)."""
    from .trace import pipeline, verify
    from .trace.graphs import graph_set

    request = checked.request
    with progress.stage(f"load {request.model}"):
        model, processor, source = pipeline.load_model(request)
    with progress.stage(patch_title(checked.plan)):
        patch_plan, plan = pipeline.patch(model, processor, request, checked.plan)
        graphs = graph_set(model, patch_plan, plan)
        pixel_dtype = verify.NUMPY_DTYPES.get(request.precision, verify.NUMPY_DTYPES["fp32"])  # bf16: cast in example_args
        sample = verify.make_sample(processor, model.config.image_token_id, verify.COMPARE_PROMPTS[0], pixel_dtype)
        args = pipeline.example_args(graphs, sample)
    large = pipeline.is_large(model)
    entries = {}
    for graph in graphs.exported:
        with progress.stage(f"export {graph}.onnx"):
            entries[graph] = pipeline.export_graph(graphs, graph, args[graph], tmp, plan.max_seq_len, large)
    body = describe_build(request, model, processor, plan, checked.budget)
    body["source"].update(source_entry(request.model, source))
    body["tokenizer"] = {**pipeline.copy_tokenizer(source, tmp), **body["tokenizer"]}
    body["graphs"], body["embedding"], body["quantization"] = entries, pipeline.embedding_entry(graphs, tmp, entries), None
    parity = None
    if request.verify:  # the runtime's own backend, reading the manifest about to be written
        with progress.stage("verify (Polygraphy: PyTorch vs ONNX Runtime; greedy and teacher-forced decoding)"):
            parity = verify.verify(Build.from_manifest(tmp, body), model, processor, graphs)
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        if not parity["passed"] and not request.allow_parity_failure:
            raise VerificationError(parity)
    if request.quantized:
        quantize_and_measure(request, tmp, graphs, body, model, processor, progress)
    return {**body, "flops": pipeline.flops_estimate(model, plan), "parity": parity}


def quantize_and_measure(request: BuildRequest, tmp: Path, graphs, body: dict, model, processor, progress: Progress) -> None:
    """--weights int8/int4, after the float graphs passed their gates: quantize them in place, find the
    embedding table again, and measure the quantized chain against the fp32 PyTorch model (updates the
    manifest body's graphs, embedding and quantization)."""
    from .trace import pipeline, quality
    from .trace.graphs import graph_set
    from .quantize import quantize_build

    with progress.stage(f"quantize {request.weights} ({request.quant_method}, block {request.block_size})"):
        entries = body["graphs"]
        reports = quantize_build(tmp, list(entries), request, graphs.tied, log=lambda line: print(line, file=progress.log))
        for graph in reports:
            entries[graph] = pipeline.describe(tmp / f"{graph}.onnx")
        body["embedding"] = pipeline.embedding_entry(graphs, tmp, entries)
    record = body["quantization"] = {"weights": request.weights, "method": request.quant_method, "block_size": request.block_size,
                                     "vision": request.quantize_vision, "graphs": reports, "quality": None}
    if request.verify:
        with progress.stage("measure the quantized build against the fp32 PyTorch model"):
            reference, reference_graphs = model, graphs
            if request.precision != "fp32":
                reference, processor, _ = pipeline.load_model(dataclasses.replace(request, precision="fp32"))
                reference_graphs = graph_set(reference, *pipeline.patch(reference, processor, request))
            record["quality"] = quality.measure(Build.from_manifest(tmp, body), reference, processor, reference_graphs,
                                                request.weights, request.quantize_vision)
        (tmp / "quality.json").write_text(json.dumps(record["quality"], indent=2) + "\n")
        if not record["quality"]["passed"] and not request.allow_parity_failure:
            print(f"note: {request.weights} {request.quant_method} changed this model's answers beyond the gate; "
                  "--weights int8, or --quant-method hqq (ONNX Runtime only), keep more", flush=True)
            raise VerificationError({"passed": False, "graphs": {}, "end_to_end": {"passed": True},
                                     "quantization": record["quality"]})


def patch_title(plan) -> str:
    """The patch stage's title: what is patched, or that nothing is reduced."""
    if plan.variant == "none":
        return "prepare the graphs, unreduced (no FiCoCo step)"
    return f"patch FiCoCo-{plan.variant.upper()}"


def stage_count(checked: ModelCheck, engines: bool) -> int:
    """Every numbered stage of a build, known before the first: load, patch, one export per graph, verify,
    quantize (and measure), one engine per graph that has one."""
    from runtime import names

    graphs = names.graph_names(checked.plan, embed=not checked.tied)
    request = checked.request
    compiled = [g for g in graphs if g not in ENGINELESS] if engines else []
    return 2 + len(graphs) + request.verify + request.quantized * (1 + request.verify) + len(compiled)


def describe_build(request: BuildRequest, model, processor, plan, budget: float | None = None) -> dict:
    """The manifest's description of the model, the FiCoCo setting and the schedule."""
    from .trace.verify import eos_ids

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "model": request.model, "architecture": type(model).__name__,
            "text": {"image_token_id": model.config.image_token_id, "eos_token_ids": sorted(eos_ids(model))},
        },
        "variant": request.variant,
        "ficoco": {**dataclasses.asdict(model.ficoco_plan.config), "tflops_budget": budget},
        "schedule": plan.to_dict(),
        "precision": request.precision,
        "preprocess": {**processor.image_processor.to_dict(), "backend": processor.image_processor.backend},
        "tokenizer": {"image_token": processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id)},
    }


class VerificationError(RuntimeError):
    """A parity check failed; `parity` is the record, `evidence` where parity.json and build.log were kept."""

    def __init__(self, parity: dict, evidence: Path | None = None):
        self.parity, self.evidence = parity, evidence
        where = f"see {evidence}/parity.json" if evidence else "see parity.json"
        super().__init__(f"parity check failed: {', '.join(gates.failing_rows(parity))} ({where}; "
                         "--allow-parity-failure publishes anyway, marked as failed)")


def run_build(request: BuildRequest) -> int:
    """Check everything that can be checked, then build in a workspace beside --out (export.workspace):
    published at --out only when every stage succeeded; a failed verification keeps its evidence."""
    from .request import check_model, check_targets
    from .workspace import Workspace

    out = request.out_dir
    workspace = Workspace(out)  # refuses an --out that cannot be written or replaced
    flavour = resolve_flavour(request.backend)
    check_targets(request, flavour)
    checked = check_model(request)  # resolves the plan: every stage is known from here
    log = io.StringIO()
    progress = Progress(stage_count(checked, engines=flavour is not None), log)
    with workspace as ws:
        try:
            body = export_and_verify(checked, ws.build, progress)
        except VerificationError as error:
            (ws.build / "build.log").write_text(log.getvalue())
            raise VerificationError(error.parity, ws.keep_failed()) from None
        body["engines"], body["tensorrt"] = (build_engines(ws.build, body, checked.request, flavour, progress) if flavour
                                             else ({}, None))
        body["memory"] = memory_plan(ws.build, body)
        body["libraries"] = library_versions()
        manifest_io.write(ws.build, body)
        (ws.build / "build.log").write_text(log.getvalue())
        ws.publish()
    print(summary(body, progress, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .engine import EngineBuildError
    from .workspace import signals

    streams = sys.stdout, sys.stderr  # a signal can land inside a stage's redirect before its undo is registered

    def fail(error: BaseException, code: int) -> int:
        sys.stdout, sys.stderr = streams
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, whatever the message
        return code

    with signals():  # SIGTERM raises like Ctrl-C: the workspace is removed on the way out
        try:
            if args.from_onnx is not None:
                manifest_io.Build.from_directory(args.from_onnx).check_listed_io()  # the manifest, as it enters
                engines_only = {"variant": "none", "ratio": None, "tokens": None, "tflops": None, "no_verify": True}
                request = make_request(argparse.Namespace(**{**vars(args), **engines_only}))
                return run_from_onnx(args.from_onnx, request, capabilities_given=args.compute_capability is not None,
                                     given={"max_seq_len": args.max_seq_len, "precision": args.precision})
            if args.variant != "none" and args.ratio is None and args.tokens is None and args.tflops is None:
                raise ValueError("give --ratio R, --tokens N or --tflops B (or --variant none)")
            return run_build(make_request(args))
        except (ValueError, manifest_io.BuildError) as error:
            return fail(error, 2)
        except (VerificationError, EngineBuildError, OSError) as error:  # OSError: e.g. a full disk
            return fail(error, 1)
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM as workspace.Interrupted
            return fail(f"{error or 'interrupted'}; its temporary directory was removed", getattr(error, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
