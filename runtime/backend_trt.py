"""TensorRT backend: a build's three engines, run with `execute_async_v3` on one CUDA stream.

Works with standard TensorRT 10.x (module `tensorrt`, as on JetPack 6.1+ and JetPack 7) and
TensorRT-RTX 1.x (`tensorrt_rtx_bindings` from pip, or `tensorrt_rtx` from the SDK), whichever
flavour the manifest says built the engines. Device memory comes from `runtime.cuda` (cuda-python, or
torch built with CUDA). Open it through `runtime.backend.open_backend`, which first checks the
engines against this machine (TensorRT version, compute capability; see `runtime.device`).

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
which is shorter after a FiCoCo-L step); output shapes are read back with `get_tensor_shape`. The
return values of `set_input_shape` and `set_tensor_address` are checked (a shape outside the
engine's own optimization profile, an address TensorRT refuses). Host reads happen only after the
stream is synchronized; device memory is never assumed to be zero.

Loading: each engine file is memory-mapped and handed to `deserialize_cuda_engine`, so no second
engine-sized copy is made in host memory (Jetson's memory is shared with the GPU). TensorRT-RTX:
`get_engine_validity` checks the header first; each engine gets an `IRuntimeConfig` with a runtime
cache of JIT-compiled kernels kept in the user cache directory (`$FICOCO_CACHE/tensorrt-rtx`, else
`~/.cache/ficoco/tensorrt-rtx`; never inside the build), loaded at start and saved at `close`, and
the dynamic-shape kernel specialization strategy NONE for decode, whose cache length changes at
every step (LAZY would compile a kernel per new length), and LAZY for prefill (prompt lengths repeat).
TensorRT's warnings and errors go to stderr; the last error is part of the message of a failure.

NOT EXECUTED on a GPU: no GPU was available where this was written. tests/runtime/test_tensorrt.py
runs it against tests/runtime/fake_tensorrt.py everywhere, and for real where a GPU is present.
"""

from __future__ import annotations

import importlib
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import names

from .backend_ort import from_bf16_bits, to_bf16_bits
from .cuda import open_cuda
from .errors import TRT_MODULES, BackendError, BackendNotInstalledError, EngineMismatchError, rebuild_hint, trt_install_hint
from .manifest import Build, BuildError

_HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64, "INT32": np.int32,
                "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
SPECIALIZATION = {names.DECODE: "NONE", names.PREFILL: "LAZY"}  # dynamic-shape kernel strategy per graph (RTX)


def import_trt(flavour: str, directory: str | Path = ".") -> Any:
    """The TensorRT module of `flavour` ("tensorrt" | "tensorrt-rtx"), or BackendNotInstalledError."""
    causes = []
    for module in TRT_MODULES[flavour]:
        try:
            return importlib.import_module(module)
        except (ImportError, OSError) as error:  # OSError: a wheel whose shared libraries are missing
            causes.append(f"{module}: {error}")
    raise BackendNotInstalledError(f"{trt_install_hint(flavour, directory)} ({'; '.join(causes)})")


def runtime_cache_dir() -> Path:
    """Where TensorRT-RTX runtime caches live: $FICOCO_CACHE/tensorrt-rtx, else ~/.cache/ficoco/tensorrt-rtx."""
    root = os.environ.get("FICOCO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ficoco") / "tensorrt-rtx"


_LOGGERS: dict[tuple[str, int], Any] = {}


def _logger(trt: Any, flavour: str) -> Any:
    """One logger per TensorRT module and process: warnings and errors to stderr, errors kept in `.errors`."""
    key = (flavour, id(trt.ILogger))
    if key not in _LOGGERS:

        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= int(trt.ILogger.ERROR):
                    self.errors.append(msg)
                if int(severity) <= int(trt.ILogger.WARNING):
                    print(f"[{flavour}] {msg}", file=sys.stderr, flush=True)

        _LOGGERS[key] = _Logger()
    return _LOGGERS[key]


def _last_error(logger: Any, fallback: str) -> str:
    return " ".join(logger.errors[-1].split()) if logger.errors else fallback


@dataclass(frozen=True)
class TrtCache:
    """Which cache set holds the sequence (0 or 1) and each layer's length len_i."""

    index: int
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.index not in (0, 1) or any(n < 1 for n in self.lengths):
            raise ValueError(f"bad TrtCache: set {self.index}, lengths {self.lengths}")


def _check_validity(trt: Any, runtime: Any, logger: Any, path: Path, flavour: str, directory: Path) -> None:
    """TensorRT-RTX's header check (`get_engine_validity`, reads engine_header_size bytes) where the library has
    it; EngineMismatchError naming the diagnostics (or TensorRT's logged error) if INVALID."""
    if not hasattr(runtime, "get_engine_validity") or not hasattr(trt, "EngineValidity"):
        return
    with open(path, "rb") as handle:
        header = handle.read(int(runtime.engine_header_size))
    validity, diagnostics = runtime.get_engine_validity(header)
    if validity == trt.EngineValidity.INVALID:
        reasons = [n for n, m in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(m)]
        why = ", ".join(reasons) or _last_error(logger, "no diagnostics")
        raise EngineMismatchError(f"{flavour} says {str(path)!r} cannot run here ({why}); "
                                  f"rebuild it: {rebuild_hint(directory, flavour)}")


def _deserialize(runtime: Any, path: Path) -> Any:
    """Deserialize from a read-only memory map of the file: no engine-sized bytes object is made."""
    if path.stat().st_size == 0:
        raise BuildError(f"{str(path)!r} is empty")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return runtime.deserialize_cuda_engine(mapped)


class _RuntimeCache:
    """A TensorRT-RTX runtime cache of JIT-compiled kernels, in a file of the user cache directory."""

    def __init__(self, config: Any, path: Path):
        self.path, self.cache = path, config.create_runtime_cache()
        if path.is_file():
            self.cache.deserialize(path.read_bytes())  # False: another GPU, driver or release; starts empty
        if not config.set_runtime_cache(self.cache):
            raise BackendError(f"TensorRT-RTX refused the runtime cache {str(path)!r}")

    def save(self) -> None:
        """Write the cache atomically; a cache that cannot be written costs only time, so warn and go on."""
        data = memoryview(self.cache.serialize()).cast("B")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            print(f"warning: TensorRT-RTX runtime cache not saved: {error}", file=sys.stderr)


def _load(trt: Any, runtime: Any, logger: Any, build: Build, graph: str, flavour: str) -> Any:
    """Check the engine's header (RTX), deserialize it from a memory map; BuildError when TensorRT returns None."""
    path = build.path("engines", graph)
    _check_validity(trt, runtime, logger, path, flavour, build.directory)
    engine = _deserialize(runtime, path)
    if engine is None:
        raise BuildError(f"{flavour} {trt.__version__} cannot load {str(path)!r}: "
                         f"{_last_error(logger, 'built for another TensorRT version or GPU')}; "
                         f"rebuild the engines here: {rebuild_hint(build.directory, flavour)}")
    return engine


def _context(engine: Any, config: Any, logger: Any, graph: str) -> Any:
    """The engine's execution context (with the RTX runtime config); BackendError when TensorRT returns None."""
    context = engine.create_execution_context(config) if config is not None else engine.create_execution_context()
    if context is None:
        raise BackendError(f"TensorRT could not create an execution context for {graph}: out of GPU memory? "
                           f"({_last_error(logger, 'no TensorRT error logged')})")
    return context


class _Engine:
    """One deserialized engine, its execution context, profiles and the host dtype of each I/O tensor."""

    def __init__(self, trt: Any, runtime: Any, logger: Any, build: Build, graph: str, flavour: str):
        self.engine, self.runtime_cache, config = _load(trt, runtime, logger, build, graph, flavour), None, None
        if flavour == "tensorrt-rtx":
            config = self.engine.create_runtime_config()
            sha = build.engines[graph]["sha256"]
            self.runtime_cache = _RuntimeCache(config, runtime_cache_dir() / f"{graph}-{sha[:16]}.cache")
            if graph in SPECIALIZATION:
                strategy = getattr(trt.DynamicShapesKernelSpecializationStrategy, SPECIALIZATION[graph])
                config.dynamic_shapes_kernel_specialization_strategy = strategy
        self.context = _context(self.engine, config, logger, graph)
        tensors = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: _host_dtype(self.engine.get_tensor_dtype(n)) for n in tensors}
        self.inputs = {n for n in tensors if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}

    def static_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BuildError(f"engine tensor {name!r} has dynamic shape {shape}; expected a static one")
        return shape

    def profile(self, name: str) -> tuple[list[int], list[int]]:
        """(min, max) of input `name` in the engine's optimization profile 0."""
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        return [int(d) for d in low], [int(d) for d in high]

    def release(self) -> None:
        """Save the runtime cache, then drop the context before the engine (TensorRT's order)."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()
        self.context = None
        self.engine = None


def _host_dtype(dtype: Any) -> np.dtype:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in _HOST_DTYPES:
        raise BuildError(f"engine tensor type {name} is not supported by the runtime")
    return np.dtype(_HOST_DTYPES[name])


class TensorRTBackend:
    """TensorRT over a build's engines (see the module docstring)."""

    def __init__(self, build: Build, flavour: str):
        trt = import_trt(flavour, build.directory)
        self.build, self.logger, self.engines, self.buffers = build, _logger(trt, flavour), {}, {}
        self.logger.errors.clear()  # messages name this backend's errors only
        self.cuda = open_cuda()
        try:
            self.runtime = trt.Runtime(self.logger)
            for graph in names.GRAPHS:
                self.engines[graph] = _Engine(trt, self.runtime, self.logger, build, graph, flavour)
            self.name = f"{flavour} {trt.__version__} ({self.cuda.name})"
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _malloc(self, key: str, nbytes: int) -> int:
        self.buffers[key] = self.cuda.malloc(nbytes)
        return self.buffers[key]

    def _allocate(self) -> None:
        b, vision, prefill, decode = self.build, *(self.engines[g] for g in names.GRAPHS)
        for name in (names.PIXEL_VALUES, names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            self._malloc(name, int(np.prod(vision.static_shape(name))) * vision.dtypes[name].itemsize)
        self.features_shape = vision.static_shape(names.IMAGE_FEATURES)  # [crops, k, D]
        for name in (names.INPUT_IDS_BEFORE, names.INPUT_IDS_AFTER):
            self._malloc(name, b.max_seq_len * prefill.dtypes[name].itemsize)
        self.ids_host = np.zeros((1, 1), decode.dtypes[names.INPUT_IDS])
        self.position_host = np.zeros((1, 1), decode.dtypes[names.POSITION_IDS])
        self._malloc(names.INPUT_IDS, self.ids_host.nbytes), self._malloc(names.POSITION_IDS, self.position_host.nbytes)
        self.logits_host = np.zeros((1, b.vocab), decode.dtypes[names.LOGITS])  # [1, V]
        self._malloc(names.LOGITS, self.logits_host.nbytes)
        self.cache_dtype = decode.dtypes[names.past(0, "key")]
        self.capacity = b.kv_heads * b.max_seq_len * b.head_dim * self.cache_dtype.itemsize  # bytes per buffer
        self.cache = [[self._malloc(f"{s}.{n}", self.capacity) for n in names.cache_names(names.present, b.layers)]
                      for s in (0, 1)]

    def _run(self, graph: str) -> None:
        if not self.engines[graph].context.execute_async_v3(self.cuda.stream):
            raise BackendError(f"TensorRT failed to run {graph}: {_last_error(self.logger, 'execute_async_v3 returned false')}")

    def _address(self, graph: str, name: str, pointer: int) -> None:
        if not self.engines[graph].context.set_tensor_address(name, pointer):
            raise BackendError(f"{graph}: TensorRT refused the address {pointer:#x} of {name} "
                               f"({_last_error(self.logger, 'unaligned or unknown tensor')})")

    def _set_input(self, graph: str, name: str, shape: tuple[int, ...], pointer: int) -> None:
        engine = self.engines[graph]
        if not engine.context.set_input_shape(name, tuple(int(d) for d in shape)):
            low, high = engine.profile(name)
            raise BackendError(f"{graph}: input {name} shape {list(shape)} is outside the engine's profile {low}..{high}")
        self._address(graph, name, pointer)

    def _host(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """A host array in the input's engine dtype (bf16 as bit patterns); keep it alive until sync."""
        dtype = self.engines[graph].dtypes[name]
        return to_bf16_bits(array) if dtype == np.uint16 else np.ascontiguousarray(array, dtype=dtype)

    def _upload(self, graph: str, name: str, host: np.ndarray) -> None:
        """Copy `host` into the input's buffer and set the input's shape and address."""
        self.cuda.upload(self.buffers[name], host)
        self._set_input(graph, name, host.shape, self.buffers[name])

    def _logits(self) -> np.ndarray:
        """Download logits [1, V] after the run and synchronize; returns [V] as float32."""
        self.cuda.download(self.logits_host, self.buffers[names.LOGITS])
        self.cuda.sync()  # only now does logits_host hold this step's values
        row = self.logits_host[0]
        return from_bf16_bits(row) if row.dtype == np.uint16 else row.astype(np.float32, copy=False)

    def vision(self, pixel_values: np.ndarray) -> int:
        """pixel_values [crops, 3, S, S] -> device pointer of image_features [crops, k, D]."""
        pixels = self._host(names.VISION, names.PIXEL_VALUES, pixel_values)
        self._upload(names.VISION, names.PIXEL_VALUES, pixels)
        for name in (names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            self._address(names.VISION, name, self.buffers[name])
        self._run(names.VISION)
        self.cuda.sync()  # `pixels` may be a conversion of pixel_values: it must outlive the copy
        return self.buffers[names.IMAGE_FEATURES]

    def vision_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the last `vision` call's image_features [crops, k, D] (float32) and kept_positions [crops, k]."""
        engine = self.engines[names.VISION]
        out = [np.empty(engine.static_shape(n), engine.dtypes[n]) for n in (names.IMAGE_FEATURES, names.KEPT_POSITIONS)]
        for host, name in zip(out, (names.IMAGE_FEATURES, names.KEPT_POSITIONS)):
            self.cuda.download(host, self.buffers[name])
        self.cuda.sync()
        features = from_bf16_bits(out[0]) if out[0].dtype == np.uint16 else out[0].astype(np.float32)
        return features, out[1]

    def _bind_outputs(self, graph: str, target: int) -> tuple[int, ...]:
        """Point logits and present.{i}.* at cache set `target`; returns each layer's output length."""
        context, lengths = self.engines[graph].context, []
        self._address(graph, names.LOGITS, self.buffers[names.LOGITS])
        for index, name in enumerate(names.cache_names(names.present, self.build.layers)):
            shape = tuple(int(d) for d in context.get_tensor_shape(name))  # [1, Hkv, len_i, Dh]
            nbytes = int(np.prod(shape)) * self.cache_dtype.itemsize
            if len(shape) != 4 or min(shape) < 1 or nbytes > self.capacity:
                raise BackendError(f"{graph}: {name} has shape {list(shape)}; the cache holds {self.build.max_seq_len} tokens")
            self._address(graph, name, self.cache[target][index])
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
        self.ids_host[0, 0], self.position_host[0, 0] = token, position  # the last step synchronized: free to write
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
        """Set 0 zeroed (device memory is not zero when allocated), layer i of length lengths[i] (to time decode steps)."""
        if len(lengths) != self.build.layers or max(lengths) >= self.build.max_seq_len:
            raise ValueError(f"need {self.build.layers} cache lengths below {self.build.max_seq_len}, got {lengths}")
        for pointer in self.cache[0]:
            self.cuda.memset(pointer, self.capacity)
        self.cuda.sync()
        return TrtCache(0, tuple(lengths))

    def close(self) -> None:
        """Synchronize, save the RTX runtime caches, drop contexts and engines, free every buffer, destroy the stream."""
        if getattr(self, "cuda", None) is None:
            return
        self.cuda.sync()
        for engine in self.engines.values():
            engine.release()
        self.engines.clear()
        self.runtime = None
        for pointer in self.buffers.values():
            self.cuda.free(pointer)
        self.buffers.clear()
        self.cuda.close()
        self.cuda = None
