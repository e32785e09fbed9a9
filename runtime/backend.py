"""One interface over the inference backends, and the choice between them.

A backend runs a build's three graphs and keeps its tensors where they are computed (host memory
for ONNX Runtime on CPU, the GPU otherwise): `vision` leaves the image features on the device for
`prefill` (in a buffer the next `vision` reuses), and the cache one step returns is what the next step reads. Only logits [V] come back
to the host, into a buffer the backend owns and overwrites at its next step.

    vision(pixel_values [crops, 3, S, S])            -> features [crops, k, D], on the device, opaque
    prefill(before [1, Tb], features, after [1, Ta]) -> (logits [V], cache)
    decode(token, position, cache)                   -> (logits [V], cache)   cache grown by one
    cache_lengths(cache)                             -> per layer len_i, read from the tensors
    empty_cache(lengths)                             -> a zero cache of those lengths (benchmarks)

Backends are imported lazily: `import runtime` never imports onnxruntime, TensorRT or CUDA.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any, Protocol

import numpy as np

from .manifest import Build, BuildError

ONNXRUNTIME, TENSORRT = "onnxruntime", "tensorrt"
CHOICES = ("auto", ONNXRUNTIME, TENSORRT)
TRT_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx")}
HINTS = {
    ONNXRUNTIME: "ONNX Runtime is not installed: pip install onnxruntime (CPU), or pip install 'ficoco-edge[gpu]' (CUDA)",
    "tensorrt": "TensorRT is not installed: it ships with JetPack; elsewhere pip install 'ficoco-edge[trt]'",
    "tensorrt-rtx": "TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'",
    "cuda": "the TensorRT backend needs cuda-python (pip install cuda-python) or torch with CUDA for device memory",
}


class BackendNotInstalledError(ValueError):
    """The requested backend (or what it needs) is not installed; the message names the extra."""


class BackendError(RuntimeError):
    """A backend failed while running a graph; the message names the graph and the shapes."""


class Backend(Protocol):
    name: str  # "onnxruntime (CPUExecutionProvider)", "tensorrt 10.x", ...

    def vision(self, pixel_values: np.ndarray) -> Any: ...

    def prefill(self, before: np.ndarray, features: Any, after: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def decode(self, token: int, position: int, cache: Any) -> tuple[np.ndarray, Any]: ...

    def cache_lengths(self, cache: Any) -> tuple[int, ...]: ...

    def empty_cache(self, lengths: tuple[int, ...]) -> Any: ...

    def close(self) -> None: ...


def has_module(name: str) -> bool:
    """Whether `name` can be imported, without importing it (a missing parent package counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_devices() -> int:
    """CUDA devices the driver reports (0 without a driver); asks libcuda through ctypes, imports nothing."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def trt_flavour(build: Build) -> str:
    """The TensorRT flavour of the build's engines; BuildError when it has none."""
    flavour = build.tensorrt_flavour
    if flavour is None:
        raise BuildError(
            f"{str(build.directory)!r} has no TensorRT engines; compile them on the device with "
            f"python -m export.build --from-onnx {build.directory} --backend tensorrt (or tensorrt-rtx)"
        )
    if flavour not in TRT_MODULES:
        raise BuildError(f"{str(build.directory)!r}: unknown TensorRT flavour {flavour!r} in its manifest")
    return flavour


def tensorrt_usable(build: Build) -> bool:
    """`auto`'s test: engines in the build, their TensorRT module, device memory and a CUDA device."""
    flavour = build.tensorrt_flavour
    if flavour not in TRT_MODULES or not any(has_module(m) for m in TRT_MODULES[flavour]):
        return False
    if not (has_module("cuda.bindings") or has_module("cuda.cudart") or has_module("torch")):
        return False
    return cuda_devices() > 0


def resolve(choice: str, build: Build) -> str:
    """"auto" -> "tensorrt" or "onnxruntime"; anything else is checked and returned."""
    if choice not in CHOICES:
        raise BackendNotInstalledError(f"unknown backend {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    return TENSORRT if tensorrt_usable(build) else ONNXRUNTIME


def open_backend(choice: str, build: Build, verify_files: bool = True) -> Backend:
    """Create the backend `choice` resolves to for `build`, after the sha256 check of its files."""
    kind = resolve(choice, build)
    if kind == ONNXRUNTIME:
        if not has_module("onnxruntime"):
            raise BackendNotInstalledError(HINTS[ONNXRUNTIME])
        if verify_files:
            build.check("graphs")
        from .backend_ort import OrtBackend

        return OrtBackend(build)
    flavour = trt_flavour(build)
    if verify_files:
        build.check("engines")
    from .backend_trt import TensorRTBackend

    return TensorRTBackend(build, flavour)
