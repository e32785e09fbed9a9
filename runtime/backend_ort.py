"""ONNX Runtime backend: the three ONNX graphs driven through IO binding, tensors kept as OrtValues.

CUDAExecutionProvider first when onnxruntime-gpu provides it, else CPUExecutionProvider. Per call:

* vision: pixel_values is bound from the host array; image_features [crops, k, D] goes into one
  OrtValue on the device allocated once and reused by every call; it is bound as prefill's input
  as is (the layout into the prompt happens inside the prefill graph). kept_positions is not bound.
* prefill / decode: ids and positions are small host arrays (decode writes them into two [1, 1]
  OrtValues in place); logits [1, V] go into one preallocated host array (ONNX Runtime copies them
  there from the device). The cache outputs `present.{i}.*` are bound to the device unallocated,
  ONNX Runtime allocates them at their shapes, and the OrtValues it returns are bound as the next
  step's `past.{i}.*` inputs: no numpy round trip, no copy in Python.

Cost of a decode step as the cache grows: the decode graph returns the whole cache, past and the new
token's K/V concatenated (the Hugging Face / Optimum convention). Each step therefore allocates
`2 * layers` new tensors of `Hkv * (len_i + 1) * Dh` values and copies the past into them, and
attention reads the same amount: memory traffic per step grows linearly with the sequence, and the
whole generation of n tokens moves O(n * len) cache values. Layers after a FiCoCo-L step have
shorter caches and cost less. `runtime.bench.decode_step_ms` measures a step at given lengths.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime import names

from .backend import HINTS, BackendError, BackendNotInstalledError
from .manifest import MAX_SEQ_LEN_KEY, Build, BuildError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}
BF16 = "tensor(bfloat16)"
_BF16_ONNX_TYPE = 16  # onnx.TensorProto.BFLOAT16


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


class OrtCache:
    """The per-layer caches of one sequence: OrtValues [key 0, value 0, key 1, ...], each [1, Hkv, len_i, Dh]."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]):
        self.values = values


class OrtBackend:
    """ONNX Runtime over a build's vision / prefill / decode graphs (see the module docstring)."""

    def __init__(self, build: Build, threads: int | None = None):
        ort = import_ort()
        self.ort, self.build = ort, build
        available = ort.get_available_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        providers = (["CUDAExecutionProvider"] if self.device == "cuda" else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for graph in names.GRAPHS:
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
        self.bindings = {graph: session.io_binding() for graph, session in self.sessions.items()}
        self.types = {graph: {t.name: t.type for t in [*s.get_inputs(), *s.get_outputs()]} for graph, s in self.sessions.items()}
        self._allocate()

    def _ortvalue(self, shape: list[int], type_name: str, device: str) -> Any:
        """A zero-filled OrtValue on `device` (bf16 ones on the host: ONNX Runtime copies them as needed)."""
        if type_name == BF16:
            return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros(shape, np.uint16), _BF16_ONNX_TYPE)
        return self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _DTYPES[type_name]), device, 0)

    def _allocate(self) -> None:
        """The buffers every call reuses: features on the device, logits on the host, decode's ids."""
        b = self.build
        features_type = self.types[names.VISION][names.IMAGE_FEATURES]
        hidden = self.sessions[names.VISION].get_outputs()[0].shape[-1]
        self.features = self._ortvalue([b.crops, b.kept_per_crop, int(hidden)], features_type, self.device)
        logits_type = self.types[names.DECODE][names.LOGITS]
        self.logits_host = np.zeros((1, b.vocab), np.uint16 if logits_type == BF16 else _DTYPES[logits_type])  # [1, V]
        self.logits = (self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(self.logits_host, _BF16_ONNX_TYPE)
                       if logits_type == BF16 else self.ort.OrtValue.ortvalue_from_numpy(self.logits_host))
        self.ids_host, self.position_host = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        self.ids = self.ort.OrtValue.ortvalue_from_shape_and_type([1, 1], np.int64, self.device, 0)
        self.position = self.ort.OrtValue.ortvalue_from_shape_and_type([1, 1], np.int64, self.device, 0)
        self.cache_names = {kind: names.cache_names(kind, b.layers) for kind in (names.past, names.present)}

    def _logits(self) -> np.ndarray:
        """The host logits as [V] (a view, overwritten by the next step; bf16 converted)."""
        row = self.logits_host[0]
        return from_bf16_bits(row) if row.dtype == np.uint16 else row

    def _run(self, graph: str, binding: Any) -> None:
        try:
            self.sessions[graph].run_with_iobinding(binding)
        except Exception as error:
            raise BackendError(f"ONNX Runtime failed in {graph}: {' '.join(str(error).split())[:300]}") from None

    def _bind_cache_outputs(self, binding: Any) -> None:
        binding.bind_ortvalue_output(names.LOGITS, self.logits)
        for name in self.cache_names[names.present]:
            binding.bind_output(name, self.device, 0)  # allocated by ONNX Runtime at the computed shape

    def _input(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        """Host array in the graph input's dtype (bf16 as bit patterns)."""
        type_name = self.types[graph][name]
        return to_bf16_bits(array) if type_name == BF16 else np.ascontiguousarray(array, dtype=_DTYPES[type_name])

    def vision(self, pixel_values: np.ndarray) -> Any:
        """pixel_values [crops, 3, S, S] -> the features OrtValue [crops, k, D] (reused buffer)."""
        binding = self.bindings[names.VISION]
        binding.clear_binding_inputs(), binding.clear_binding_outputs()
        pixels = self._input(names.VISION, names.PIXEL_VALUES, pixel_values)
        if pixels.dtype == np.uint16:
            binding.bind_ortvalue_input(names.PIXEL_VALUES, self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(pixels, _BF16_ONNX_TYPE))
        else:
            binding.bind_cpu_input(names.PIXEL_VALUES, pixels)
        binding.bind_ortvalue_output(names.IMAGE_FEATURES, self.features)
        self._run(names.VISION, binding)
        return self.features

    def prefill(self, before: np.ndarray, features: Any, after: np.ndarray) -> tuple[np.ndarray, OrtCache]:
        """ids before [1, Tb], features [crops, k, D], ids after [1, Ta] -> (logits [V], cache of len_i)."""
        binding = self.bindings[names.PREFILL]
        binding.clear_binding_inputs(), binding.clear_binding_outputs()
        binding.bind_cpu_input(names.INPUT_IDS_BEFORE, np.ascontiguousarray(before, dtype=np.int64))
        binding.bind_ortvalue_input(names.IMAGE_FEATURES, features)
        binding.bind_cpu_input(names.INPUT_IDS_AFTER, np.ascontiguousarray(after, dtype=np.int64))
        self._bind_cache_outputs(binding)
        self._run(names.PREFILL, binding)
        return self._logits(), OrtCache(binding.get_outputs()[1:])

    def decode(self, token: int, position: int, cache: OrtCache) -> tuple[np.ndarray, OrtCache]:
        """One token at `position` over the cache (len_i each) -> (logits [V], cache of len_i + 1)."""
        binding = self.bindings[names.DECODE]
        binding.clear_binding_inputs(), binding.clear_binding_outputs()
        self.ids_host[0, 0], self.position_host[0, 0] = token, position
        self.ids.update_inplace(self.ids_host)
        self.position.update_inplace(self.position_host)
        binding.bind_ortvalue_input(names.INPUT_IDS, self.ids)
        binding.bind_ortvalue_input(names.POSITION_IDS, self.position)
        for name, value in zip(self.cache_names[names.past], cache.values):
            binding.bind_ortvalue_input(name, value)
        self._bind_cache_outputs(binding)
        self._run(names.DECODE, binding)
        return self._logits(), OrtCache(binding.get_outputs()[1:])

    def cache_lengths(self, cache: OrtCache) -> tuple[int, ...]:
        """len_i of every layer, from the key tensors' shapes [1, Hkv, len_i, Dh]."""
        return tuple(int(value.shape()[2]) for value in cache.values[0::2])

    def empty_cache(self, lengths: tuple[int, ...]) -> OrtCache:
        """A zero cache with layer i of length lengths[i] (to time decode steps at any length)."""
        if len(lengths) != self.build.layers:
            raise ValueError(f"need {self.build.layers} cache lengths, got {len(lengths)}")
        type_name = self.types[names.DECODE][self.cache_names[names.past][0]]
        b = self.build
        return OrtCache([self._ortvalue([1, b.kv_heads, n, b.head_dim], type_name, self.device) for n in lengths for _ in (0, 1)])

    def close(self) -> None:
        self.bindings.clear()
        self.sessions.clear()
