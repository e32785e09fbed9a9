"""The runtime's backend errors and install hints, shared by `runtime.backend` and the backends.

Kept apart from `runtime.backend` so that the backends (`backend_ort`, `backend_trt`, `cuda`) import
their errors without importing the module that chooses between them. Imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TRT_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx")}
HINTS = {
    "onnxruntime": "ONNX Runtime is not installed: pip install 'ficoco-edge[runtime]' (CPU), or pip install 'ficoco-edge[gpu]' (CUDA)",
    "tensorrt": "TensorRT is not installed: it ships with JetPack; elsewhere pip install 'ficoco-edge[trt]'",
    "tensorrt-rtx": "TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'",
    "cuda": "the TensorRT backend needs cuda-python for device memory: pip install 'ficoco-edge[cuda12]' (CUDA 12 "
            "drivers, JetPack 6) or 'ficoco-edge[cuda13]' (CUDA 13 drivers, Jetson Thor), or torch built with CUDA",
}
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on every Jetson (L4T), JetPack 5, 6 and 7


class BackendNotInstalledError(ValueError):
    """The requested backend (or what it needs) is not installed or cannot run here; the message says what to do."""


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


def trt_install_hint(flavour: str, directory: str | Path) -> str:
    """What to do when `flavour` cannot be imported; on a Jetson, recompile with JetPack's TensorRT instead."""
    if is_jetson():
        if flavour == "tensorrt-rtx":
            return (f"the engines were built with TensorRT-RTX, which does not exist on Jetson; compile them with "
                    f"JetPack's TensorRT: {rebuild_hint(directory)}")
        return ("TensorRT is not importable: install JetPack's (sudo apt install python3-libnvinfer) and make it visible "
                "to this Python (a venv made with --system-site-packages)")
    return HINTS[flavour]
