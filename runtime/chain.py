"""The one executor of a build's LLM: it walks the build plan's segments, for every backend.

    chain = Chain(build.plan, Embedding(build), steps)   # steps: a backend's adapter (below)
    logits, cache = chain.prefill(before, features, after)
    logits, cache = chain.decode(token, position, cache)

prefill (a prompt of P = Tb + n + Ta tokens at layer 0)
    rows = embedding(before) | features | embedding(after)          [1, P, D], positions 0 .. P-1
    for segment s in plan.segments:
        q = plan.segment_tokens(s, P)                               tokens left after s FiCoCo-L steps
        decoder.s on q tokens, past_length 0 -> its layers' q rows written at rows 0 .. q-1 of the cache
        last segment: the logits [V]; else reduce.{s+1} on the q tokens -> q - r_s tokens, its kept set
decode (one token at `position`)
    row = embedding([token])                                        [1, 1, D]
    for segment s: decoder.s on 1 token over the cache, past_length = len_s -> one row written at len_s

The chain owns the order, the token counts (all read from the plan), the embedding lookup and the
cache lengths; a backend's adapter owns where tensors live and how a graph runs. An adapter provides:

    cache                                     runtime.kvcache.KVCache (buffers at the plan's capacities)
    prompt(before_rows, features, after_rows, before_ids)   stage the prompt's hidden states, positions, ids
    token(row, position)                      stage one token's hidden state and position
    segment(segment, q, past_length, prefill) run decoder.{s} on q tokens; write its new rows at past_length
    reduce(segment, q, text_before)           run reduce.{s+1} on q tokens; returns its kept set (or None)
    logits()                                  the last segment's logits [V] as float32 on the host

`observer`, when set, is called with (FiCoCo-L step, kept) after each reduction (the verification
reads the kept sets through it).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from ficoco.plan import BuildPlan, Segment

from .kvcache import Embedding, KVCache, from_bf16_bits


class Steps(Protocol):
    cache: KVCache

    def prompt(self, before_rows: np.ndarray, features: Any, after_rows: np.ndarray, before_ids: np.ndarray) -> None: ...

    def token(self, row: np.ndarray, position: int) -> None: ...

    def segment(self, segment: Segment, q: int, past_length: int, prefill: bool) -> None: ...

    def reduce(self, segment: Segment, q: int, text_before: int) -> Any: ...

    def logits(self) -> np.ndarray: ...


class Chain:
    """prefill / decode over the plan's segments (module docstring)."""

    def __init__(self, plan: BuildPlan, embedding: Embedding, steps: Steps):
        self.plan, self.embedding, self.steps = plan, embedding, steps
        self.observer: Callable[[Any, Any], None] | None = None

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids -> rows [q, D] as float32 (the table may hold bf16 bit patterns)."""
        rows = self.embedding(ids)
        return from_bf16_bits(rows) if rows.dtype == np.uint16 else rows

    def prefill(self, before: np.ndarray, features: Any, after: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """ids before [1, Tb], image features (where the backend keeps them), ids after [1, Ta] ->
        (logits [V], the cache holding the prompt)."""
        before = np.ascontiguousarray(before, dtype=np.int64)
        prompt = self.plan.prompt_length(before.shape[1], after.shape[1])  # P
        cache = self.steps.cache
        cache.lengths[:] = [0] * len(cache.lengths)  # a new sequence: the last one's rows are past
        cache.check_room(range(1), prompt)  # layer 0 holds the whole prompt
        self.steps.prompt(self.embed(before), features, self.embed(after), before)
        for segment in self.plan.segments:
            q = self.plan.segment_tokens(segment.index, prompt)
            self.steps.segment(segment, q, 0, prefill=True)
            for i in segment.layers:
                cache.lengths[i] = q
            if segment.step is None:
                return self.steps.logits(), cache
            kept = self.steps.reduce(segment, q, before.shape[1])
            if self.observer is not None:
                self.observer(segment.step, kept)
        raise AssertionError("the last segment returns the logits")

    def decode(self, token: int, position: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One token at `position` -> (logits [V], the same cache, one row longer in every layer)."""
        if cache is not self.steps.cache:
            raise ValueError("decode takes the cache this backend's prefill or empty_cache returned")
        cache.check_room(range(len(cache.lengths)), 1)
        self.steps.token(self.embed(np.array([token])), position)
        for segment in self.plan.segments:  # no reductions at decode
            self.steps.segment(segment, 1, cache.lengths[segment.first], prefill=False)
            for i in segment.layers:
                cache.lengths[i] += 1
        return self.steps.logits(), cache

    def empty_cache(self, lengths: tuple[int, ...]) -> KVCache:
        """The cache with layer i holding lengths[i] rows (their contents as they are: to time decode steps)."""
        cache = self.steps.cache
        if len(lengths) != len(cache.lengths):
            raise ValueError(f"need {len(cache.lengths)} cache lengths, got {len(lengths)}")
        lengths = [int(n) for n in lengths]
        KVCache(cache.keys, cache.values, lengths, cache.capacities).check_room(range(len(lengths)), 1)
        cache.lengths[:] = lengths
        return cache
