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

from ficoco.plan import Segment

from .chain import Chain
from .errors import HINTS, BackendError, BackendNotInstalledError
from .kvcache import Embedding, KVCache, from_bf16_bits, to_bf16_bits  # noqa: F401  (re-exported: bf16 helpers)
from .manifest import MAX_SEQ_LEN_KEY, Build, BuildError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}
BF16 = "tensor(bfloat16)"
_BF16_ONNX_TYPE = 16  # onnx.TensorProto.BFLOAT16


# Weight-only quantized builds (QDQ int8/int4) are fused into MatMulNBits by ONNX Runtime at load. Its
# accuracy level picks the compute: 1 keeps the activations fp32; 4 quantizes them to int8 on the fly.
# int4 runs as fast at 1 as at 4 on CPU, so it keeps float activations; int8's level-1 kernels are the
# slow unpacked path (7.6 vs 36.3 tokens/s on smol-llava-1.5), so int8 runs at 4. export.trace.quality
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


class OrtBackend:
    """ONNX Runtime over a build's graphs (see the module docstring): the chain's adapter (`runtime.chain`)."""

    def __init__(self, build: Build, threads: int | None = None, weights: str | None = None):
        ort = import_ort()
        self.ort, self.build, self.plan = ort, build, build.plan
        available = ort.get_available_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        providers = (["CUDAExecutionProvider"] if self.device == "cuda" else []) + ["CPUExecutionProvider"]
        weights = weights or build.weights
        options = session_options(ort, threads, weights)
        self.sessions = {graph: self._session(graph, options, providers) for graph in build.graph_names if graph != names.EMBED}
        self.name = f"onnxruntime {ort.__version__} ({providers[0]})"
        self.types = {graph: {t.name: t.type for t in [*s.get_inputs(), *s.get_outputs()]} for graph, s in self.sessions.items()}
        self._allocate()
        self.chain = Chain(self.plan, Embedding(build), self)

    def _session(self, graph: str, options: Any, providers: list[str]) -> Any:
        """One graph's session, its own I/O and recorded max_seq_len checked against the manifest."""
        path = self.build.path("graphs", graph)
        try:
            session = self.ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BuildError(f"ONNX Runtime cannot load {str(path)!r}: {' '.join(str(error).split())[:300]}") from None
        recorded = session.get_modelmeta().custom_metadata_map.get(MAX_SEQ_LEN_KEY)
        self.build.check_io(graph, [(t.name, t.shape, t.type) for t in [*session.get_inputs(), *session.get_outputs()]],
                            int(recorded) if recorded and recorded.isdigit() else None)
        return session

    def _allocate(self) -> None:
        """The cache buffers, once, at each layer's capacity (the plan's); decode's small in/out arrays."""
        p, t = self.plan, self.plan.text
        self.float = _host_dtype(self.types[names.decoder(p.segments[-1].index)][names.LOGITS])  # the graphs' float type
        shape = lambda n: (1, t.kv_heads, n, t.head_dim)  # noqa: E731
        self.cache = KVCache([np.zeros(shape(n), self.float) for n in p.capacities],
                             [np.zeros(shape(n), self.float) for n in p.capacities], [0] * t.layers, p.capacities)
        self.new_rows = {i: (np.zeros(shape(1), self.float), np.zeros(shape(1), self.float)) for i in range(t.layers)}
        self.logits_row = np.zeros((1, t.vocab), self.float)  # [1, V]
        self.features = np.zeros((p.visual_tokens, t.hidden), self.float)  # [n, D]
        self.bindings = {names.decoder(s.index): self.sessions[names.decoder(s.index)].io_binding() for s in p.segments}
        self.attended = {s.index: np.zeros((1, 1, t.hidden), self.float) for s in p.segments}  # decode's attended

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:
        try:
            return self.sessions[graph].run(None, feeds)
        except Exception as error:
            raise BackendError(f"ONNX Runtime failed in {graph}: {' '.join(str(error).split())[:300]}") from None

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [crops, 3, S, S] -> image_features [n, D] (a reused host array)."""
        pixels = self._input(names.VISION, names.PIXEL_VALUES, pixel_values)
        self.features[...] = self._run(names.VISION, {names.PIXEL_VALUES: pixels})[0]
        return self.features

    def _input(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """Host array in the graph input's dtype (bf16 as bit patterns)."""
        type_name = self.types[graph][name]
        return to_bf16_bits(array) if type_name == BF16 else np.ascontiguousarray(array, dtype=_DTYPES[type_name])

    def _host(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows in the graphs' float type (bf16 as bit patterns)."""
        return to_bf16_bits(rows) if self.float == np.uint16 else rows.astype(self.float, copy=False)

    # ------------------------------------------------------------------ the chain's steps (runtime.chain)

    def prompt(self, before_rows: np.ndarray, features: np.ndarray, after_rows: np.ndarray, before_ids: np.ndarray) -> None:
        self.hidden = np.concatenate([self._host(before_rows), features.astype(self.float, copy=False),
                                      self._host(after_rows)])[None]  # [1, P, D]
        self.positions = np.arange(self.hidden.shape[1], dtype=np.int64)[None]  # [1, P]
        self.before_ids = before_ids

    def token(self, row: np.ndarray, position: int) -> None:
        self.hidden = self._host(row)[None]  # [1, 1, D]
        self.positions = np.array([[position]], np.int64)

    def segment(self, segment: Segment, q: int, past_length: int, prefill: bool) -> None:
        """decoder.s: at the prefill over empty past buffers (its layers' q rows copied in once); at decode
        over the whole buffers bound by pointer (one row per layer copied in)."""
        if prefill:
            return self._prefill_segment(segment, q)
        graph, cache = names.decoder(segment.index), self.cache
        binding = self._bind_segment(segment, past_length)
        try:
            self.sessions[graph].run_with_iobinding(binding)
        except Exception as error:
            raise BackendError(f"ONNX Runtime failed in {graph}: {' '.join(str(error).split())[:300]}") from None
        for i in segment.layers:  # the new token's rows into the buffers: the only write to the cache
            cache.keys[i][:, :, past_length] = self.new_rows[i][0][:, :, 0]
            cache.values[i][:, :, past_length] = self.new_rows[i][1][:, :, 0]
        self.hidden = self.attended[segment.index]

    def _prefill_segment(self, segment: Segment, q: int) -> None:
        t, graph = self.plan.text, names.decoder(segment.index)
        empty = {name: np.zeros((1, t.kv_heads, 0, t.head_dim), self.float) for name in names.cache_names(names.past, segment.layers)}
        out = self._run(graph, {names.HIDDEN_STATES: self.hidden, names.POSITION_IDS: self.positions,
                                names.PAST_LENGTH: np.zeros(1, np.int64), **empty})
        first = 1 if segment.step is None else 2  # logits | attended, attention; then the present rows
        if out[first].shape[2] != q:
            raise BackendError(f"{graph} returned {out[first].shape[2]} cache rows for the {q} tokens the build's plan "
                               "gives it (a graph from another build?)")
        for slot, i in enumerate(segment.layers):  # the prompt's rows, once, into the buffers
            self.cache.keys[i][:, :, :q] = out[first + 2 * slot]
            self.cache.values[i][:, :, :q] = out[first + 2 * slot + 1]
        self.out = out

    def reduce(self, segment: Segment, q: int, text_before: int) -> np.ndarray:
        """reduce.{s+1} on decoder.s's attended [1, q, D] and attention map -> the reduced hidden states; returns kept."""
        graph = names.reduce(segment.index + 1)
        self.hidden, self.positions, kept = self._run(graph, {
            names.ATTENDED: self.out[0], names.ATTENTION: self.out[1],
            names.POSITION_IDS: self.positions, names.INPUT_IDS_BEFORE: self.before_ids})
        if kept.shape[1] != segment.step.tokens_out or self.hidden.shape[1] != q - segment.step.r:
            raise BackendError(f"{graph} kept {kept.shape[1]} of {segment.step.tokens_in} visual tokens; the build's plan "
                               f"keeps {segment.step.tokens_out} (a graph from another build?)")
        return kept

    def logits(self) -> np.ndarray:
        """[V] as float32 (bf16 bit patterns converted)."""
        row = self.out[0][0] if self.out is not None else self.logits_row[0]
        self.out = None
        return from_bf16_bits(row) if row.dtype == np.uint16 else row

    def _bind_segment(self, segment: Segment, past_length: int) -> Any:
        """decode's IO binding of one segment: every buffer by pointer, the new rows into small arrays."""
        graph = names.decoder(segment.index)
        binding, cache, self.out = self.bindings[graph], self.cache, None
        binding.clear_binding_inputs(), binding.clear_binding_outputs()
        binding.bind_cpu_input(names.HIDDEN_STATES, self.hidden)
        binding.bind_cpu_input(names.POSITION_IDS, self.positions)
        binding.bind_cpu_input(names.PAST_LENGTH, np.array([past_length], np.int64))
        for i in segment.layers:
            for kind, buffers, new in (("key", cache.keys, 0), ("value", cache.values, 1)):
                buffer = buffers[i]
                binding.bind_input(names.past(i, kind), "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
                out = self.new_rows[i][new]
                binding.bind_output(names.present(i, kind), "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        if segment.step is None:
            row = self.logits_row
            binding.bind_output(names.LOGITS, "cpu", 0, row.dtype, row.shape, row.ctypes.data)
        else:
            out = self.attended[segment.index]
            binding.bind_output(names.ATTENDED, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            binding.bind_output(names.ATTENTION, "cpu")
        return binding

    # ------------------------------------------------------------------ the Backend interface (runtime.backend)

    def prefill(self, before: np.ndarray, features: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """ids before [1, Tb], features [n, D], ids after [1, Ta] -> (logits [V], the cache filled with the prompt)."""
        return self.chain.prefill(before, features, after)

    def decode(self, token: int, position: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One token at `position` -> (logits [V], the same cache, one row longer in every layer)."""
        return self.chain.decode(token, position, cache)

    def cache_lengths(self, cache: KVCache) -> tuple[int, ...]:
        """len_i of every layer."""
        return tuple(cache.lengths)

    def empty_cache(self, lengths: tuple[int, ...]) -> KVCache:
        """The cache with layer i holding lengths[i] rows (their contents as they are: to time decode steps)."""
        return self.chain.empty_cache(lengths)

    def close(self) -> None:
        self.bindings.clear()
        self.sessions.clear()


def _host_dtype(type_name: str) -> np.dtype:
    return np.dtype(np.uint16) if type_name == BF16 else np.dtype(_DTYPES[type_name])
