"""runtime.cuda: the CUDA bindings against the driver, and the device-to-device copies the TensorRT backend
writes its KV cache rows with (cuda-python with a stand-in for its runtime module, torch on CPU tensors, and
the fake device of fake_tensorrt, which must be as strict as CUDA)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime import cuda as cuda_module, device, errors
from runtime.backend import BackendError, BackendNotInstalledError
from runtime.device import Driver

from .fake_tensorrt import FakeCuda


def test_a_cpu_build_of_torch_is_not_a_cuda_allocator() -> None:
    """torch imports here, but it is the CPU build: `auto` must not count it (read from torch/version.py)."""
    import torch

    assert device.torch_has_cuda() is (torch.version.cuda is not None)
    if not (errors.has_module("cuda.bindings") or errors.has_module("cuda.cudart")) and torch.version.cuda is None:
        assert not cuda_module.cuda_allocator()
        with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[cuda12\]"):
            cuda_module.open_cuda()



def test_cuda_bindings_newer_than_the_driver_are_one_line_with_the_fix() -> None:
    """JetPack 6 (CUDA 12.6 driver) with cuda-python 13: found before any CUDA call, and from cudaErrorInsufficientDriver."""
    jetpack6 = Driver(12060, 1, "8.7")
    line = cuda_module.driver_mismatch("13.0.2", jetpack6)
    assert line is not None and "\n" not in line and "cuda-python 13.0.2 is built for CUDA 13" in line
    assert "supports CUDA 12.6" in line and "pip install 'cuda-python>=12.0,<13'" in line and "ficoco-edge[cuda12]" in line
    assert cuda_module.driver_mismatch("12.6.2", jetpack6) is None and cuda_module.driver_mismatch("12.9.0", Driver(13000, 1, "12.0")) is None
    with pytest.raises(BackendNotInstalledError, match="cudaErrorInsufficientDriver"):
        cuda_module.CudaPython(cudart=_fake_cudart(), found=jetpack6, bindings="13.0.2")
    with pytest.raises(BackendNotInstalledError, match=r"cuda-python>=12.0,<13"):  # the driver answers first
        cuda_module.CudaPython(cudart=_fake_cudart(insufficient=True), found=Driver(12020, 1, "8.7"), bindings="13.0.2")
    cudart = _fake_cudart()
    cuda = cuda_module.CudaPython(cudart=cudart, found=jetpack6, bindings="12.6.2")
    cuda.close()
    assert cudart.calls == ["cudaFree", "cudaStreamCreate", "cudaStreamSynchronize", "cudaStreamDestroy"]


def _fake_cudart(insufficient: bool = False) -> SimpleNamespace:
    """cuda.bindings.runtime as far as CudaPython uses it: (error, *values) tuples; `calls` names each call,
    `arguments` holds (name, args) of each."""
    errors_ = SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)
    calls: list[str] = []
    arguments: list[tuple] = []

    def call(name: str, *values: object):
        def run(*args: object) -> tuple:
            calls.append(name)
            arguments.append((name, args))
            return (35 if insufficient and name == "cudaFree" else 0, *values)
        return run

    kinds = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    return SimpleNamespace(cudaError_t=errors_, calls=calls, arguments=arguments, cudaMemcpyKind=kinds,
                           cudaFree=call("cudaFree"), cudaStreamCreate=call("cudaStreamCreate", 99),
                           cudaStreamSynchronize=call("cudaStreamSynchronize"), cudaStreamDestroy=call("cudaStreamDestroy"),
                           cudaMemcpyAsync=call("cudaMemcpyAsync"), cudaMemcpy2DAsync=call("cudaMemcpy2DAsync"),
                           cudaGetErrorString=lambda e: (0, b"CUDA driver version is insufficient for CUDA runtime version"))


def test_cuda_python_copies_device_to_device_on_its_stream() -> None:
    cudart = _fake_cudart()
    cuda = cuda_module.CudaPython(cudart=cudart, found=Driver(12060, 1, "8.7"), bindings="12.6.2")
    cuda.copy(0x2000, 0x1000, 512)
    cuda.copy2d(0x3000 + 64, 4096, 0x1000, 128, 128, 8)  # 8 heads' new rows into a buffer of pitch 4096
    cuda.close()
    assert cudart.arguments[2:4] == [("cudaMemcpyAsync", (0x2000, 0x1000, 512, 3, 99)),
                                     ("cudaMemcpy2DAsync", (0x3000 + 64, 4096, 0x1000, 128, 128, 8, 3, 99))]


def test_torch_copies_address_inside_its_blocks() -> None:
    """TorchCuda serves a pointer inside a block from the block that contains it (here on CPU tensors; its stream
    is none, which torch.cuda.stream accepts)."""
    torch = pytest.importorskip("torch")
    cuda = cuda_module.TorchCuda.__new__(cuda_module.TorchCuda)
    cuda.torch, cuda.blocks, cuda._stream = torch, {}, None
    blocks = [torch.full((4096,), 7, dtype=torch.uint8) for _ in range(2)]
    cuda.blocks = {block.data_ptr(): block for block in blocks}
    cache, rows = (block.data_ptr() for block in blocks)
    new = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)  # 8 heads, one row of 64 bytes each
    cuda.upload(rows + 256, new)
    cuda.memset(cache, 4096)
    cuda.copy2d(cache + 32, 128, rows + 256, 64, 64, 8)  # into a buffer of 2 rows per head, at row 1 (32-byte rows)
    out = np.empty((8, 32), np.float32)
    cuda.download(out, cache)
    assert (out[:, 8:24] == new).all() and not out[:, :8].any() and not out[:, 24:].any()
    cuda.copy(cache + 2048, rows + 256, new.nbytes)
    back = np.empty_like(new)
    cuda.download(back, cache + 2048)
    assert (back == new).all()
    with pytest.raises(BackendError, match="not inside one allocation"):
        cuda.copy(cache + 4000, rows, 512)
    with pytest.raises(BackendError, match="not inside one allocation"):
        cuda.copy2d(cache, 1024, rows, 64, 64, 8)  # the last row would end past the block


def test_the_fake_device_copies_as_strictly_as_cuda() -> None:
    cuda = FakeCuda()
    buffer, rows = cuda.malloc(1024), cuda.malloc(256)
    new = np.arange(64, dtype=np.float32)  # 4 rows of 64 bytes
    cuda.upload(rows, new)
    cuda.copy2d(buffer + 64, 256, rows, 64, 64, 4)
    cuda.sync()
    for r in range(4):
        assert (cuda.read(buffer + 64 + r * 256, (16,), np.float32, "row") == new[16 * r:16 * (r + 1)]).all()
    with pytest.raises(AssertionError, match="t: reads device memory that was never written"):
        cuda.read(buffer, (32,), np.float32, "t")  # bytes 0 .. 63 were never written
    with pytest.raises(AssertionError, match="exceeds a pitch"):
        cuda.copy2d(buffer, 32, rows, 64, 64, 1)
    with pytest.raises(AssertionError, match="run past a block"):
        cuda.copy2d(buffer, 512, rows, 64, 64, 4)
    with pytest.raises(AssertionError, match="overlapping"):
        cuda.copy(buffer + 32, buffer, 64)
    cuda.copy(buffer, cuda.malloc(64), 64)  # queued; the source was never written: found when the stream runs
    with pytest.raises(AssertionError, match="never written"):
        cuda.sync()
