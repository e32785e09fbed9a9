"""Hugging Face's torchvision image processors, run in a subprocess for comparison tests.

torchvision 0.28.0 is installed apart from the project's environment, in ``.tv`` at the repository root
(``pip install --no-deps --target .tv torchvision==0.28.0``), so that ``AutoProcessor`` picks the PIL image
processors everywhere else. Its compiled operators do not load with the local CPU torch; torchvision still
imports once the schemas of ``torchvision::nms`` and ``torchvision::qnms`` are defined (:func:`import_torchvision`).

transformers decides at import time whether torchvision is available, so importing it inside the test process
would change which processor every later test gets. :func:`hf_torchvision` therefore runs the processors in a
fresh interpreter (this file run as a script) and hands back numpy arrays.

Inputs travel as PNG files, which keep the PIL mode (L, LA, P with ``transparency``, RGBA, RGB). A case whose
``how`` is ``"load_image"`` is opened with HF's ``load_image`` (EXIF transpose, ``convert("RGB")``), the
runtime's own decoder for a path: a path string given to the torchvision processor would be decoded by
``torchvision.io``, whose image extension does not load here either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TV_DIR = REPO / ".tv"
INSTALL = "pip install --no-deps --target .tv torchvision==0.28.0"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}


def skip_reason() -> str | None:
    """Why the torchvision comparisons cannot run here, or None."""
    if not (TV_DIR / "torchvision" / "__init__.py").is_file():
        return f"torchvision is not installed in {TV_DIR}: run `{INSTALL}` in the repository root"
    return None


def require() -> None:
    """Skip the calling test when ``.tv`` holds no torchvision (the reason names the install command)."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)


def import_torchvision() -> Any:
    """Define the two operator schemas, put ``.tv`` first on sys.path and import torchvision (subprocess only)."""
    import torch

    library = torch.library.Library("torchvision", "DEF")  # kept alive on the torch module below
    for schema in _SCHEMAS.values():
        library.define(schema)
    torch._ficoco_torchvision_schemas = library  # type: ignore[attr-defined]
    sys.path.insert(0, str(TV_DIR))
    import torchvision

    if Path(torchvision.__file__).resolve().parents[1] != TV_DIR.resolve():
        raise RuntimeError(f"imported torchvision from {torchvision.__file__}, not from {TV_DIR}")
    return torchvision


def hf_torchvision(processors: dict[str, dict[str, Any]], cases: dict[str, dict[str, Any]],
                   workdir: Path) -> dict[str, dict[str, Any]]:
    """Run HF torchvision image processors in a subprocess.

    ``processors``: {kind: {"class": "CLIPImageProcessor" | "LlavaImageProcessor" | "LlavaNextImageProcessor",
    "kwargs": {...}}}. ``cases``: {name: {"kind": kind, "image": PIL image or path, "how": "pil" | "load_image"}}.
    Returns {name: {"pixel_values": float32 array (the first image's), "image_sizes": (h, w) or None}} plus
    ``"_meta"``: what the subprocess saw: torchvision's version and file, each processor's class, and
    ``manifest``: {kind: the ``preprocess`` section export.build would write for that processor}.
    """
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"processors": processors, "cases": {}}
    for name, case in cases.items():
        image = case["image"]
        if isinstance(image, (str, os.PathLike)):
            file = str(image)
        else:
            file = str(workdir / f"{name}.png")
            image.save(file)
        spec["cases"][name] = {"kind": case["kind"], "file": file, "how": case.get("how", "pil")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, str(workdir)], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchvision processors failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    import numpy as np

    results: dict[str, dict[str, Any]] = {"_meta": json.loads((workdir / "meta.json").read_text())}
    with np.load(workdir / "out.npz") as arrays:
        for name in cases:
            sizes = arrays[f"{name}/image_sizes"] if f"{name}/image_sizes" in arrays else None
            results[name] = {"pixel_values": arrays[f"{name}/pixel_values"],
                             "image_sizes": tuple(int(v) for v in sizes) if sizes is not None else None}
    return results


def _worker(workdir: Path) -> None:
    """Subprocess side of :func:`hf_torchvision`."""
    import numpy as np

    torchvision = import_torchvision()
    import transformers
    from PIL import Image
    from transformers.image_utils import load_image

    spec = json.loads((workdir / "spec.json").read_text())
    processors = {kind: getattr(transformers, entry["class"])(**entry["kwargs"])
                  for kind, entry in spec["processors"].items()}
    meta = {"torchvision": torchvision.__version__, "torchvision_file": torchvision.__file__,
            "classes": {kind: type(p).__name__ for kind, p in processors.items()},
            # what export.build records for this processor: its settings and the backend of its class
            "manifest": {kind: {**p.to_dict(), "backend": p.backend} for kind, p in processors.items()}}
    arrays: dict[str, np.ndarray] = {}
    for name, case in spec["cases"].items():
        if case["how"] == "load_image":
            image = load_image(case["file"])
        else:
            image = Image.open(case["file"])
            image.load()
        out = processors[case["kind"]](images=image, return_tensors="np")
        arrays[f"{name}/pixel_values"] = np.asarray(out["pixel_values"][0], dtype=np.float32)
        if "image_sizes" in out:
            arrays[f"{name}/image_sizes"] = np.asarray(out["image_sizes"][0])
    np.savez(workdir / "out.npz", **arrays)
    (workdir / "meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
