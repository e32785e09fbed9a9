"""A stand-in for the TensorRT Python API and CUDA memory, running ONNX Runtime underneath (CPU only).

It lets `runtime.backend_trt` run on a machine without a GPU: engines are the build's ONNX graphs,
"device memory" is numpy blocks addressed by fake pointers. The fake is strict where TensorRT is:
every I/O tensor needs an address, dynamic inputs need `set_input_shape` within [1, max], outputs
must fit their block, and an output may not alias an input. It checks the backend's bookkeeping
(shapes, per-layer cache lengths, ping-pong cache sets, dtypes), not TensorRT itself.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort

_ORT_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(int64)": ("INT64", np.int64)}


class FakeCuda:
    """Host numpy blocks behind fake device pointers."""

    name = "fake-cuda"
    stream = 7

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 0x10000

    def malloc(self, nbytes: int) -> int:
        pointer, self.next = self.next, self.next + max(nbytes, 1) + 0x1000
        self.blocks[pointer] = np.zeros(max(nbytes, 1), np.uint8)
        return pointer

    def free(self, pointer: int) -> None:
        del self.blocks[pointer]

    def memset(self, pointer: int, nbytes: int) -> None:
        self.blocks[pointer][:nbytes] = 0

    def upload(self, pointer: int, host: np.ndarray) -> None:
        self.blocks[pointer][: host.nbytes] = np.ascontiguousarray(host).reshape(-1).view(np.uint8)

    def download(self, host: np.ndarray, pointer: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = self.blocks[pointer][: host.nbytes]

    def sync(self) -> None:
        pass

    def read(self, pointer: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert nbytes <= self.blocks[pointer].size, f"read of {nbytes} bytes past a block of {self.blocks[pointer].size}"
        return self.blocks[pointer][:nbytes].view(dtype).reshape(shape).copy()


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        declared = self.engine.dims[name]
        if len(shape) != len(declared) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
            return False
        if any(s < 1 or s > self.engine.max_dim for s in shape):
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def _symbols(self) -> dict[str, int]:
        return {d: s for n in self.engine.input_names for d, s in zip(self.engine.dims[n], self.shapes.get(n, ())) if isinstance(d, str)}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.input_names:
            return self.shapes.get(name, tuple(-1 if isinstance(d, str) else d for d in self.engine.dims[name]))
        symbols = self._symbols()
        shape = []
        for dim in self.engine.dims[name]:
            if isinstance(dim, int):
                shape.append(dim)
            elif re.fullmatch(r"[\w\s+\-*]+", dim) and set(re.findall(r"[A-Za-z_]\w*", dim)) <= set(symbols):
                shape.append(int(eval(dim, {"__builtins__": {}}, symbols)))  # ONNX dim expressions like 'past_0 + 1'
            else:
                shape.append(-1)
        return tuple(shape)

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        assert name in self.engine.dims, name
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        engine, cuda = self.engine, self.engine.cuda
        missing = [n for n in engine.dims if n not in self.addresses]
        assert not missing, f"no address for {missing}"
        assert stream == cuda.stream
        feeds = {}
        for name in engine.input_names:
            assert name in self.shapes or all(isinstance(d, int) for d in engine.dims[name]), f"no shape for {name}"
            shape = self.shapes.get(name) or tuple(engine.dims[name])
            feeds[name] = cuda.read(self.addresses[name], shape, engine.numpy[name])
        inputs = {self.addresses[n] for n in engine.input_names}
        outputs = engine.session.run(engine.output_names, feeds)
        for name, value in zip(engine.output_names, outputs):
            assert self.addresses[name] not in inputs, f"output {name} aliases an input"
            assert value.shape == self.get_tensor_shape(name), (name, value.shape, self.get_tensor_shape(name))
            block = cuda.blocks[self.addresses[name]]
            assert value.nbytes <= block.size, f"{name}: {value.nbytes} bytes into a block of {block.size}"
            block[: value.nbytes] = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        engine.runs += 1
        return True


class FakeEngine:
    def __init__(self, data: bytes, cuda: FakeCuda, max_dim: int):
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.cuda, self.max_dim, self.runs = cuda, max_dim, 0
        tensors = [*self.session.get_inputs(), *self.session.get_outputs()]
        self.input_names = [t.name for t in self.session.get_inputs()]
        self.output_names = [t.name for t in self.session.get_outputs()]
        self.dims = {t.name: list(t.shape) for t in tensors}
        self.types = {t.name: _ORT_TYPES[t.type][0] for t in tensors}
        self.numpy = {t.name: _ORT_TYPES[t.type][1] for t in tensors}
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return [*self.input_names, *self.output_names][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.input_names else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return SimpleNamespace(name=self.types[name])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.dims[name])

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class _Logger:
    WARNING = 2

    def __init__(self, severity: int):
        self.severity = severity


def fake_trt_module(cuda: FakeCuda, max_dim: int) -> SimpleNamespace:
    """What `import tensorrt` gives, as far as runtime.backend_trt uses it; `.engines` lists those loaded."""
    engines: list[FakeEngine] = []

    class Runtime:
        def __init__(self, logger: Any):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            engines.append(FakeEngine(data, cuda, max_dim))
            return engines[-1]

    io_mode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    return SimpleNamespace(__version__="fake", Runtime=Runtime, Logger=_Logger, TensorIOMode=io_mode, engines=engines)
