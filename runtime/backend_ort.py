"""ONNX Runtime backend: a build's graphs, the KV cache allocated once on the host and updated in place.

CPUExecutionProvider (CUDAExecutionProvider first when onnxruntime-gpu provides it; the cache then
stays on the host and ONNX Runtime copies the bound buffers each step: TensorRT is the GPU path).

* vision: pixel_values -> image_features [n, D], a host array reused by every call.
* prefill: the prompt's embeddings (text rows looked up on the host, `runtime.kvcache.Embedding`,
  around the image features) go through decoder.0, reduce.1, decoder.1, ... Each segment gets empty
  past buffers ([1, Hkv, 0, Dh], past_length 0) and returns its layers' K/V for the whole prompt,
  which is copied once into the cache buffers.
* decode: one token's embedding through every segment (the reductions are skipped). Each layer's
  whole buffer [1, Hkv, capacity_i, Dh] is bound as its past by pointer (no copy) with the
  segment's past_length; the new token's K/V [1, Hkv, 1, Dh] go into small preallocated arrays and
  are written into row len_i of the buffers: `2 * layers * Hkv * Dh` values per step.

Cost of a decode step as the cache grows: attention reads each buffer once at its capacity (rows
from past_length on are masked out), so a step costs the same at every length; nothing is
allocated or copied but the new rows. `runtime.bench.decode_step_ms` measures a step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime import names

from .errors import HINTS, BackendError, BackendNotInstalledError
from .kvcache import Embedding, KVCache, segment_plan
from .manifest import MAX_SEQ_LEN_KEY, Build, BuildError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}
BF16 = "tensor(bfloat16)"
_BF16_ONNX_TYPE = 16  # onnx.TensorProto.BFLOAT16


# Weight-only quantized builds (QDQ int8/int4) are fused into MatMulNBits by ONNX Runtime at load. Its
# accuracy level picks the compute: 1 keeps the activations fp32; 4 quantizes them to int8 on the fly.
# int4 runs as fast at 1 as at 4 on CPU, so it keeps float activations; int8's level-1 kernels are the
# slow unpacked path (7.6 vs 36.3 tokens/s on smol-llava-1.5), so int8 runs at 4. export.quality
# measures each build with the same setting.
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
ACCURACY_LEVEL = {"int8": "4", "int4": "1"}


def session_options(ort: Any, threads: int | None = None, weights: str | None = None) -> Any:
    """The runtime's ONNX Runtime session options for a build whose weights are `weights` (also used by the
    export's verification and quality measurement)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry(ACCURACY_KEY, ACCURACY_LEVEL.get(weights, "1"))
    if threads:
        options.intra_op_num_threads = threads
    return options


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendNotInstalledError(f"{HINTS['onnxruntime']} ({error})") from None
    return onnxruntime


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns as uint16 (round to nearest even), for bf16 graph inputs."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class OrtBackend:
    """ONNX Runtime over a build's graphs (see the module docstring)."""

    def __init__(self, build: Build, threads: int | None = None):
        ort = import_ort()
        self.ort, self.build = ort, build
        available = ort.get_available_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        providers = (["CUDAExecutionProvider"] if self.device == "cuda" else []) + ["CPUExecutionProvider"]
        options = session_options(ort, threads, (build.manifest.get("quantization") or {}).get("weights"))
        self.sessions = {}
        for graph in build.graph_names:
            if graph == names.EMBED:
                continue  # the runtime looks rows up in its table itself
            path = build.path("graphs", graph)
            try:
                self.sessions[graph] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph types
                raise BuildError(f"ONNX Runtime cannot load {str(path)!r}: {' '.join(str(error).split())[:300]}") from None
            session = self.sessions[graph]  # the graph's own I/O and recorded max_seq_len against the manifest
            recorded = session.get_modelmeta().custom_metadata_map.get(MAX_SEQ_LEN_KEY)
            build.check_io(graph, [(t.name, t.shape, t.type) for t in [*session.get_inputs(), *session.get_outputs()]],
                           int(recorded) if recorded and recorded.isdigit() else None)
        self.name = f"onnxruntime {ort.__version__} ({providers[0]})"
        self.types = {graph: {t.name: t.type for t in [*s.get_inputs(), *s.get_outputs()]} for graph, s in self.sessions.items()}
        self.embedding, self.segments = Embedding(build), segment_plan(build)
        self._allocate()

    def _allocate(self) -> None:
        """The cache buffers, once, at each layer's capacity; decode's small in/out arrays."""
        b, last = self.build, names.decoder(len(self.build.language_steps))
        self.float = _host_dtype(self.types[last][names.LOGITS])  # the graphs' float type on the host
        capacities = b.capacities()
        shape = lambda n: (1, b.kv_heads, n, b.head_dim)  # noqa: E731
        self.cache = KVCache([np.zeros(shape(n), self.float) for n in capacities],
                             [np.zeros(shape(n), self.float) for n in capacities], [0] * b.layers, capacities)
        self.new_rows = {i: (np.zeros(shape(1), self.float), np.zeros(shape(1), self.float)) for i in range(b.layers)}
        self.logits = np.zeros((1, b.vocab), self.float)  # [1, V]
        self.features = np.zeros((b.visual_tokens, b.hidden), self.float)  # [n, D]
        self.bindings = {graph: self.sessions[graph].io_binding() for graph, _, _ in self.segments}
        self.hidden = {graph: np.zeros((1, 1, b.hidden), self.float) for graph, _, _ in self.segments}  # decode's attended

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        try:
            return self.sessions[graph].run(None, feeds)
        except Exception as error:
            raise BackendError(f"ONNX Runtime failed in {graph}: {' '.join(str(error).split())[:300]}") from None

    def _logits(self, row: np.ndarray) -> np.ndarray:
        """[V] as float32 (bf16 bit patterns converted)."""
        return from_bf16_bits(row) if row.dtype == np.uint16 else row

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [crops, 3, S, S] -> image_features [n, D] (a reused host array)."""
        pixels = self._input(names.VISION, names.PIXEL_VALUES, pixel_values)
        self.features[...] = self._run(names.VISION, {names.PIXEL_VALUES: pixels})[0]
        return self.features

    def _input(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """Host array in the graph input's dtype (bf16 as bit patterns)."""
        type_name = self.types[graph][name]
        return to_bf16_bits(array) if type_name == BF16 else np.ascontiguousarray(array, dtype=_DTYPES[type_name])

    def _empty_past(self, layers: range) -> dict:
        shape = (1, self.build.kv_heads, 0, self.build.head_dim)
        return {name: np.zeros(shape, self.float) for name in names.cache_names(names.past, layers)}

    def prefill(self, before: np.ndarray, features: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """ids before [1, Tb], features [n, D], ids after [1, Ta] -> (logits [V], the cache filled with the prompt)."""
        before = np.ascontiguousarray(before, dtype=np.int64)
        hidden = np.concatenate([self.embedding(before), features.astype(self.float, copy=False),
                                 self.embedding(after)])[None]  # [1, P, D]
        positions = np.arange(hidden.shape[1], dtype=np.int64)[None]  # [1, P]
        cache = self.cache
        cache.lengths[:] = [0] * self.build.layers  # a new sequence: the last one's rows are past
        cache.check_room(range(1), hidden.shape[1])  # layer 0 holds the whole prompt
        for graph, reduce, layers in self.segments:
            feeds = {names.HIDDEN_STATES: hidden, names.POSITION_IDS: positions,
                     names.PAST_LENGTH: np.zeros(1, np.int64), **self._empty_past(layers)}
            out = self._run(graph, feeds)
            for slot, i in enumerate(layers):  # the prompt's rows, once, into the buffers
                cache.keys[i][:, :, :hidden.shape[1]] = out[2 * slot + (1 if reduce is None else 2)]
                cache.values[i][:, :, :hidden.shape[1]] = out[2 * slot + (2 if reduce is None else 3)]
                cache.lengths[i] = hidden.shape[1]
            if reduce is None:
                return self._logits(out[0][0]), cache
            hidden, positions, _ = self._run(reduce, {names.ATTENDED: out[0], names.ATTENTION: out[1],
                                                      names.POSITION_IDS: positions, names.INPUT_IDS_BEFORE: before})
        raise AssertionError("the last segment returns the logits")

    def _bind_segment(self, graph: str, reduce: str | None, layers: range, hidden: np.ndarray) -> Any:
        """decode's IO binding of one segment: every buffer by pointer, the new rows into small arrays."""
        binding, cache = self.bindings[graph], self.cache
        binding.clear_binding_inputs(), binding.clear_binding_outputs()
        binding.bind_cpu_input(names.HIDDEN_STATES, hidden)
        binding.bind_cpu_input(names.POSITION_IDS, self.position)
        binding.bind_cpu_input(names.PAST_LENGTH, np.array([cache.lengths[layers[0]]], np.int64))
        for i in layers:
            for kind, buffers, new in (("key", cache.keys, 0), ("value", cache.values, 1)):
                buffer = buffers[i]
                binding.bind_input(names.past(i, kind), "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
                out = self.new_rows[i][new]
                binding.bind_output(names.present(i, kind), "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        if reduce is None:
            binding.bind_output(names.LOGITS, "cpu", 0, self.logits.dtype, self.logits.shape, self.logits.ctypes.data)
        else:
            out = self.hidden[graph]
            binding.bind_output(names.ATTENDED, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            binding.bind_output(names.ATTENTION, "cpu")
        return binding

    def decode(self, token: int, position: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One token at `position` -> (logits [V], the same cache, one row longer in every layer)."""
        hidden = self.embedding(np.array([token]))[None].astype(self.float, copy=False)  # [1, 1, D]
        self.position = np.array([[position]], np.int64)
        cache.check_room(range(self.build.layers), 1)
        for graph, reduce, layers in self.segments:
            binding = self._bind_segment(graph, reduce, layers, hidden)
            try:
                self.sessions[graph].run_with_iobinding(binding)
            except Exception as error:
                raise BackendError(f"ONNX Runtime failed in {graph}: {' '.join(str(error).split())[:300]}") from None
            for i in layers:  # the new token's rows into the buffers: the only write to the cache
                row = cache.lengths[i]
                cache.keys[i][:, :, row] = self.new_rows[i][0][:, :, 0]
                cache.values[i][:, :, row] = self.new_rows[i][1][:, :, 0]
                cache.lengths[i] = row + 1
            hidden = self.hidden[graph]
        return self._logits(self.logits[0]), cache

    def cache_lengths(self, cache: KVCache) -> tuple[int, ...]:
        """len_i of every layer."""
        return tuple(cache.lengths)

    def empty_cache(self, lengths: tuple[int, ...]) -> KVCache:
        """The cache with layer i holding lengths[i] rows (their contents as they are: to time decode steps)."""
        if len(lengths) != self.build.layers:
            raise ValueError(f"need {self.build.layers} cache lengths, got {len(lengths)}")
        self.cache.lengths[:] = [int(n) for n in lengths]
        self.cache.check_room(range(self.build.layers), 1)
        return self.cache

    def close(self) -> None:
        self.bindings.clear()
        self.sessions.clear()


def _host_dtype(type_name: str) -> np.dtype:
    return np.dtype(np.uint16) if type_name == BF16 else np.dtype(_DTYPES[type_name])
