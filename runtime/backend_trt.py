"""TensorRT backend: a build's three engines, run with `execute_async_v3` on one CUDA stream.

Works with standard TensorRT (module `tensorrt`, >= 10, as on JetPack 6) and TensorRT-RTX
(`tensorrt_rtx_bindings` from pip, or `tensorrt_rtx` from the SDK), whichever flavour the manifest
says built the engines. Device memory comes from `runtime.cuda` (cuda-python, or torch).

Buffers are allocated once, at their largest size, and every tensor address is set before each run:

* vision: pixel_values [crops, 3, S, S] (uploaded), image_features [crops, k, D] (stays on the GPU and
  is prefill's input as is), kept_positions [crops, k] (an output TensorRT must have an address for).
* ids: input_ids_before / input_ids_after of capacity max_seq_len, decode's input_ids and
  position_ids [1, 1]; logits [1, V] shared by prefill and decode, downloaded after each step.
* caches: two sets ("ping" and "pong") of `2 * layers` buffers, each of capacity
  [1, Hkv, max_seq_len, Dh]. The graphs return the whole cache (past + new), so a step cannot
  write in place ([1, Hkv, len, Dh] and [1, Hkv, len + 1, Dh] lay the heads out differently):
  prefill writes set 0, decode reads set s and writes set 1 - s. Costs twice the cache memory and
  no copy besides the graph's own; a step moves `2 * sum_i Hkv * len_i * Dh` values, growing with
  the sequence. A TrtCache is therefore only valid until the step after the one that consumes it.

Dynamic dimensions are set with `set_input_shape` (text lengths, each layer's own past length,
which is shorter after a FiCoCo-L step); output shapes are read back with `get_tensor_shape`.

NOT EXECUTED: no GPU was available where this was written (see tests/runtime/test_tensorrt.py,
which runs only where TensorRT, a CUDA device and an engine build are present).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime import names

from .backend import HINTS, TRT_MODULES, BackendError, BackendNotInstalledError, cuda_devices
from .backend_ort import from_bf16_bits, to_bf16_bits
from .cuda import open_cuda
from .manifest import Build, BuildError

_HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64, "INT32": np.int32,
                "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def import_trt(flavour: str) -> Any:
    """The TensorRT module of `flavour` ("tensorrt" | "tensorrt-rtx"), or BackendNotInstalledError."""
    causes = []
    for module in TRT_MODULES[flavour]:
        try:
            return importlib.import_module(module)
        except (ImportError, OSError) as error:  # OSError: a wheel whose shared libraries are missing
            causes.append(f"{module}: {error}")
    raise BackendNotInstalledError(f"{HINTS[flavour]} ({'; '.join(causes)})")


@dataclass(frozen=True)
class TrtCache:
    """Which cache set holds the sequence (0 or 1) and each layer's length len_i."""

    index: int
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.index not in (0, 1) or any(n < 1 for n in self.lengths):
            raise ValueError(f"bad TrtCache: set {self.index}, lengths {self.lengths}")


class _Engine:
    """One deserialized engine, its execution context and the host dtype of each I/O tensor."""

    def __init__(self, trt: Any, runtime: Any, path: Any, flavour: str):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BuildError(f"{flavour} {trt.__version__} cannot load {str(path)!r}: built for another TensorRT "
                             f"version or GPU? (rebuild with python -m export.build --from-onnx on this device)")
        self.engine, self.context = engine, engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{flavour} could not create an execution context for {str(path)!r} (out of GPU memory?)")
        names_ = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {n: _host_dtype(engine.get_tensor_dtype(n)) for n in names_}
        self.inputs = {n for n in names_ if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}

    def static_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BuildError(f"engine tensor {name!r} has dynamic shape {shape}; expected a static one")
        return shape


def _host_dtype(dtype: Any) -> np.dtype:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in _HOST_DTYPES:
        raise BuildError(f"engine tensor type {name} is not supported by the runtime")
    return np.dtype(_HOST_DTYPES[name])


class TensorRTBackend:
    """TensorRT over a build's engines (see the module docstring)."""

    def __init__(self, build: Build, flavour: str):
        trt = import_trt(flavour)
        if cuda_devices() < 1:
            raise BackendNotInstalledError("no CUDA device is visible; the TensorRT backend needs one (use --backend onnxruntime)")
        self.build, self.cuda = build, open_cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {g: _Engine(trt, self.runtime, build.path("engines", g), flavour) for g in names.GRAPHS}
        self.name = f"{flavour} {trt.__version__} ({self.cuda.name})"
        self.buffers: dict[str, int] = {}
        self._allocate()

    def _malloc(self, key: str, nbytes: int) -> int:
        self.buffers[key] = self.cuda.malloc(nbytes)
        return self.buffers[key]

    def _allocate(self) -> None:
        b, vision, decode = self.build, self.engines[names.VISION], self.engines[names.DECODE]
        for name in (names.PIXEL_VALUES, names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            self._malloc(name, int(np.prod(vision.static_shape(name))) * vision.dtypes[name].itemsize)
        self.features_shape = vision.static_shape(names.IMAGE_FEATURES)  # [crops, k, D]
        for name in (names.INPUT_IDS_BEFORE, names.INPUT_IDS_AFTER):
            self._malloc(name, b.max_seq_len * 8)
        self.ids_host = np.zeros((1, 1), decode.dtypes[names.INPUT_IDS])
        self.position_host = np.zeros((1, 1), decode.dtypes[names.POSITION_IDS])
        self._malloc(names.INPUT_IDS, 8), self._malloc(names.POSITION_IDS, 8)
        self.logits_host = np.zeros((1, b.vocab), decode.dtypes[names.LOGITS])  # [1, V]
        self._malloc(names.LOGITS, self.logits_host.nbytes)
        self.cache_dtype = decode.dtypes[names.past(0, "key")]
        self.capacity = b.kv_heads * b.max_seq_len * b.head_dim * self.cache_dtype.itemsize  # bytes per buffer
        self.cache = [[self._malloc(f"{s}.{n}", self.capacity) for n in names.cache_names(names.present, b.layers)]
                      for s in (0, 1)]

    def _run(self, graph: str) -> None:
        if not self.engines[graph].context.execute_async_v3(self.cuda.stream):
            raise BackendError(f"TensorRT failed to run {graph} (enqueue returned false; see the log above)")

    def _set_input(self, graph: str, name: str, shape: tuple[int, ...], pointer: int) -> None:
        context = self.engines[graph].context
        if not context.set_input_shape(name, shape):
            raise BackendError(f"{graph}: input {name} shape {list(shape)} is outside the engine's profile")
        context.set_tensor_address(name, pointer)

    def _host(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """A host array in the input's engine dtype (bf16 as bit patterns); keep it alive until sync."""
        dtype = self.engines[graph].dtypes[name]
        return to_bf16_bits(array) if dtype == np.uint16 else np.ascontiguousarray(array, dtype=dtype)

    def _upload(self, graph: str, name: str, host: np.ndarray) -> None:
        """Copy `host` into the input's buffer and set the input's shape and address."""
        self.cuda.upload(self.buffers[name], host)
        self._set_input(graph, name, host.shape, self.buffers[name])

    def _logits(self) -> np.ndarray:
        """Download logits [1, V] after the run and synchronize; returns [V] (a view, reused)."""
        self.cuda.download(self.logits_host, self.buffers[names.LOGITS])
        self.cuda.sync()
        row = self.logits_host[0]
        return from_bf16_bits(row) if row.dtype == np.uint16 else row

    def vision(self, pixel_values: np.ndarray) -> int:
        """pixel_values [crops, 3, S, S] -> device pointer of image_features [crops, k, D]."""
        pixels = self._host(names.VISION, names.PIXEL_VALUES, pixel_values)
        self._upload(names.VISION, names.PIXEL_VALUES, pixels)
        context = self.engines[names.VISION].context
        for name in (names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            context.set_tensor_address(name, self.buffers[name])
        self._run(names.VISION)
        self.cuda.sync()
        return self.buffers[names.IMAGE_FEATURES]

    def _bind_outputs(self, graph: str, target: int) -> tuple[int, ...]:
        """Point logits and present.{i}.* at cache set `target`; returns each layer's output length."""
        context, lengths = self.engines[graph].context, []
        context.set_tensor_address(names.LOGITS, self.buffers[names.LOGITS])
        for index, name in enumerate(names.cache_names(names.present, self.build.layers)):
            shape = tuple(int(d) for d in context.get_tensor_shape(name))  # [1, Hkv, len_i, Dh]
            nbytes = int(np.prod(shape)) * self.cache_dtype.itemsize
            if len(shape) != 4 or min(shape) < 1 or nbytes > self.capacity:
                raise BackendError(f"{graph}: {name} has shape {list(shape)}; the cache holds {self.build.max_seq_len} tokens")
            context.set_tensor_address(name, self.cache[target][index])
            lengths.append(shape[2])
        return tuple(lengths[0::2])

    def prefill(self, before: np.ndarray, features: int, after: np.ndarray) -> tuple[np.ndarray, TrtCache]:
        """ids before [1, Tb], features (device) [crops, k, D], ids after [1, Ta] -> (logits [V], cache in set 0)."""
        graph = names.PREFILL
        hosts = [self._host(graph, name, ids) for name, ids in ((names.INPUT_IDS_BEFORE, before), (names.INPUT_IDS_AFTER, after))]
        if max(h.shape[1] for h in hosts) > self.build.max_seq_len:
            raise BackendError(f"prefill: text of {[h.shape[1] for h in hosts]} tokens exceeds max_seq_len {self.build.max_seq_len}")
        self._upload(graph, names.INPUT_IDS_BEFORE, hosts[0])
        self._upload(graph, names.INPUT_IDS_AFTER, hosts[1])
        self._set_input(graph, names.IMAGE_FEATURES, self.features_shape, features)
        lengths = self._bind_outputs(graph, 0)
        self._run(graph)
        return self._logits(), TrtCache(0, lengths)  # _logits synchronizes: `hosts` were alive until then

    def decode(self, token: int, position: int, cache: TrtCache) -> tuple[np.ndarray, TrtCache]:
        """One token at `position` over cache set s (len_i) -> (logits [V], cache in set 1 - s, len_i + 1)."""
        graph, b = names.DECODE, self.build
        self.ids_host[0, 0], self.position_host[0, 0] = token, position
        self._upload(graph, names.INPUT_IDS, self.ids_host)
        self._upload(graph, names.POSITION_IDS, self.position_host)
        for index, name in enumerate(names.cache_names(names.past, b.layers)):
            shape = (1, b.kv_heads, cache.lengths[index // 2], b.head_dim)
            self._set_input(graph, name, shape, self.cache[cache.index][index])
        lengths = self._bind_outputs(graph, 1 - cache.index)
        self._run(graph)
        return self._logits(), TrtCache(1 - cache.index, lengths)

    def cache_lengths(self, cache: TrtCache) -> tuple[int, ...]:
        return cache.lengths

    def empty_cache(self, lengths: tuple[int, ...]) -> TrtCache:
        """Set 0 zeroed, with layer i of length lengths[i] (to time decode steps at any length)."""
        if len(lengths) != self.build.layers or max(lengths) >= self.build.max_seq_len:
            raise ValueError(f"need {self.build.layers} cache lengths below {self.build.max_seq_len}, got {lengths}")
        for pointer in self.cache[0]:
            self.cuda.memset(pointer, self.capacity)
        self.cuda.sync()
        return TrtCache(0, tuple(lengths))

    def close(self) -> None:
        self.cuda.sync()
        for pointer in self.buffers.values():
            self.cuda.free(pointer)
        self.buffers.clear()
        self.engines.clear()
