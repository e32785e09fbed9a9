"""Timing helpers for benchmark scripts (no assertions on time anywhere in the tests).

    from runtime import Pipeline, bench
    pipe = Pipeline.from_build("builds/NAME")
    bench.decode_step_ms(pipe, (300, 1024, 2047))   # {cache length: median ms of one decode step}

The KV cache is one buffer per layer, allocated once at its capacity; a decode step reads each
buffer in place (rows from the filled length on are masked out) and writes the new token's row
(runtime/backend_ort.py). So a step should cost about the same at every length. Before each timed
step the cache is set back to the requested lengths with `backend.empty_cache` (it only sets the
lengths: a step advances them by one), shaped as after a prefill of that length: layers after a
FiCoCo-L step are shorter by what the step removed (`Build.cache_lengths`). The rows hold whatever
the buffers hold (zeros, or an earlier sequence's values): the cost does not depend on them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any


def decode_step_ms(pipeline: Any, lengths: Iterable[int], repeats: int = 20, warmup: int = 3) -> dict[int, float]:
    """{L: median milliseconds of one decode step with layer 0's cache at length L} (one step per repeat).

    L counts positions in the original numbering (layer 0's cache, P + tokens generated so far);
    each must leave room for one more token below the build's max_seq_len. Every step, warm-up
    included, starts from the cache at exactly L (the reset is not timed).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    plan, backend, out = pipeline.build.plan, pipeline.backend, {}
    removed = plan.visual_tokens - plan.visual_after_language  # what FiCoCo-L takes from the later layers
    for length in lengths:
        if not removed < length < plan.max_seq_len:
            raise ValueError(f"cache length {length} must be in ({removed}, {plan.max_seq_len}) for this build")
        per_layer, times = plan.cache_lengths(length), []
        for index in range(warmup + repeats):
            cache = backend.empty_cache(per_layer)  # back to L rows: the previous step advanced them by one
            start = time.perf_counter()
            backend.decode(1, length, cache)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        out[int(length)] = statistics.median(times)
    return out
