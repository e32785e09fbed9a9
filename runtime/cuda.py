"""Device memory, copies and a stream for the TensorRT backend: cuda-python's runtime API, or torch.

Both are imported only when the TensorRT backend is created. Pointers are plain ints (what
`IExecutionContext.set_tensor_address` takes), and may point inside an allocation (pointer
arithmetic); a stream is its int handle (what `execute_async_v3` takes). Every copy is queued on
the stream: host to device (`upload`), device to host (`download`), device to device (`copy`, and
`copy2d`: `height` rows of `width` bytes between two pitched layouts, e.g. the new K/V rows of every
head into a cache buffer). Host arrays must be C-contiguous and stay alive until `sync`. `close`
synchronizes and destroys the stream; the caller frees its buffers first.

cuda-python must match the driver's CUDA major: cuda-python 13.x needs a CUDA 13 driver (Jetson Thor,
JetPack 7; RTX with a recent driver), JetPack 6 has CUDA 12.6 and needs cuda-python 12.x. The
mismatch is found before the first CUDA call (the driver's version from libcuda against the
bindings' version) and again from cudaErrorInsufficientDriver, and reported in one line with the fix.

NOT EXECUTED in this repository's CI or development machine (no GPU there): written against
cuda-python 12.x/13.x (`cuda.bindings.runtime`, or the older `cuda.cudart`) and torch 2.x.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import numpy as np

from .device import Driver, driver, torch_has_cuda
from .errors import HINTS, BackendError, BackendNotInstalledError, has_module


class Cuda(Protocol):
    name: str

    def malloc(self, nbytes: int) -> int: ...

    def free(self, pointer: int) -> None: ...

    def memset(self, pointer: int, nbytes: int) -> None: ...

    def upload(self, pointer: int, host: np.ndarray) -> None: ...

    def download(self, host: np.ndarray, pointer: int) -> None: ...

    def copy(self, dst: int, src: int, nbytes: int) -> None: ...

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    @property
    def stream(self) -> int: ...


def bindings_version() -> str | None:
    """The installed CUDA Python bindings' version: cuda-bindings (cuda-python >= 12.6 splits it out) or cuda-python."""
    for package in ("cuda-bindings", "cuda-python"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return None


def driver_mismatch(bindings: str | None, found: Driver | None) -> str | None:
    """One line with the fix when the bindings target a newer CUDA major than the driver supports; else None."""
    if not bindings or found is None or not bindings.split(".")[0].isdigit():
        return None
    major, driver_major = int(bindings.split(".")[0]), found.cuda_version // 1000
    if major <= driver_major:
        return None
    return (f"cuda-python {bindings} is built for CUDA {major}, but this driver supports CUDA {found.cuda} "
            f"(cudaErrorInsufficientDriver); install the bindings for CUDA {driver_major}: "
            f"pip install 'cuda-python>={driver_major}.0,<{driver_major + 1}' (or 'ficoco-edge[cuda{driver_major}]')")


class CudaPython:
    """cuda-python: cudaMalloc / cudaMemcpyAsync / cudaMemcpy2DAsync / cudaMemsetAsync on one stream of its own."""

    def __init__(self, cudart: Any = None, found: Driver | None = None, bindings: str | None = None) -> None:
        found = found if found is not None else driver()
        bindings = bindings if bindings is not None else bindings_version()
        if (problem := driver_mismatch(bindings, found)) is not None:
            raise BackendNotInstalledError(problem)
        if cudart is None:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # older cuda-python
        self.rt, self.name, self._stream = cudart, f"cuda-python {bindings or ''}".strip(), None
        error, *_ = cudart.cudaFree(0)  # creates the primary context
        if error == cudart.cudaError_t.cudaErrorInsufficientDriver:
            raise BackendNotInstalledError(
                driver_mismatch(bindings, found) or f"cuda-python {bindings} needs a newer CUDA driver than "
                f"this one ({found.cuda if found else 'unknown'}); install cuda-python of the driver's CUDA major"
            )
        self._check((error,), "cudaFree(0)")
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result: Any, what: str) -> Any:
        """cuda-python returns (error, *values); raise on an error, return the value(s)."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(error)
            raise BackendError(f"CUDA {what} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values) or None

    @property
    def stream(self) -> int:
        return int(self._stream)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, pointer: int) -> None:
        self._check(self.rt.cudaFree(pointer), "cudaFree")

    def memset(self, pointer: int, nbytes: int) -> None:
        self._check(self.rt.cudaMemsetAsync(pointer, 0, nbytes, self._stream), "cudaMemsetAsync")

    def upload(self, pointer: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind, self._stream), "cudaMemcpyAsync H2D")

    def download(self, host: np.ndarray, pointer: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, kind, self._stream), "cudaMemcpyAsync D2H")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self._stream), "cudaMemcpyAsync D2D")

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, kind, self._stream),
                    "cudaMemcpy2DAsync D2D")

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Synchronize and destroy the stream (idempotent)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


class TorchCuda:
    """torch as the allocator: one uint8 tensor per block (keyed by its base pointer), copies on a torch stream
    through tensor views of the blocks (a pointer inside a block is served by the block that contains it)."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendNotInstalledError("torch sees no CUDA device; the TensorRT backend needs one")
        self.torch, self.name, self.blocks = torch, f"torch {torch.__version__}", {}
        self._stream = torch.cuda.Stream()

    @property
    def stream(self) -> int:
        return int(self._stream.cuda_stream)

    def malloc(self, nbytes: int) -> int:
        block = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self.blocks[block.data_ptr()] = block
        return block.data_ptr()

    def free(self, pointer: int) -> None:
        self.blocks.pop(pointer, None)

    def _view(self, pointer: int, nbytes: int, pitch: int | None = None, height: int = 1) -> Any:
        """The block bytes at `pointer`: [nbytes], or [height, nbytes] rows `pitch` bytes apart; BackendError outside a block."""
        extent = nbytes if pitch is None else (height - 1) * pitch + nbytes
        for start, block in self.blocks.items():
            if start <= pointer and pointer + extent <= start + block.numel():
                offset = pointer - start
                if pitch is None:
                    return block[offset:offset + nbytes]
                return block.as_strided((height, nbytes), (pitch, 1), block.storage_offset() + offset)
        raise BackendError(f"{extent} bytes at {pointer:#x} are not inside one allocation of this backend")

    def _bytes(self, host: np.ndarray) -> Any:
        return self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def memset(self, pointer: int, nbytes: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._view(pointer, nbytes).zero_()

    def upload(self, pointer: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self._stream):
            self._view(pointer, host.nbytes).copy_(self._bytes(host))

    def download(self, host: np.ndarray, pointer: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._bytes(host).copy_(self._view(pointer, host.nbytes))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._view(dst, nbytes).copy_(self._view(src, nbytes))

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._view(dst, width, dst_pitch, height).copy_(self._view(src, width, src_pitch, height))

    def sync(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self._stream.synchronize()
        self.blocks.clear()


def open_cuda() -> Cuda:
    """cuda-python if installed, else a CUDA build of torch; BackendNotInstalledError naming what to install."""
    if has_module("cuda.bindings") or has_module("cuda.cudart"):
        return CudaPython()
    if torch_has_cuda():
        return TorchCuda()
    raise BackendNotInstalledError(HINTS["cuda"])


def cuda_allocator() -> bool:
    """Whether `open_cuda` has something to open: cuda-python, or torch built with CUDA (a CPU torch does not count)."""
    return has_module("cuda.bindings") or has_module("cuda.cudart") or torch_has_cuda()
