"""Device memory, copies and a stream for the TensorRT backend: cuda-python's runtime API, or torch.

Both are imported only when the TensorRT backend is created. Pointers are plain ints (what
`IExecutionContext.set_tensor_address` takes); a stream is its int handle (what
`execute_async_v3` takes). Host arrays must be C-contiguous and stay alive until `sync`.

NOT EXECUTED in this repository's CI or development machine (no GPU there): written against
cuda-python 12.x/13.x (`cuda.bindings.runtime`, or the older `cuda.cudart`) and torch 2.x.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .backend import HINTS, BackendError, BackendNotInstalledError


class Cuda(Protocol):
    name: str

    def malloc(self, nbytes: int) -> int: ...

    def free(self, pointer: int) -> None: ...

    def memset(self, pointer: int, nbytes: int) -> None: ...

    def upload(self, pointer: int, host: np.ndarray) -> None: ...

    def download(self, host: np.ndarray, pointer: int) -> None: ...

    def sync(self) -> None: ...

    @property
    def stream(self) -> int: ...


class CudaPython:
    """cuda-python: cudaMalloc / cudaMemcpyAsync / cudaMemsetAsync on one stream of its own."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt, self.name = cudart, "cuda-python"
        self._check(cudart.cudaFree(0), "cudaFree(0)")  # creates the primary context
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result: Any, what: str) -> Any:
        """cuda-python returns (error, *values); raise on an error, return the value(s)."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(error)
            raise BackendError(f"CUDA {what} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values)

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

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")


class TorchCuda:
    """torch as the allocator: one uint8 tensor per block, copies on a torch stream."""

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

    def _bytes(self, host: np.ndarray) -> Any:
        return self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def memset(self, pointer: int, nbytes: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self.blocks[pointer][:nbytes].zero_()

    def upload(self, pointer: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self._stream):
            self.blocks[pointer][: host.nbytes].copy_(self._bytes(host))

    def download(self, host: np.ndarray, pointer: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._bytes(host).copy_(self.blocks[pointer][: host.nbytes])

    def sync(self) -> None:
        self._stream.synchronize()


def open_cuda() -> Cuda:
    """cuda-python if installed, else torch; BackendNotInstalledError naming what to install."""
    from .backend import has_module

    if has_module("cuda.bindings") or has_module("cuda.cudart"):
        return CudaPython()
    if has_module("torch"):
        return TorchCuda()
    raise BackendNotInstalledError(HINTS["cuda"])
