"""The LLM graphs of a build on ONNX Runtime (CPU), run as the runtime runs them, for the verification.

`OnnxChain` looks embeddings up in the table the build stores (`runtime.kvcache.Embedding`), runs
decoder.0, reduce.1, decoder.1, ... at the prefill and the segments alone at a decode step, and
keeps the cache in buffers of a fixed capacity with `past_length` rows filled (the masked rows past
it hold stale values on purpose: they must not matter). `ChainRunner` is the same chain as a
Polygraphy runner with the names of `names.cache_names`, so Comparator can set it against torch:

    prefill  feeds {input_ids_before, image_features, input_ids_after}
             -> logits, present.{i}.* (the prompt's K/V), language_kept.{layer} (each step's kept set)
    decode   feeds {input_ids, position_ids, past.{i}.*}
             -> logits, present.{i}.* (the new token's K/V only)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from runtime import names
from runtime.kvcache import Embedding

STALE = 7.0  # what the unfilled rows of a verification buffer hold


class OnnxChain:
    def __init__(self, directory: Path, graph_names: list[str], embedding: dict, reduction_layers: tuple[int, ...],
                 layers: int, capacity: int, weights: str | None = None):
        import onnxruntime as ort

        from runtime.backend_ort import session_options

        self.sessions = {g: ort.InferenceSession(str(directory / f"{g}.onnx"), session_options(ort, weights=weights),
                                                 providers=["CPUExecutionProvider"])
                         for g in graph_names if g not in (names.VISION, names.EMBED)}
        self.embedding, self.layers, self.capacity = Embedding.from_entry(directory, embedding), layers, capacity
        steps = len(reduction_layers)
        self.segments = [(names.decoder(s), names.reduce(s + 1) if s < steps else None,
                          names.segment_layers(s, reduction_layers, layers)) for s in range(steps + 1)]
        self.reduction_layers = reduction_layers

    def prefill(self, before: np.ndarray, features: np.ndarray, after: np.ndarray):
        """-> (logits [V], cache {layer: [key buffer, value buffer, length]}, outputs by name)."""
        hidden = np.concatenate([self.embedding(before), features, self.embedding(after)])[None].astype(features.dtype)  # [1, P, D]
        positions = np.arange(hidden.shape[1])[None]
        cache, named = {}, OrderedDict()
        for graph, reduce, layers in self.segments:
            past = {n: np.zeros((1, self._kv_heads(graph), 0, self._head_dim(graph)), hidden.dtype)
                    for n in names.cache_names(names.past, layers)}  # prefill: empty buffers
            out = dict(zip([o.name for o in self.sessions[graph].get_outputs()], self.sessions[graph].run(
                None, {names.HIDDEN_STATES: hidden, names.POSITION_IDS: positions, names.PAST_LENGTH: np.zeros(1, np.int64), **past})))
            for i in layers:
                named[names.present(i, "key")], named[names.present(i, "value")] = out[names.present(i, "key")], out[names.present(i, "value")]
                cache[i] = [self._buffer(out[names.present(i, kind)]) for kind in ("key", "value")] + [hidden.shape[1]]
            if reduce is None:
                named[names.LOGITS] = out[names.LOGITS]
                return out[names.LOGITS][0], cache, named
            hidden, positions, kept = self.sessions[reduce].run(None, {
                names.ATTENDED: out[names.ATTENDED], names.ATTENTION: out[names.ATTENTION],
                names.POSITION_IDS: positions, names.INPUT_IDS_BEFORE: before})
            named[f"language_kept.{self.reduction_layers[int(reduce.split('.')[1]) - 1]}"] = kept
        raise AssertionError("the last segment returns the logits")

    def _kv_heads(self, graph: str) -> int:
        return next(i.shape[1] for i in self.sessions[graph].get_inputs() if i.name.startswith("past."))

    def _head_dim(self, graph: str) -> int:
        return next(i.shape[3] for i in self.sessions[graph].get_inputs() if i.name.startswith("past."))

    def _buffer(self, rows: np.ndarray) -> np.ndarray:
        """A buffer of the chain's capacity holding `rows` [1, Hkv, n, Dh] first, STALE after."""
        buffer = np.full((*rows.shape[:2], self.capacity, rows.shape[3]), STALE, rows.dtype)
        buffer[:, :, :rows.shape[2]] = rows
        return buffer

    def decode(self, token: int, position: int, cache: dict):
        """One token -> (logits [V], the cache with the new rows written in place, outputs by name)."""
        dtype = next(iter(cache.values()))[0].dtype
        hidden = self.embedding(np.array([token]))[None].astype(dtype)
        named = OrderedDict()
        for graph, reduce, layers in self.segments:
            past = {names.past(i, kind): cache[i][k] for i in layers for k, kind in enumerate(("key", "value"))}
            out = dict(zip([o.name for o in self.sessions[graph].get_outputs()], self.sessions[graph].run(None, {
                names.HIDDEN_STATES: hidden, names.POSITION_IDS: np.array([[position]]),
                names.PAST_LENGTH: np.array([cache[layers[0]][2]], np.int64), **past})))
            for i in layers:
                row = cache[i][2]
                for k, kind in enumerate(("key", "value")):
                    named[names.present(i, kind)] = out[names.present(i, kind)]
                    cache[i][k][:, :, row] = out[names.present(i, kind)][:, :, 0]
                cache[i][2] = row + 1
            hidden = out.get(names.ATTENDED)
            if reduce is None:
                named[names.LOGITS] = out[names.LOGITS]
                return out[names.LOGITS][0], cache, named
        raise AssertionError("the last segment returns the logits")


class HostRunner(BaseRunner):
    """A Polygraphy runner over Python code on the host: fixed input metadata, nothing to activate."""

    def __init__(self, name: str, prefix: str, input_metadata: TensorMetadata):
        super().__init__(name=name, prefix=prefix)
        self.input_metadata = input_metadata

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return self.input_metadata

    def deactivate_impl(self):
        pass


class ChainRunner(HostRunner):
    """Polygraphy runner over `OnnxChain` in one phase ("prefill" or "decode"; module docstring)."""

    def __init__(self, chain: OnnxChain, phase: str, input_metadata: TensorMetadata):
        super().__init__(f"onnxrt-{phase}", "chain-runner", input_metadata)
        self.chain, self.phase = chain, phase

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        if self.phase == "prefill":
            _, _, named = self.chain.prefill(feed_dict[names.INPUT_IDS_BEFORE], feed_dict[names.IMAGE_FEATURES],
                                             feed_dict[names.INPUT_IDS_AFTER])
        else:
            cache = {}
            for i in range(self.chain.layers):
                key, value = feed_dict[names.past(i, "key")], feed_dict[names.past(i, "value")]
                cache[i] = [self.chain._buffer(key), self.chain._buffer(value), key.shape[2]]
            _, _, named = self.chain.decode(int(feed_dict[names.INPUT_IDS][0, 0]), int(feed_dict[names.POSITION_IDS][0, 0]), cache)
        self.inference_time = time.perf_counter() - start
        return named
