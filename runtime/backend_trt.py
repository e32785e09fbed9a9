"""TensorRT backend: a build's engines, run with `execute_async_v3` on one CUDA stream, the KV cache
allocated once on the device and updated in place (the steps of runtime/backend_ort.py, on the GPU).

Works with standard TensorRT 10.x (module `tensorrt`, as on JetPack 6.1+ and JetPack 7) and
TensorRT-RTX 1.x (`tensorrt_rtx_bindings` from pip, or `tensorrt_rtx` from the SDK), whichever
flavour the manifest says built the engines. Device memory comes from `runtime.cuda` (cuda-python, or
torch built with CUDA). Open it through `runtime.backend.open_backend`, which first checks the
engines against this machine (TensorRT version, compute capability; see `runtime.device`).

Engines: every graph but embed.onnx (`ENGINELESS`): vision, decoder.0 .. decoder.S, reduce.1 .. reduce.S.
Each has one optimization profile, which fixes the cache capacity at its segment's
(`export.from_onnx.dim_ranges`): every step binds the whole cache buffers.

* vision: pixel_values [crops, 3, S, S] (uploaded) -> image_features [n, D], which stays on the device
  for prefill, and kept_positions [crops, k] (an output TensorRT must have an address for).
* prefill: text rows looked up on the host (`runtime.kvcache.Embedding`) are uploaded into
  hidden_states [1, P, D] around the image features (copied device to device). Each segment runs
  with past_length 0; its new rows [1, Hkv, q, Dh] go to a scratch buffer, then into the cache
  buffers at rows 0 .. q - 1 (`copy2d`: Hkv rows of q * Dh values, destination pitch capacity * Dh).
  reduce.s runs between decoder.{s-1} and decoder.s. The logits [1, V] are downloaded.
* decode: one embedding row uploaded, the segments only (decoder.s's `attended` is decoder.{s+1}'s
  hidden_states), past_length = the segment's cache length; each layer's new row is written at row
  len_i: `2 * layers * Hkv * Dh` values copied per step besides what the engines read and write.

Device buffers, allocated once: the KV cache, per layer a key and a value buffer [1, Hkv,
capacity_i, Dh] (`BuildPlan.capacities`), zeroed once (the graphs mask the rows from past_length on but
still multiply them by zero, and cudaMalloc'd memory may hold NaN); `present`, a scratch for one
segment's new rows at its capacity, shared by the segments (as large as the largest segment's
cache); hidden_states / attended [1, max_seq_len, D] and position_ids / reduced_position_ids
[1, max_seq_len], each pair alternating as input and output (an output never aliases an input);
with FiCoCo-L attention [1, max_seq_len, max_seq_len], input_ids_before and kept; past_length per
segment; logits [1, V]. Tensors passed between engines share a buffer, so their engine types must
agree; that, and each engine's cache capacity against the manifest, is checked at load.

Dynamic dimensions are set with `set_input_shape`; output shapes are read back with
`get_tensor_shape` and checked before each run (a reduction's token count may read -1,
data-dependent, before the run: its buffers hold the largest). The results of `set_input_shape` and
`set_tensor_address` are checked. Host reads happen only after the stream is synchronized (each step
ends with one); host arrays stay alive until then.

Loading: each engine file is memory-mapped and handed to `deserialize_cuda_engine`, so no second
engine-sized copy is made in host memory (Jetson's memory is shared with the GPU). TensorRT-RTX:
`get_engine_validity` checks the header first; each engine gets an `IRuntimeConfig` with a runtime
cache of JIT-compiled kernels kept in the user cache directory (`$FICOCO_CACHE/tensorrt-rtx`, else
`~/.cache/ficoco/tensorrt-rtx`; never inside the build), loaded at start and saved at `close`, and
the dynamic-shape kernel specialization strategy LAZY: the decode shapes never change (q = 1 at a
fixed capacity), so a segment compiles one decode kernel, and one per new prompt length at prefill.
TensorRT's warnings and errors go to stderr; the last error is part of the message of a failure.

NOT EXECUTED on a GPU: no GPU was available where this was written. tests/runtime/test_tensorrt.py
runs it against tests/runtime/fake_tensorrt.py everywhere, and for real where a GPU is present.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtime import names

from ficoco.plan import Segment

from .chain import Chain
from .cuda import open_cuda
from .errors import BackendError, EngineMismatchError, rebuild_hint
from .kvcache import Embedding, KVCache, from_bf16_bits, to_bf16_bits
from .manifest import Build, BuildError
from .trtlib import import_trt
from .trtlib import last_error as _last_error
from .trtlib import logger as _logger

_HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64, "INT32": np.int32,
                "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
SPECIALIZATION = "LAZY"  # TensorRT-RTX's dynamic-shape kernel strategy, every engine (module docstring)
ENGINELESS = (names.EMBED,)  # as export.from_onnx.ENGINELESS: the runtime looks embeddings up itself
ALIGNMENT = 256  # bytes: where each slice of the `present` scratch starts


def runtime_cache_dir() -> Path:
    """Where TensorRT-RTX runtime caches live: $FICOCO_CACHE/tensorrt-rtx, else ~/.cache/ficoco/tensorrt-rtx."""
    root = os.environ.get("FICOCO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ficoco") / "tensorrt-rtx"


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
        self.engine, self.runtime_cache, self.config = _load(trt, runtime, logger, build, graph, flavour), None, None
        if flavour == "tensorrt-rtx":  # the IRuntimeConfig is kept for the context's life: the binding does not keep it
            self.config = self.engine.create_runtime_config()
            sha = build.engines[graph]["sha256"]
            self.runtime_cache = _RuntimeCache(self.config, runtime_cache_dir() / f"{graph}-{sha[:16]}.cache")
            strategy = getattr(trt.DynamicShapesKernelSpecializationStrategy, SPECIALIZATION)
            self.config.dynamic_shapes_kernel_specialization_strategy = strategy
        self.context = _context(self.engine, self.config, logger, graph)
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
        """Save the runtime cache, then drop the context before its runtime config and the engine (TensorRT's order)."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()
        self.context = None
        self.config = None
        self.engine = None


def _host_dtype(dtype: Any) -> np.dtype:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in _HOST_DTYPES:
        raise BuildError(f"engine tensor type {name} is not supported by the runtime")
    return np.dtype(_HOST_DTYPES[name])


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class TensorRTBackend:
    """TensorRT over a build's engines (see the module docstring)."""

    def __init__(self, build: Build, flavour: str):
        trt = import_trt(flavour, build.directory)
        self.build, self.logger, self.engines, self.buffers = build, _logger(trt, flavour), {}, {}
        self.logger.errors.clear()  # messages name this backend's errors only
        self.cuda = open_cuda()
        try:
            self.runtime = trt.Runtime(self.logger)
            for graph in build.graph_names:
                if graph not in ENGINELESS:
                    self.engines[graph] = _Engine(trt, self.runtime, self.logger, build, graph, flavour)
            self.name = f"{flavour} {trt.__version__} ({self.cuda.name})"
            self.plan = build.plan
            self._check_capacities()
            self._allocate()
            self.chain = Chain(self.plan, Embedding(build), self)
        except BaseException:
            self.close()
            raise

    def _malloc(self, key: str, nbytes: int) -> int:
        self.buffers[key] = self.cuda.malloc(nbytes)
        return self.buffers[key]

    def _shared_dtype(self, wanted: Any, what: str) -> np.dtype | None:
        """The engine type of every tensor whose name `wanted` accepts (they pass through one buffer); None if none has one."""
        found = {f"{g}.{n}": d for g, e in self.engines.items() for n, d in e.dtypes.items() if wanted(n)}
        if len(set(found.values())) > 1:
            listed = ", ".join(f"{name} {dtype.name}" for name, dtype in found.items())
            raise BuildError(f"the engines pass {what} between them in different types ({listed}); rebuild them: "
                             f"{rebuild_hint(self.build.directory, self.build.tensorrt_flavour)}")
        return next(iter(found.values()), None)

    def _check_capacities(self) -> None:
        """Each segment's profile fixes its cache capacity; it must be the plan's (`BuildPlan.segments`)."""
        for segment in self.plan.segments:
            graph = names.decoder(segment.index)
            for name, i in ((names.past(i, kind), i) for i in segment.layers for kind in ("key", "value")):
                low, high = self.engines[graph].profile(name)
                if len(low) != 4 or low[2] != segment.capacity or high[2] != segment.capacity:
                    raise BuildError(f"{graph}: the engine takes {name} of capacity {low[2:3]}..{high[2:3]}, but this build's "
                                     f"max_seq_len gives layer {i} {segment.capacity}; rebuild the engines: "
                                     f"{rebuild_hint(self.build.directory, self.build.tensorrt_flavour)}")

    def _allocate(self) -> None:
        """Every buffer, once (module docstring)."""
        b, vision, tokens = self.build, self.engines[names.VISION], self.build.max_seq_len
        for name in (names.PIXEL_VALUES, names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            self._malloc(name, int(np.prod(vision.static_shape(name))) * vision.dtypes[name].itemsize)
        self.features_shape = vision.static_shape(names.IMAGE_FEATURES)  # [n, D]
        floats = (names.IMAGE_FEATURES, names.HIDDEN_STATES, names.ATTENDED)
        self.float = self._shared_dtype(lambda n: n in floats, "hidden states")
        ints = self._shared_dtype(lambda n: n in (names.POSITION_IDS, names.REDUCED_POSITION_IDS), "position ids")
        for name in (names.HIDDEN_STATES, names.ATTENDED):
            self._malloc(name, tokens * b.hidden * self.float.itemsize)
        for name in (names.POSITION_IDS, names.REDUCED_POSITION_IDS):
            self._malloc(name, tokens * ints.itemsize)
        for name, count in ((names.ATTENTION, tokens * tokens), (names.INPUT_IDS_BEFORE, tokens), (names.KEPT, b.plan.visual_tokens)):
            dtype = self._shared_dtype(lambda n, name=name: n == name, name)
            if dtype is not None:  # FiCoCo-L's tensors
                self._malloc(name, count * dtype.itemsize)
        self.past_lengths = {}  # per segment: its past_length, on the host and in a device buffer of its own
        for graph in (names.decoder(s.index) for s in self.plan.segments):
            self.past_lengths[graph] = np.zeros(1, self.engines[graph].dtypes[names.PAST_LENGTH])
            self._malloc(f"{graph}.{names.PAST_LENGTH}", self.past_lengths[graph].nbytes)
        last = names.decoder(self.plan.segments[-1].index)
        self.logits_host = np.zeros((1, b.vocab), self.engines[last].dtypes[names.LOGITS])  # [1, V]
        self._malloc(names.LOGITS, self.logits_host.nbytes)
        self._allocate_cache()

    def _allocate_cache(self) -> None:
        """Per layer a key and a value buffer at its capacity, zeroed once; the `present` scratch, in slices per segment."""
        b, capacities = self.build, self.plan.capacities
        self.cache_dtype = self._shared_dtype(lambda n: n.startswith(("past.", "present.")), "the KV cache")
        self.row = b.head_dim * self.cache_dtype.itemsize  # bytes of one token's key (or value) in one head
        buffers = {}
        for kind in ("key", "value"):
            buffers[kind] = [self._malloc(names.past(i, kind), b.kv_heads * capacities[i] * self.row) for i in range(b.layers)]
            for i, pointer in enumerate(buffers[kind]):
                self.cuda.memset(pointer, b.kv_heads * capacities[i] * self.row)
        self.cache = KVCache(buffers["key"], buffers["value"], [0] * b.layers, capacities)
        self.slice = {names.decoder(s.index): _aligned(b.kv_heads * s.capacity * self.row) for s in self.plan.segments}
        self._malloc("present", max(2 * len(s.layers) * self.slice[names.decoder(s.index)] for s in self.plan.segments))

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

    def _output(self, graph: str, name: str, expected: tuple[int, ...], pointer: int, free: tuple[int, ...] = ()) -> None:
        """Point output `name` at `pointer`, once its shape is `expected`; dimensions in `free` may read -1
        (data-dependent: known after the run; the buffer holds the largest)."""
        shape = [int(d) for d in self.engines[graph].context.get_tensor_shape(name)]
        fits = all(d == e or (d == -1 and k in free) for k, (d, e) in enumerate(zip(shape, expected)))
        if len(shape) != len(expected) or not fits:
            raise BackendError(f"{graph}: {name} has shape {shape}; the step expects {list(expected)}")
        self._address(graph, name, pointer)

    def _host(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """A host array in the input's engine dtype (bf16 as bit patterns); keep it alive until sync."""
        dtype = self.engines[graph].dtypes[name]
        return to_bf16_bits(array) if dtype == np.uint16 else np.ascontiguousarray(array, dtype=dtype)

    def _put(self, pointer: int, host: np.ndarray) -> None:
        if host.nbytes:
            self.cuda.upload(pointer, host)

    def vision(self, pixel_values: np.ndarray) -> int:
        """pixel_values [crops, 3, S, S] -> device pointer of image_features [n, D]."""
        pixels = self._host(names.VISION, names.PIXEL_VALUES, pixel_values)
        self.cuda.upload(self.buffers[names.PIXEL_VALUES], pixels)
        self._set_input(names.VISION, names.PIXEL_VALUES, pixels.shape, self.buffers[names.PIXEL_VALUES])
        for name in (names.IMAGE_FEATURES, names.KEPT_POSITIONS):
            self._address(names.VISION, name, self.buffers[name])
        self._run(names.VISION)
        self.cuda.sync()  # `pixels` may be a conversion of pixel_values: it must outlive the copy
        return self.buffers[names.IMAGE_FEATURES]

    def vision_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the last `vision` call's image_features [n, D] (float32) and kept_positions [crops, k]."""
        engine = self.engines[names.VISION]
        out = [np.empty(engine.static_shape(n), engine.dtypes[n]) for n in (names.IMAGE_FEATURES, names.KEPT_POSITIONS)]
        for host, name in zip(out, (names.IMAGE_FEATURES, names.KEPT_POSITIONS)):
            self.cuda.download(host, self.buffers[name])
        self.cuda.sync()
        features = from_bf16_bits(out[0]) if out[0].dtype == np.uint16 else out[0].astype(np.float32)
        return features, out[1]

    def _scratch(self, graph: str, index: int) -> int:
        """Where segment `graph` writes its index-th present output (2 * slot + 0 key, + 1 value)."""
        return self.buffers["present"] + index * self.slice[graph]

    def _segment(self, graph: str, last: bool, layers: range, q: int, io: tuple[int, int, int], past_length: int) -> None:
        """Queue decoder segment `graph` on q tokens, io = (hidden_states, position_ids, attended) pointers, with its
        layers' whole buffers as the past; then its new rows into the buffers at row past_length (`_write_rows`)."""
        b, cache, (hidden, positions, attended) = self.build, self.cache, io
        self._set_input(graph, names.HIDDEN_STATES, (1, q, b.hidden), hidden)
        self._set_input(graph, names.POSITION_IDS, (1, q), positions)
        self.past_lengths[graph][0] = past_length  # the last step synchronized: the host array is free
        self.cuda.upload(self.buffers[f"{graph}.{names.PAST_LENGTH}"], self.past_lengths[graph])
        self._set_input(graph, names.PAST_LENGTH, (1,), self.buffers[f"{graph}.{names.PAST_LENGTH}"])
        for slot, i in enumerate(layers):
            for k, (kind, buffers) in enumerate((("key", cache.keys), ("value", cache.values))):
                self._set_input(graph, names.past(i, kind), (1, b.kv_heads, cache.capacities[i], b.head_dim), buffers[i])
                self._output(graph, names.present(i, kind), (1, b.kv_heads, q, b.head_dim), self._scratch(graph, 2 * slot + k))
        if last:
            self._output(graph, names.LOGITS, (1, b.vocab), self.buffers[names.LOGITS])
        else:
            self._output(graph, names.ATTENDED, (1, q, b.hidden), attended)
            self._output(graph, names.ATTENTION, (1, q, q), self.buffers[names.ATTENTION])
        self._run(graph)
        self._write_rows(graph, layers, q, past_length)

    def _write_rows(self, graph: str, layers: range, q: int, row: int) -> None:
        """Each layer's q new rows (scratch [1, Hkv, q, Dh]) into its buffers at rows row .. row + q - 1."""
        cache, width = self.cache, q * self.row
        for slot, i in enumerate(layers):
            for k, buffers in enumerate((cache.keys, cache.values)):
                self.cuda.copy2d(buffers[i] + row * self.row, cache.capacities[i] * self.row,
                                 self._scratch(graph, 2 * slot + k), width, width, self.build.kv_heads)

    # ------------------------------------------------------------------ the chain's steps (runtime.chain)

    def prompt(self, before_rows: np.ndarray, features: int, after_rows: np.ndarray, before_ids: np.ndarray) -> None:
        """Queue hidden_states [1, P, D] (text rows uploaded around the image features, copied device to device),
        position ids 0 .. P-1 and, with FiCoCo-L, input_ids_before; the host arrays stay alive until the sync."""
        graph, row, n = names.decoder(0), self.build.hidden * self.float.itemsize, self.features_shape[0]
        text = [self._host(graph, names.HIDDEN_STATES, rows) for rows in (before_rows, after_rows)]
        hidden = self.buffers[names.HIDDEN_STATES]
        self._put(hidden, text[0])
        self.cuda.copy(hidden + len(text[0]) * row, features, n * row)
        self._put(hidden + (len(text[0]) + n) * row, text[1])
        self.alive = [*text, self._host(graph, names.POSITION_IDS, np.arange(len(text[0]) + n + len(text[1]))[None])]
        self.cuda.upload(self.buffers[names.POSITION_IDS], self.alive[-1])
        if names.INPUT_IDS_BEFORE in self.buffers:
            self.alive.append(self._host(names.reduce(1), names.INPUT_IDS_BEFORE, before_ids))
            self.cuda.upload(self.buffers[names.INPUT_IDS_BEFORE], self.alive[-1])
        self.io = [self.buffers[names.HIDDEN_STATES], self.buffers[names.POSITION_IDS], self.buffers[names.ATTENDED]]
        self.other_positions = self.buffers[names.REDUCED_POSITION_IDS]

    def token(self, row: np.ndarray, position: int) -> None:
        """Upload one token's hidden state [1, 1, D] and position."""
        graph = names.decoder(0)
        hidden = self._host(graph, names.HIDDEN_STATES, row[None])
        position_ids = self._host(graph, names.POSITION_IDS, np.array([[position]]))
        self.cuda.upload(self.buffers[names.HIDDEN_STATES], hidden)
        self.cuda.upload(self.buffers[names.POSITION_IDS], position_ids)
        self.alive = [hidden, position_ids]  # until the sync
        self.io = [self.buffers[names.HIDDEN_STATES], self.buffers[names.POSITION_IDS], self.buffers[names.ATTENDED]]

    def segment(self, segment: Segment, q: int, past_length: int, prefill: bool) -> None:
        """decoder.s over its layers' whole buffers; at decode its attended output is the next segment's input."""
        self._segment(names.decoder(segment.index), segment.step is None, segment.layers, q, tuple(self.io), past_length)
        if not prefill:  # no reductions: attended is the next segment's hidden_states
            self.io[0], self.io[2] = self.io[2], self.io[0]

    def reduce(self, segment: Segment, q: int, text_before: int) -> None:
        """Queue reduce.{s+1} on q tokens (attended, attention, position ids) into hidden_states and the other
        position-id buffer; the kept set stays on the device."""
        b, graph, step = self.build, names.reduce(segment.index + 1), segment.step
        left = q - step.r
        self._set_input(graph, names.ATTENDED, (1, q, b.hidden), self.buffers[names.ATTENDED])
        self._set_input(graph, names.ATTENTION, (1, q, q), self.buffers[names.ATTENTION])
        self._set_input(graph, names.POSITION_IDS, (1, q), self.io[1])
        self._set_input(graph, names.INPUT_IDS_BEFORE, (1, text_before), self.buffers[names.INPUT_IDS_BEFORE])
        self._output(graph, names.HIDDEN_STATES, (1, left, b.hidden), self.buffers[names.HIDDEN_STATES], free=(1,))
        self._output(graph, names.REDUCED_POSITION_IDS, (1, left), self.other_positions, free=(1,))
        self._output(graph, names.KEPT, (1, step.tokens_out), self.buffers[names.KEPT], free=(1,))
        self._run(graph)
        self.io[1], self.other_positions = self.other_positions, self.io[1]

    def logits(self) -> np.ndarray:
        """Download logits [1, V] after the run and synchronize; returns [V] as float32."""
        self.cuda.download(self.logits_host, self.buffers[names.LOGITS])
        self.cuda.sync()  # only now does logits_host hold this step's values
        row = self.logits_host[0]
        return from_bf16_bits(row) if row.dtype == np.uint16 else row.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ the Backend interface (runtime.backend)

    def prefill(self, before: np.ndarray, features: int, after: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """ids before [1, Tb], features (device pointer of image_features [n, D]), ids after [1, Ta] ->
        (logits [V], the cache filled with the prompt)."""
        return self.chain.prefill(before, features, after)

    def decode(self, token: int, position: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One token at `position` -> (logits [V], the same cache, one row longer in every layer)."""
        return self.chain.decode(token, position, cache)

    def cache_lengths(self, cache: KVCache) -> tuple[int, ...]:
        """len_i of every layer."""
        return tuple(cache.lengths)

    def empty_cache(self, lengths: tuple[int, ...]) -> KVCache:
        """The cache with layer i holding lengths[i] rows (contents as they are, zero until written): to time decode steps."""
        return self.chain.empty_cache(lengths)

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
        self.cache = None
        self.cuda.close()
        self.cuda = None
