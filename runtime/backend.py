"""One interface over the inference backends, and the choice between them.

A backend runs a build's graphs (vision, the decoder segments and the FiCoCo-L reductions;
`runtime.names`) and keeps its tensors where they are computed (host memory for ONNX Runtime on
CPU, the GPU otherwise): `vision` leaves the image features where `prefill` reads them (in a buffer
the next `vision` reuses). The KV cache (`runtime.kvcache.KVCache`: one buffer per layer at its
capacity, and the filled lengths) is allocated once, when the backend is opened: `prefill` fills it
with the prompt and returns it, `decode` writes one new row per layer in place and returns the same
object. Only logits [V] come back to the host, into a buffer the backend owns and overwrites at its
next step.

    vision(pixel_values [crops, 3, S, S])            -> features [n, D], where prefill reads them, opaque
    prefill(before [1, Tb], features, after [1, Ta]) -> (logits [V], cache)   cache holding the prompt
    decode(token, position, cache)                   -> (logits [V], cache)   the same cache, one row longer
    cache_lengths(cache)                             -> per layer len_i
    empty_cache(lengths)                             -> the cache set to those lengths, contents as they are (benchmarks)

Choosing TensorRT (`tensorrt_problem`): the build must have engines, their TensorRT flavour must
import, a CUDA device and an allocator (cuda-python, or torch built with CUDA) must be present, the
installed TensorRT must be a supported version, and the engines' TensorRT version and compute
capabilities (from the manifest) must fit the library and the GPU. `--backend tensorrt` raises
the first problem as a one-line error; `--backend auto` uses ONNX Runtime instead, and says why in
one line on stderr whenever a GPU is present (on a machine without one it says nothing).

Backends are imported lazily: `import runtime` never imports onnxruntime, TensorRT or CUDA.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import numpy as np

from . import device
from .cuda import cuda_allocator
from .device import cuda_devices  # noqa: F401  (re-exported: CUDA devices through libcuda, imports nothing)
from .errors import (  # noqa: F401  (re-exported: the runtime's public error types live here too)
    HINTS,
    TRT_MODULES,
    BackendError,
    BackendNotInstalledError,
    EngineMismatchError,
    has_module,
    rebuild_hint,
    trt_install_hint,
)
from .manifest import Build, BuildError

ONNXRUNTIME, TENSORRT = "onnxruntime", "tensorrt"
CHOICES = ("auto", ONNXRUNTIME, TENSORRT)


class Backend(Protocol):
    name: str  # "onnxruntime (CPUExecutionProvider)", "tensorrt 10.x", ...

    def vision(self, pixel_values: np.ndarray) -> Any: ...

    def prefill(self, before: np.ndarray, features: Any, after: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def decode(self, token: int, position: int, cache: Any) -> tuple[np.ndarray, Any]: ...

    def cache_lengths(self, cache: Any) -> tuple[int, ...]: ...

    def empty_cache(self, lengths: tuple[int, ...]) -> Any: ...

    def close(self) -> None: ...


def trt_flavour(build: Build) -> str:
    """The TensorRT flavour of the build's engines; BuildError when it has none."""
    flavour = build.tensorrt_flavour
    if flavour is None:
        raise BuildError(
            f"{str(build.directory)!r} has no TensorRT engines; compile them on the device with "
            f"{rebuild_hint(build.directory)} (or tensorrt-rtx)"
        )
    if flavour not in TRT_MODULES:
        raise BuildError(f"{str(build.directory)!r}: unknown TensorRT flavour {flavour!r} in its manifest")
    return flavour


def tensorrt_problem(build: Build, found: device.Driver | None = None) -> Exception | None:
    """Why TensorRT cannot run this build's engines here, as the error `--backend tensorrt` raises; None if it can.
    `found`: the CUDA driver as `device.driver()` reports it (asked for when not given)."""
    try:
        flavour = trt_flavour(build)
    except BuildError as error:
        return error
    if not any(has_module(m) for m in TRT_MODULES[flavour]):
        return BackendNotInstalledError(trt_install_hint(flavour, build.directory))
    found = found if found is not None else device.driver()
    if found is None or found.devices < 1:
        return BackendNotInstalledError("no CUDA device is visible; the TensorRT backend needs one (use --backend onnxruntime)")
    if not cuda_allocator():
        return BackendNotInstalledError(HINTS["cuda"])
    from . import backend_trt

    try:
        installed = str(backend_trt.import_trt(flavour, build.directory).__version__)
    except BackendNotInstalledError as error:
        return error
    if (problem := device.trt_version_problem(flavour, installed)) is not None:
        return BackendNotInstalledError(problem)
    section = build.tensorrt
    if (problem := device.engine_problem(section, installed, found.compute_capability)) is not None:
        return EngineMismatchError(f"{problem}; rebuild them here: {rebuild_hint(build.directory, flavour)}")
    return None


def resolve(choice: str, build: Build) -> str:
    """"auto" -> "tensorrt" or "onnxruntime" (with one line on stderr saying why not TensorRT, where a GPU is);
    "tensorrt" -> "tensorrt", or the one-line error of `tensorrt_problem`."""
    if choice not in CHOICES:
        raise BackendNotInstalledError(f"unknown backend {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice == ONNXRUNTIME:
        return choice
    found = device.driver()
    problem = tensorrt_problem(build, found)
    if problem is None:
        return TENSORRT
    if choice == TENSORRT:
        raise problem
    if found is not None and found.devices > 0:
        print(f"note: using ONNX Runtime, not TensorRT: {' '.join(str(problem).split())}", file=sys.stderr, flush=True)
    return ONNXRUNTIME


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
    if verify_files:
        build.check("engines")
    from .backend_trt import TensorRTBackend

    return TensorRTBackend(build, trt_flavour(build))
