"""Check a build on this machine's NVIDIA GPU: TensorRT, ONNX Runtime CUDA and CPU, side by side.

    python scripts/gpu_check.py --engine-dir builds/NAME [--image photo.jpg] [--prompt "..."] [--json report.json]

Run it once on a machine with an NVIDIA GPU. It uses the build's engines if they fit this GPU and
TensorRT (the runtime's own check), else compiles engines for this GPU into a copy of the build
(`python -m export.build --from-onnx COPY --backend tensorrt|tensorrt-rtx`; `--rebuild` forces it).
It then answers the same prompt about the same image on

* TensorRT (the build's flavour),
* ONNX Runtime with CUDAExecutionProvider (when onnxruntime-gpu is installed),
* ONNX Runtime on the CPU, the reference,

and prints, for each, the parity against the CPU (image-features cosine, kept-set overlap of
FiCoCo-V's kept patch positions, greedy-token agreement: the share of the reference's tokens
generated identically before the first difference) and the timings of a second, warm call
(vision, prefill, time to first token, decode tokens/s), as a table and as JSON. A backend that
cannot run says why in its row. Needs only the runtime install (no torch), plus TensorRT and
cuda-python for the TensorRT row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python scripts/gpu_check.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import backend as backend_module  # noqa: E402
from runtime import backend_ort, names  # noqa: E402
from runtime.manifest import Build, BuildError  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", required=True, type=Path, help="build directory written by python -m export.build")
    p.add_argument("--image", default=None, help="image file (default: a generated test picture)")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rebuild", action="store_true", help="compile engines for this GPU even if the build's fit")
    p.add_argument("--work", type=Path, default=None, help="where a rebuilt copy goes (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    return p.parse_args(argv)


def test_picture() -> Any:
    """A deterministic 500x400 picture (gradients and seeded noise) when no --image is given."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:400, 0:500]
    rgb = np.stack([x * 255 / 500, y * 255 / 400, (x + y) % 256], axis=-1) + rng.normal(0, 20, (400, 500, 3))
    return Image.fromarray(rgb.clip(0, 255).astype("uint8"))


def engines_for_this_gpu(directory: Path, rebuild: bool, work: Path) -> tuple[Path | None, str]:
    """(build whose engines run here, how they were got); (None, why) when TensorRT cannot run here at all."""
    build = Build.from_directory(directory)
    problem = backend_module.tensorrt_problem(build)
    if problem is None and not rebuild:
        return directory, "the build's engines"
    fits_after_rebuild = problem is None or isinstance(problem, (backend_module.EngineMismatchError, BuildError))
    if not fits_after_rebuild:
        return None, " ".join(str(problem).split())
    flavour = "tensorrt" if backend_module.has_module("tensorrt") else "tensorrt-rtx"
    copy = work / directory.name
    shutil.copytree(directory, copy)
    from export.build import main as export_main

    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = export_main(["--from-onnx", str(copy), "--backend", flavour])
    if code != 0:
        return None, f"--from-onnx failed ({code}): {log.getvalue()[-300:]}"
    return copy, f"compiled here with {flavour} into {copy}"


class _CpuOnly:
    """onnxruntime as the runtime sees it, with only the CPU provider: the CPU reference on a GPU machine."""

    def __init__(self, ort: Any):
        self._ort = ort

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ort, name)

    def get_available_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def open_pipeline(directory: Path, kind: str) -> Pipeline:
    """"tensorrt", "onnxruntime-cuda" or "onnxruntime-cpu"."""
    if kind == "tensorrt":
        return Pipeline.from_build(directory, backend="tensorrt")
    if kind == "onnxruntime-cuda":
        ort = backend_ort.import_ort()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise backend_module.BackendNotInstalledError("onnxruntime-gpu is not installed (no CUDAExecutionProvider)")
        return Pipeline.from_build(directory, backend="onnxruntime")
    real = backend_ort.import_ort
    backend_ort.import_ort = lambda: _CpuOnly(real())
    try:
        return Pipeline.from_build(directory, backend="onnxruntime")
    finally:
        backend_ort.import_ort = real


def vision_outputs(pipe: Pipeline, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image_features [n, D] (the prompt's layout) and kept_positions [crops, k] on the host, from the pipeline's own backend."""
    backend = pipe.backend
    if hasattr(backend, "vision_outputs"):  # TensorRT
        backend.vision(pixel_values)
        return backend.vision_outputs()
    session = backend.sessions[names.VISION]
    pixels = backend._input(names.VISION, names.PIXEL_VALUES, pixel_values)
    features, kept = session.run([names.IMAGE_FEATURES, names.KEPT_POSITIONS], {names.PIXEL_VALUES: pixels})
    return (backend_ort.from_bf16_bits(features) if features.dtype == np.uint16 else features.astype(np.float32)), kept


def parity(reference: dict, row: dict) -> dict:
    """Image-features cosine, kept-set overlap (mean over crops) and greedy-token agreement against the reference."""
    a, b = reference["features"].astype(np.float64).ravel(), row["features"].astype(np.float64).ravel()
    overlaps = [len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(reference["kept"], row["kept"])]
    expected, got = reference["tokens"], row["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))
    return {"features_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "kept_overlap": float(np.mean(overlaps)),
            "token_agreement": same / max(len(expected), 1), "tokens_identical": list(expected) == list(got)}


def measure(pipe: Pipeline, image: Any, prompt: str, max_new_tokens: int) -> dict:
    pixels, _ = pipe.prepare(image, prompt, max_new_tokens)
    features, kept = vision_outputs(pipe, pixels.pixel_values)
    pipe(image, prompt, max_new_tokens=max_new_tokens)  # warm-up: first-call allocation, JIT compilation
    result = pipe(image, prompt, max_new_tokens=max_new_tokens)
    t = result.timings
    return {"backend": result.backend, "features": features, "kept": kept, "tokens": list(result.token_ids),
            "timings": {"vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "ttft_ms": t.time_to_first_token_ms,
                        "decode_tokens_per_s": t.decode_tokens_per_s}}


def run(args: argparse.Namespace, work: Path) -> dict:
    image = args.image or test_picture()
    trt_build, how = engines_for_this_gpu(args.engine_dir, args.rebuild, work)
    rows: dict[str, dict] = {}
    for kind in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"):
        directory = trt_build if kind == "tensorrt" else args.engine_dir
        if directory is None:
            rows[kind] = {"skipped": how}
            continue
        try:
            with open_pipeline(directory, kind) as pipe:
                rows[kind] = measure(pipe, image, args.prompt, args.max_new_tokens)
        except (backend_module.BackendNotInstalledError, BuildError, backend_module.BackendError) as error:
            rows[kind] = {"skipped": " ".join(str(error).split())}
    reference = rows["onnxruntime-cpu"]
    report = {"build": str(args.engine_dir), "tensorrt_engines": how, "prompt": args.prompt, "backends": {}}
    for kind, row in rows.items():
        entry = {k: v for k, v in row.items() if k not in ("features", "kept")}
        if "skipped" not in row and "skipped" not in reference:
            entry["parity"] = parity(reference, row)
        report["backends"][kind] = entry
    return report


def table(report: dict) -> str:
    lines = [f"build {report['build']}; TensorRT engines: {report['tensorrt_engines']}",
             f"{'backend':<18}{'cosine':>10}{'kept':>8}{'tokens':>8}{'vision ms':>11}{'prefill ms':>12}{'TTFT ms':>10}{'decode tok/s':>14}"]
    for kind, row in report["backends"].items():
        if "skipped" in row:
            lines.append(f"{kind:<18}skipped: {row['skipped']}")
            continue
        p, t = row["parity"], row["timings"]
        rate = f"{t['decode_tokens_per_s']:.1f}" if t["decode_tokens_per_s"] else "-"
        lines.append(f"{kind:<18}{p['features_cosine']:>10.6f}{p['kept_overlap']:>8.3f}{p['token_agreement']:>8.3f}"
                     f"{t['vision_ms']:>11.1f}{t['prefill_ms']:>12.1f}{t['ttft_ms']:>10.1f}{rate:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
            report = run(args, work)
    except (BuildError, backend_module.BackendNotInstalledError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(table(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if "skipped" not in report["backends"]["onnxruntime-cpu"] else 1


if __name__ == "__main__":
    sys.exit(main())
