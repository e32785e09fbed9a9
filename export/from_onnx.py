"""TensorRT engines for a build's ONNX graphs: `build_engines` (every build) and `--from-onnx` (on the device).

    python -m export.build --from-onnx builds/NAME --backend tensorrt       # Jetson: JetPack's TensorRT
    python -m export.build --from-onnx builds/NAME --backend tensorrt-rtx   # RTX: for this GPU

`--from-onnx` needs neither torch nor transformers nor onnx: the runtime install (numpy and the
`runtime` package, which reads the manifest), `export/` (this module, `engine.py`, `request.py`,
`build.py`) and TensorRT. With TensorRT-RTX it builds for the GPU it runs on (ComputeCapability
CURRENT), or for `--compute-capability` when given, or, with no GPU visible, for the default RTX
targets; standard TensorRT always builds for the local GPU. The manifest records the compute
capability actually targeted (the local GPU's where one is visible) and the TensorRT version.
`--max-seq-len` and `--precision` were fixed when the graphs were exported: given here, they must be
the build's. The manifest's memory plan is computed again for the new engines (`memory_plan`, from the
build's copy of config.json and, without onnx, the weight bytes the build measured).

Nothing changes unless everything succeeds: the new build is assembled in an `export.workspace`
beside the build (the graphs and tokenizer hard-linked, copied where links are not possible), the
engines, manifest and build.log are written there, and it replaces the build in one exchange
(`Workspace.publish`); on any failure the workspace is removed and the build is as it was.
The manifest's `trtexec` lines use paths relative to the build directory (`trtexec_cwd: "."`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ficoco.plan import BuildPlan
from runtime import manifest as manifest_io
from runtime import names, trtlib
from runtime.device import driver

from .engine import CURRENT, EngineSpec, Flavour, build_engine
from .request import DEFAULT_COMPUTE_CAPABILITIES, BuildRequest


def dim_ranges(plan: BuildPlan, graph: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dim of `graph`, bounded by the prompt: the whole prompt (text before,
    visual tokens, text after) is at most max_seq_len at layer 0, less what FiCoCo-L removed at later
    segments. The cache buffers are bound whole at every step (prefill: past_length 0), so `capacity`
    is fixed at the segment's capacity. Optimum: a typical chat prompt (8 tokens before, 32 after)."""
    kind, _, index = graph.partition(".")
    segment = plan.segments[int(index) - (kind == "reduce") if index else 0]  # reduce.s takes decoder.{s-1}'s output
    longest = segment.capacity  # tokens into this graph at most
    typical = min(plan.segment_tokens(segment.index, plan.prompt_length(8, 32)), longest)
    ranges = {"tokens": (1, typical, longest), "capacity": (longest, longest, longest),
              "text_before": (1, min(8, plan.max_seq_len), plan.max_seq_len)}
    if kind == "reduce":  # the prompt holds the step's visual tokens and at least one text token before them
        tokens_in = segment.step.tokens_in
        ranges["tokens"] = (tokens_in + 1, max(typical, tokens_in + 1), longest)
        ranges["text_before"] = (1, 8, longest - tokens_in)
    return ranges


def engine_profiles(graph_entry: dict, ranges: dict[str, tuple[int, int, int]]) -> dict:
    """(min, opt, max) per input from the graph's listed shapes: named dims from `ranges`, the rest as exported."""
    profiles = {}
    for tensor in graph_entry["inputs"]:
        shape = [(d, d, d) if isinstance(d, int) else ranges[d] for d in tensor["shape"]]
        profiles[tensor["name"]] = tuple(tuple(dims[i] for dims in shape) for i in range(3))
    return profiles


ENGINELESS = (names.EMBED,)  # the runtime looks embeddings up in the table; no engine needed


def build_engines(directory: Path, body: dict, request: BuildRequest, flavour: Flavour, progress: Any) -> tuple[dict, dict]:
    """Compile every ONNX graph of the build in `directory`; returns (engines entries, tensorrt section).

    TensorRT's log goes to `progress.log` (the build's build.log)."""
    graphs, engines, commands, plan = body["graphs"], {}, {}, BuildPlan.from_dict(body["schedule"])
    for graph in [g for g in graphs if g not in ENGINELESS]:
        spec = EngineSpec(
            onnx_path=directory / graphs[graph]["file"], engine_path=directory / f"{graph}.engine",
            profiles=engine_profiles(graphs[graph], dim_ranges(plan, graph)), precision=request.precision,
            compute_capabilities=request.compute_capabilities if flavour.is_rtx else (),
        )
        with progress.stage(f"engine {graph} ({flavour.name})"):
            info = build_engine(spec, flavour, log=lambda line: print(line, file=progress.log), base=directory)
        commands[graph] = info.pop("trtexec")
        info["device_memory"] = device_memory(flavour, spec.engine_path)
        engines[graph] = {"file": spec.engine_path.name, **info}  # info holds the written bytes' sha256 and size
    section = {"flavour": flavour.name, "version": flavour.version,
               "compute_capabilities": engines[names.VISION]["compute_capabilities"],
               "trtexec": commands, "trtexec_cwd": "."}
    return engines, section


def device_memory(flavour: Flavour, path: Path) -> int | None:
    """The engine's device memory for its optimization profile (activations and scratch, weights not
    included), as TensorRT reports it once the engine is loaded; None where it cannot be loaded (no
    GPU, or a compute capability this GPU lacks: the build machine of an ahead-of-time RTX build)."""
    found = driver()
    if found is None or found.devices < 1:
        return None
    trt = flavour.module
    try:
        engine = trt.Runtime(trtlib.logger(trt, flavour.name)).deserialize_cuda_engine(path.read_bytes())
        return int(engine.get_device_memory_size_for_profile_v2(0)) if engine is not None else None
    except Exception:  # noqa: BLE001  (a report, never a reason to fail the build)
        return None


def device_targets(flavour: Flavour, log: Any = print) -> tuple[str, ...]:
    """TensorRT-RTX targets when none are given: the GPU this runs on, else (no GPU visible) the default set."""
    if not flavour.is_rtx:
        return ()
    found = driver()
    if found is not None and found.devices > 0:
        return (CURRENT,)
    log(f"note: no GPU visible; building for compute capabilities {', '.join(DEFAULT_COMPUTE_CAPABILITIES)}")
    return DEFAULT_COMPUTE_CAPABILITIES


def link_tree(directory: Path, target: Path, skip: set[str]) -> None:
    """Hard-link (or, where links are not possible, copy) every file of `directory` into `target`, except `skip`."""
    for root, _, files in os.walk(directory):
        target_dir = target / Path(root).relative_to(directory)
        target_dir.mkdir(exist_ok=True)
        for name in files:
            if str((Path(root) / name).relative_to(directory)) in skip:
                continue
            try:
                os.link(Path(root) / name, target_dir / name)
            except OSError:
                shutil.copy2(Path(root) / name, target_dir / name)


FIXED_AT_EXPORT = ("max_seq_len", "precision")  # the graphs' shapes and float type


def check_fixed(plan: BuildPlan, precision: str, given: dict[str, object]) -> None:
    """--max-seq-len and --precision were fixed when the ONNX was exported: given with --from-onnx (not None),
    they must be the build's; ValueError naming each that differs."""
    build = {"max_seq_len": plan.max_seq_len, "precision": precision}
    differ = [f"--{key.replace('_', '-')} {given[key]} (the build's is {build[key]})"
              for key in FIXED_AT_EXPORT if given.get(key) is not None and given[key] != build[key]]
    if differ:
        them = "it" if len(differ) == 1 else "them"
        raise ValueError(f"--from-onnx compiles the graphs as they were exported: {', '.join(differ)}; drop {them}, "
                         f"or export again with {them}")


def memory_plan(directory: Path, body: dict) -> dict | None:
    """`export.memory.memory_section` of the build in `directory` with its engines, from the build's copy of the
    model's config.json (a build and `--from-onnx` both write it so). None for a build older than its config.json."""
    entry = manifest_io.tokenizer_files(body).get("config.json")
    if entry is None:
        return None
    from .memory import memory_section

    manifest_io.check_files(directory, {"config.json": entry}, "tokenizer")
    return memory_section(directory, body, json.loads((directory / "config.json").read_text()))


def run_from_onnx(directory: Path, request: BuildRequest, capabilities_given: bool = False,
                  given: dict[str, object] | None = None) -> int:
    """Engines for an existing build's ONNX graphs, on the target device; no torch or transformers. `given`:
    the command line's --max-seq-len and --precision (None where not given), which must be the build's."""
    from .report import Progress, resolve_flavour, summary
    from .request import check_targets
    from .workspace import Workspace

    body = manifest_io.read(directory)
    manifest_io.check_files(directory, body["graphs"])
    plan = BuildPlan.from_dict(body["schedule"])
    check_fixed(plan, body["precision"], given or {})
    flavour = resolve_flavour(request.backend)
    if flavour is None:
        raise ValueError("--from-onnx needs a TensorRT backend: --backend tensorrt or tensorrt-rtx")
    if capabilities_given:
        check_targets(request, flavour)
    targets = request.compute_capabilities if capabilities_given else device_targets(flavour)
    request = dataclasses.replace(request, precision=body["precision"], max_seq_len=plan.max_seq_len,
                                  compute_capabilities=targets, verify=False)  # engines only: nothing to verify
    old_engines = {entry["file"] for entry in (body.get("engines") or {}).values()}
    rewritten = {manifest_io.FILENAME, "build.log", *old_engines, *(f"{g}.engine" for g in body["graphs"])}
    progress = Progress(len([g for g in body["graphs"] if g not in ENGINELESS]), io.StringIO())
    with Workspace(directory) as ws:
        link_tree(directory, ws.build, rewritten)
        body["engines"], body["tensorrt"] = build_engines(ws.build, body, request, flavour, progress)
        body["memory"] = memory_plan(ws.build, body)  # its engine bytes and device memory: these engines'
        if body["memory"] is None:
            print("note: the memory plan is left out of the manifest: it needs the build's config.json, which "
                  "builds made before it was copied lack", flush=True)
        for key in ("schema", "schema_version"):
            body.pop(key, None)
        manifest_io.write(ws.build, body)
        previous = (directory / "build.log").read_text() if (directory / "build.log").is_file() else ""
        header = f"\n# --from-onnx {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {flavour.name} {flavour.version}\n"
        (ws.build / "build.log").write_text(previous + header + progress.log.getvalue())
        ws.publish()
    print(summary(body, progress, directory))
    return 0
