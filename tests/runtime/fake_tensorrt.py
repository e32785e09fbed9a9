"""A stand-in for the TensorRT Python API and CUDA memory, running ONNX Runtime underneath (CPU only).

It lets `runtime.backend_trt` run on a machine without a GPU. A fake engine file is a header (JSON:
TensorRT version, compute capabilities, per-input optimization profiles, I/O dtypes, device memory)
followed by an ONNX graph (its weights inline, as an engine holds them); "device memory" is numpy blocks behind fake pointers. Where it matters,
the fake is as strict as TensorRT, or stricter:

* per-engine optimization profiles: `set_input_shape` refuses a shape outside the engine's own
  (min, max) for that input, refuses outputs, wrong ranks and static dimensions that differ;
* `set_tensor_address` refuses addresses that are not 256-byte aligned or not inside an allocation;
* fp32, fp16, bf16, int32 and int64 tensors: the header may give the engine I/O types that differ from
  the ONNX (fp16/bf16 floats, int32 ids, as a TensorRT engine may have), the graph runs with casts.
  Device bytes carry the dtype they were written with, and a kernel or a download that reads them
  as another dtype fails (TensorRT would silently compute garbage);
* asynchronous execution: uploads, memsets, copies, kernels and downloads are queued on the stream and run
  at `sync`; a host read before the sync sees stale data, a host array changed before it is read;
* `deserialize_cuda_engine` returns None (and logs an error) on a TensorRT-version or compute-
  capability mismatch; `create_execution_context` returns None when the engine's device memory
  does not fit what is free;
* freshly allocated device memory is 0xFF bytes (NaN as floats); every byte remembers whether it was
  ever written (memset, upload, copy, an engine's output), and a kernel, a copy or a download that
  reads a byte never written fails;
* device-to-device copies (`copy`, and `copy2d` of rows between pitched layouts) are checked like the
  CUDA calls: each layout inside one allocation, width within both pitches, no overlap;
* execution needs an address for every I/O tensor and a shape for every dynamic input, runs on the
  stream it was given (not a destroyed one); the kernel reads every input from the device memory at
  its address (the shape set for it, the engine's dtype) and writes every output to its address, which
  must hold it within one allocation and overlap no input and no other output. An output dimension the
  ONNX graph names with a symbol no input has (e.g. FiCoCo-L's token count) is data-dependent: -1 until
  the run.

TensorRT-RTX's runtime config is modelled too: a runtime cache of "kernels" keyed by input shapes,
filled when the dynamic-shape strategy is LAZY or EAGER and a shape is new (`compiles` counts them),
never with NONE; `serialize`/`deserialize` carry it across processes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import weakref
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort

MAGIC = b"FAKETRT1"
ALIGNMENT = 256
_ONNX_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(bfloat16)": "BF16",
               "tensor(int64)": "INT64", "tensor(int32)": "INT32"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64, "INT32": np.int32}


def serialize_engine(onnx: bytes, *, version: str, compute_capabilities: list[str], profiles: dict,
                     dtypes: dict[str, str] | None = None, device_memory: int = 1 << 20) -> bytes:
    """A fake engine file. profiles: input name -> (min, opt, max); dtypes: tensor name -> engine type name."""
    header = json.dumps({"version": version, "compute_capabilities": compute_capabilities, "device_memory": device_memory,
                         "profiles": {k: [list(s) for s in v] for k, v in profiles.items()}, "dtypes": dtypes or {}})
    return MAGIC + len(header).to_bytes(4, "little") + header.encode() + onnx


def _parse(data: Any) -> tuple[dict, bytes]:
    raw = bytes(data)
    assert raw[:8] == MAGIC, "not a fake engine"
    size = int.from_bytes(raw[8:12], "little")
    return json.loads(raw[12:12 + size]), raw[12 + size:]


def to_engine_dtype(value: np.ndarray, kind: str) -> np.ndarray:
    """An ONNX Runtime output as the engine stores it (bf16 as bit patterns)."""
    if kind == "BF16":
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return value.astype(_NUMPY[kind])


def from_engine_dtype(value: np.ndarray, kind: str, onnx_kind: str) -> np.ndarray:
    """Engine bytes as the ONNX graph's input type."""
    if kind == "BF16":
        value = (value.astype(np.uint32) << 16).view(np.float32)
    return value.astype(_NUMPY[onnx_kind])


class FakeCuda:
    """Host numpy blocks behind fake pointers; one stream whose queued work runs at `sync`.

    Each block remembers which of its bytes were ever written (`written`) and the dtype written last (`tags`)."""

    name = "fake-cuda"

    def __init__(self, memory: int = 1 << 36, compute_capability: str = "8.6") -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.written: dict[int, np.ndarray] = {}  # block -> per byte: written since the allocation
        self.tags: dict[int, str | None] = {}  # block -> numpy dtype of the bytes written last ("zero" after memset)
        self.pending: list = []
        self.free_memory, self.compute_capability = memory, compute_capability
        self.next, self.stream, self.closed = 0x10000, 7, False

    def open(self) -> FakeCuda:
        """What runtime.cuda.open_cuda gives a new backend: this device, with a new stream."""
        self.closed, self.stream = False, self.stream + 1
        return self

    def malloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        pointer = self.next
        self.next += (nbytes + 0x1000 + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.blocks[pointer], self.tags[pointer] = np.full(nbytes, 0xFF, np.uint8), None  # not zeroed
        self.written[pointer] = np.zeros(nbytes, np.bool_)
        return pointer

    def block_of(self, pointer: int) -> int | None:
        return next((start for start, b in self.blocks.items() if start <= pointer < start + b.size), None)

    def free(self, pointer: int) -> None:
        assert pointer in self.blocks, f"free of {pointer:#x}, which is not an allocation"
        del self.blocks[pointer], self.tags[pointer], self.written[pointer]

    def _enqueue(self, operation: Any) -> None:
        assert not self.closed, "work queued on a destroyed stream"
        self.pending.append(operation)

    def _span(self, pointer: int, nbytes: int) -> tuple[int, slice]:
        """(block start, where the nbytes at pointer lie in it); the span must lie inside one allocation."""
        start = self.block_of(pointer)
        assert start is not None, f"{pointer:#x} is not device memory"
        offset = pointer - start
        assert offset + nbytes <= self.blocks[start].size, f"{nbytes} bytes at {pointer:#x} run past a block of {self.blocks[start].size}"
        return start, slice(offset, offset + nbytes)

    def _store(self, start: int, where: Any, data: np.ndarray, tag: str) -> None:
        """Write bytes into a block and mark them written; the block's tag becomes `tag` (a memset's "zero" does
        not hide a dtype written before)."""
        self.blocks[start][where] = data
        self.written[start][where] = True
        if tag != "zero" or self.tags[start] in (None, "zero"):
            self.tags[start] = tag

    def _load(self, start: int, where: Any, name: str) -> np.ndarray:
        assert self.written[start][where].all(), f"{name}: reads device memory that was never written (cudaMalloc does not zero it)"
        return self.blocks[start][where]

    def memset(self, pointer: int, nbytes: int) -> None:
        start, where = self._span(pointer, nbytes)
        self._enqueue(lambda: self._store(start, where, 0, "zero"))

    def upload(self, pointer: int, host: np.ndarray) -> None:
        assert host.flags.c_contiguous, host.shape
        start, where = self._span(pointer, host.nbytes)
        # reads the host array when the stream gets there, like cudaMemcpyAsync
        self._enqueue(lambda: self._store(start, where, host.reshape(-1).view(np.uint8), host.dtype.str))

    def download(self, host: np.ndarray, pointer: int) -> None:
        assert host.flags.c_contiguous, host.shape
        start, where = self._span(pointer, host.nbytes)

        def run() -> None:
            assert self.tags[start] in (host.dtype.str, "zero"), f"download of {self.tags[start]} bytes into a {host.dtype} array"
            host.reshape(-1).view(np.uint8)[:] = self._load(start, where, "download")

        self._enqueue(run)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """cudaMemcpyAsync device to device: both spans inside allocations, not overlapping."""
        self.copy2d(dst, nbytes, src, nbytes, nbytes, 1)

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """cudaMemcpy2DAsync device to device: `height` rows of `width` bytes, each layout inside one allocation."""
        assert width <= dst_pitch and width <= src_pitch, f"width {width} exceeds a pitch ({dst_pitch}, {src_pitch})"
        (to, to_span), (of, of_span) = (self._span(p, (height - 1) * pitch + width) for p, pitch in ((dst, dst_pitch), (src, src_pitch)))
        assert to != of or to_span.stop <= of_span.start or of_span.stop <= to_span.start, "a copy between overlapping spans"
        rows = [(to_span.start + r * dst_pitch, of_span.start + r * src_pitch) for r in range(height)]

        def run() -> None:
            assert self.tags[of] is not None, "a copy of device memory that was never written"
            for d, s in rows:
                self._store(to, slice(d, d + width), self._load(of, slice(s, s + width), "copy").copy(), self.tags[of])

        self._enqueue(run)

    def sync(self) -> None:
        assert not self.closed, "sync on a destroyed stream"
        work, self.pending = self.pending, []
        for operation in work:
            operation()

    def close(self) -> None:
        self.sync()
        self.closed = True

    def read(self, pointer: int, shape: tuple[int, ...], dtype: Any, name: str) -> np.ndarray:
        start, where = self._span(pointer, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        data, tag = self._load(start, where, name), self.tags[start]
        assert tag in (np.dtype(dtype).str, "zero"), f"{name}: device bytes hold {np.dtype(tag)} but the tensor is {np.dtype(dtype)}"
        return data.view(dtype).reshape(shape).copy()

    def write(self, pointer: int, value: np.ndarray, name: str) -> None:
        start, where = self._span(pointer, value.nbytes)
        self._store(start, where, np.ascontiguousarray(value).reshape(-1).view(np.uint8), value.dtype.str)


class Strategy(enum.IntEnum):
    LAZY, EAGER, NONE = 0, 1, 2


class FakeRuntimeCache:
    def __init__(self) -> None:
        self.kernels: set[str] = set()

    def serialize(self) -> bytes:
        return json.dumps(sorted(self.kernels)).encode()

    def deserialize(self, blob: Any) -> bool:
        try:
            self.kernels = set(json.loads(bytes(blob)))
        except ValueError:
            return False
        return True


class FakeRuntimeConfig:
    def __init__(self) -> None:
        self.dynamic_shapes_kernel_specialization_strategy = Strategy.LAZY
        self.cache: FakeRuntimeCache | None = None

    def create_runtime_cache(self) -> FakeRuntimeCache:
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache: FakeRuntimeCache) -> bool:
        self.cache = cache
        return True

    def get_runtime_cache(self) -> FakeRuntimeCache | None:
        return self.cache


class FakeContext:
    def __init__(self, engine: FakeEngine, config: FakeRuntimeConfig | None):
        # As the bindings do, the context keeps its engine alive but not its IRuntimeConfig (a weak reference
        # here): the caller must keep the config for the context's life, or the next run fails.
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self._config = weakref.ref(config) if config is not None else None

    @property
    def _runtime_config(self) -> FakeRuntimeConfig | None:
        """The IRuntimeConfig, while someone else keeps it alive (not a TensorRT name: the tests read it)."""
        return self._config() if self._config is not None else None

    def set_input_shape(self, name: str, shape: Any) -> bool:
        engine = self.engine
        if name not in engine.input_names:
            return False  # TensorRT refuses outputs (and unknown names)
        declared, shape = engine.dims[name], tuple(int(s) for s in shape)
        if len(shape) != len(declared) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
            return False
        low, _, high = engine.get_tensor_profile_shape(name, 0)
        if any(not lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = shape
        return True

    def _symbols(self) -> dict[str, int]:
        return {d: s for n in self.engine.input_names for d, s in zip(self.engine.dims[n], self.shapes.get(n, ())) if isinstance(d, str)}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.input_names:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        symbols, shape = self._symbols(), []
        for dim in self.engine.dims[name]:
            if isinstance(dim, int):
                shape.append(dim)
            elif re.fullmatch(r"[\w\s+\-*]+", dim) and set(re.findall(r"[A-Za-z_]\w*", dim)) <= set(symbols):
                shape.append(int(eval(dim, {"__builtins__": {}}, symbols)))  # ONNX dim expressions like 'past_0 + 1'
            else:
                shape.append(-1)
        return tuple(shape)

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        if name not in self.engine.dims or pointer % ALIGNMENT or self.engine.cuda.block_of(pointer) is None:
            return False
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        engine, cuda = self.engine, self.engine.cuda
        missing = [n for n in engine.dims if n not in self.addresses]
        unset = [n for n in engine.input_names if n not in self.shapes and -1 in engine.get_tensor_shape(n)]
        if missing or unset or stream != cuda.stream or cuda.closed:
            engine.log(f"execute_async_v3: no address for {missing}, no shape for {unset}, or a bad stream {stream}")
            return False
        if self._config is not None and self._config() is None:
            engine.log("execute_async_v3: the IRuntimeConfig of this context was freed while the context is alive")
            return False
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what TensorRT captures at enqueue
        outputs = {n: self.get_tensor_shape(n) for n in engine.output_names}
        self._compile(shapes)
        cuda._enqueue(lambda: self._kernel(shapes, addresses, outputs))
        return True

    def _compile(self, shapes: dict) -> None:
        """TensorRT-RTX JIT: a kernel per new set of dynamic input shapes, unless the strategy is NONE."""
        if self._runtime_config is None or self._runtime_config.dynamic_shapes_kernel_specialization_strategy == Strategy.NONE:
            return
        key = f"{self.engine.sha}:{sorted(shapes.items())}"
        if self._runtime_config.cache is not None and key not in self._runtime_config.cache.kernels:
            self._runtime_config.cache.kernels.add(key)
            self.engine.module.compiles += 1

    def _kernel(self, shapes: dict, addresses: dict, outputs: dict) -> None:
        engine, cuda = self.engine, self.engine.cuda
        feeds, spans = {}, []
        for name in engine.input_names:
            shape = shapes.get(name) or engine.get_tensor_shape(name)
            value = cuda.read(addresses[name], shape, _NUMPY[engine.types[name]], name)
            feeds[name] = from_engine_dtype(value, engine.types[name], engine.onnx_types[name])
            spans.append((name, addresses[name], value.nbytes))
        for name, value in zip(engine.output_names, engine.session.run(engine.output_names, feeds)):
            value = to_engine_dtype(value, engine.types[name])  # -1: a data-dependent size, known only now
            assert len(value.shape) == len(outputs[name]) and all(o in (-1, v) for o, v in zip(outputs[name], value.shape)), \
                (name, value.shape, outputs[name])
            overlap = [n for n, p, size in spans if p < addresses[name] + value.nbytes and addresses[name] < p + size]
            assert not overlap, f"output {name} overlaps {overlap[0]} (an engine's tensors must not alias)"
            cuda.write(addresses[name], value, name)
            spans.append((name, addresses[name], value.nbytes))
        engine.runs += 1


class FakeEngine:
    def __init__(self, header: dict, onnx: bytes, module: SimpleNamespace, cuda: FakeCuda, log: Any):
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.module, self.cuda, self.log, self.runs, self.header = module, cuda, log, 0, header
        self.sha = hashlib.sha256(onnx).hexdigest()
        tensors = [*self.session.get_inputs(), *self.session.get_outputs()]
        self.input_names = [t.name for t in self.session.get_inputs()]
        self.output_names = [t.name for t in self.session.get_outputs()]
        self.dims = {t.name: list(t.shape) for t in tensors}
        self.onnx_types = {t.name: _ONNX_TYPES[t.type] for t in tensors}
        self.types = {**self.onnx_types, **header["dtypes"]}
        self.num_io_tensors = len(tensors)
        self.num_optimization_profiles = 1

    def get_tensor_name(self, index: int) -> str:
        return [*self.input_names, *self.output_names][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.input_names else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return SimpleNamespace(name=self.types[name])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.dims[name])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert profile_index == 0 and name in self.input_names, (name, profile_index)
        static = self.get_tensor_shape(name)
        return [tuple(s) for s in self.header["profiles"][name]] if name in self.header["profiles"] else [static] * 3

    @property
    def device_memory_size_v2(self) -> int:
        return self.header["device_memory"]

    def create_runtime_config(self) -> FakeRuntimeConfig:
        assert self.module.rtx, "IRuntimeConfig is TensorRT-RTX's"
        return FakeRuntimeConfig()

    def create_execution_context(self, config: FakeRuntimeConfig | None = None) -> FakeContext | None:
        if self.device_memory_size_v2 > self.cuda.free_memory:
            self.log(f"out of device memory: {self.device_memory_size_v2} bytes requested")
            return None
        self.cuda.free_memory -= self.device_memory_size_v2
        return FakeContext(self, config)


class Severity(enum.IntEnum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Severity, msg: str) -> None:
        raise NotImplementedError


def fake_trt_module(cuda: FakeCuda, version: str = "10.3.0", rtx: bool = False) -> SimpleNamespace:
    """What `import tensorrt` (or tensorrt_rtx) gives, as far as runtime.backend_trt uses it.

    `.engines` lists the engines loaded, `.loaded_from` the type of each buffer deserialized,
    `.compiles` counts JIT kernel compilations (RTX)."""
    module = SimpleNamespace(__version__=version, rtx=rtx, engines=[], loaded_from=[], compiles=0, ILogger=ILogger,
                             TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))

    class Runtime:
        def __init__(self, logger: ILogger):
            assert isinstance(logger, ILogger), "a TensorRT logger is an ILogger"
            self.logger = logger

        def _log(self, msg: str) -> None:
            self.logger.log(Severity.ERROR, msg)

        def deserialize_cuda_engine(self, data: Any) -> FakeEngine | None:
            module.loaded_from.append(type(data).__name__)
            header, onnx = _parse(data)
            if header["version"] != module.__version__ or cuda.compute_capability not in header["compute_capabilities"]:
                self._log(f"engine built with {header['version']} for {header['compute_capabilities']}: "
                          f"this is {module.__version__} on {cuda.compute_capability}")
                return None
            module.engines.append(FakeEngine(header, onnx, module, cuda, self._log))
            return module.engines[-1]

    module.Runtime = Runtime
    if rtx:
        module.DynamicShapesKernelSpecializationStrategy = Strategy
    return module
