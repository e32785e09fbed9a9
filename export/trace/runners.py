"""Polygraphy runners over Python code on the host, for the verification's Comparator.

`BackendRunner` runs the runtime's own ONNX Runtime backend (`runtime.backend_ort.OrtBackend`, through
`runtime.chain.Chain`) in one phase, with the names of `runtime.names`, so Comparator can set the
shipping chain against the patched PyTorch model:

    prefill  feeds {input_ids_before, image_features, input_ids_after}
             -> logits [1, V], present.{i}.* (the prompt's K/V as the cache holds them), language_kept.{layer}
    decode   feeds {input_ids, position_ids, past.{i}.*}
             -> logits [1, V], present.{i}.* (the new token's K/V: the row the decode wrote)

At decode the cache buffers are filled with STALE before the past is written into their first rows:
the masked rows past `past_length` must not matter.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from runtime import names

STALE = 7.0  # what the unfilled rows of a verification buffer hold


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


class BackendRunner(HostRunner):
    """The runtime's backend in one phase ("prefill" or "decode"; module docstring)."""

    def __init__(self, backend, phase: str, input_metadata: TensorMetadata):
        super().__init__(f"onnxrt-{phase}", "backend-runner", input_metadata)
        self.backend, self.phase = backend, phase

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        named = self._prefill(feed_dict) if self.phase == "prefill" else self._decode(feed_dict)
        self.inference_time = time.perf_counter() - start
        return named

    def _prefill(self, feeds: dict) -> OrderedDict:
        kept: dict[str, np.ndarray] = {}
        chain = self.backend.chain
        chain.observer = lambda step, rows: kept.__setitem__(f"language_kept.{step.layer}", np.array(rows))
        try:
            logits, cache = self.backend.prefill(feeds[names.INPUT_IDS_BEFORE], feeds[names.IMAGE_FEATURES],
                                                 feeds[names.INPUT_IDS_AFTER])
        finally:
            chain.observer = None
        named = OrderedDict({names.LOGITS: np.array(logits)[None]})
        for i, length in enumerate(cache.lengths):
            named[names.present(i, "key")] = cache.keys[i][:, :, :length].copy()
            named[names.present(i, "value")] = cache.values[i][:, :, :length].copy()
        return OrderedDict({**named, **kept})

    def _decode(self, feeds: dict) -> OrderedDict:
        cache = self.backend.cache
        lengths = []
        for i in range(len(cache.lengths)):  # the past into the buffers' first rows, STALE after
            for kind, buffers in (("key", cache.keys), ("value", cache.values)):
                past = feeds[names.past(i, kind)]
                buffers[i][...] = STALE
                buffers[i][:, :, :past.shape[2]] = past
            lengths.append(feeds[names.past(i, "key")].shape[2])
        cache = self.backend.empty_cache(tuple(lengths))
        logits, cache = self.backend.decode(int(feeds[names.INPUT_IDS][0, 0]), int(feeds[names.POSITION_IDS][0, 0]), cache)
        named = OrderedDict({names.LOGITS: np.array(logits)[None]})
        for i, length in enumerate(lengths):
            named[names.present(i, "key")] = cache.keys[i][:, :, length:length + 1].copy()
            named[names.present(i, "value")] = cache.values[i][:, :, length:length + 1].copy()
        return named
