"""The backends' errors, the TensorRT module table and the install hints: one copy, for the runtime and the export.

Kept apart from `runtime.backend` so that the backends (`backend_ort`, `backend_trt`, `cuda`), the
TensorRT layer (`runtime.trtlib`) and the export's engine builder (`export.engine`) import them without
importing the module that chooses between backends. Imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt-rtx"  # the TensorRT flavours
# The modules of each flavour, tried in order. tensorrt_rtx_bindings: the pip wheels (the `rtx` extra);
# tensorrt_rtx: the SDK tarball's wheel.
TRT_MODULES = {TENSORRT: ("tensorrt",), TENSORRT_RTX: ("tensorrt_rtx_bindings", "tensorrt_rtx")}
HINTS = {
    "onnxruntime": "ONNX Runtime is not installed: pip install 'ficoco-edge[runtime]' (CPU), or pip install 'ficoco-edge[gpu]' (CUDA)",
    TENSORRT: "TensorRT is not installed: it ships with JetPack; elsewhere pip install 'ficoco-edge[trt]'",
    TENSORRT_RTX: "TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'",
    "cuda": "the TensorRT backend needs cuda-python for device memory: pip install 'ficoco-edge[cuda12]' (CUDA 12 "
            "drivers, JetPack 6) or 'ficoco-edge[cuda13]' (CUDA 13 drivers, Jetson Thor), or torch built with CUDA",
}
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on every Jetson (L4T), JetPack 5, 6 and 7


class BackendNotInstalledError(ValueError):
    """The requested backend (or what it needs) is not installed or cannot run here; the message says what to do."""


class UnsupportedVersionError(BackendNotInstalledError):
    """The installed TensorRT is not a version this project supports (standard 10.x, TensorRT-RTX 1.x)."""


class EngineMismatchError(BackendNotInstalledError):
    """The build's engines were made for another GPU or TensorRT version than this machine's."""


class BackendError(RuntimeError):
    """A backend failed while running a graph; the message names the graph and the shapes."""


def has_module(name: str) -> bool:
    """Whether `name` can be imported, without importing it (a missing parent package counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_jetson() -> bool:
    """Whether this is an NVIDIA Jetson (L4T): TensorRT comes from JetPack, and TensorRT-RTX does not exist there."""
    return TEGRA_RELEASE.exists()


def rebuild_hint(directory: str | Path, flavour: str = "tensorrt") -> str:
    """The command that compiles a build's engines on this machine."""
    return f"python -m export.build --from-onnx {directory} --backend {flavour}"


def trt_install_hint(flavour: str, directory: str | Path | None = None) -> str:
    """What to do when `flavour` cannot be imported; on a Jetson, use JetPack's TensorRT instead.

    `directory`: the build whose engines need `flavour` (the runtime); None when building engines (the export)."""
    if is_jetson():
        if flavour == TENSORRT_RTX and directory is None:
            return "TensorRT-RTX does not exist on Jetson; build the engines with JetPack's TensorRT: --backend tensorrt"
        if flavour == TENSORRT_RTX:
            return (f"the engines were built with TensorRT-RTX, which does not exist on Jetson; compile them with "
                    f"JetPack's TensorRT: {rebuild_hint(directory)}")
        return ("TensorRT is not importable: install JetPack's (sudo apt install python3-libnvinfer) and make it visible "
                "to this Python (a venv made with --system-site-packages)")
    return HINTS[flavour]
