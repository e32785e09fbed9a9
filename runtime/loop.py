"""The generation loop, after gpt-fast's `generate.py`: small functions that take step functions
and know nothing of the backend (ONNX Runtime, TensorRT, or PyTorch in the export's checks).

A `prefill()` returns (logits [V], cache) for the prompt; a `decode(token, position, cache)`
returns (logits [V], cache) for one more token. Positions follow the original prompt
numbering: the t-th generated token (t = 0, 1, ...) sits at `prompt_length + t`, also when
FiCoCo-L has shortened the caches of later layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Prefill = Callable[[], tuple[np.ndarray, Any]]
Decode = Callable[[int, int, Any], tuple[np.ndarray, Any]]
Sampler = Callable[[np.ndarray], int]


def greedy(logits: np.ndarray) -> int:
    """logits: [V] -> the argmax token (first on ties, like torch.argmax)."""
    return int(np.argmax(logits))


def decode_tokens(
    prefill: Prefill, decode: Decode, prompt_length: int, max_new_tokens: int, eos_ids: set[int], sample: Sampler = greedy
) -> Iterator[int]:
    """Yield generated tokens one by one; the EOS token is yielded, then the loop stops."""
    logits, cache = prefill()
    for step in range(max_new_tokens):
        token = sample(logits)
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        logits, cache = decode(token, prompt_length + step, cache)


def generate(
    prefill: Prefill, decode: Decode, prompt_length: int, max_new_tokens: int, eos_ids: set[int], sample: Sampler = greedy
) -> list[int]:
    """All tokens of `decode_tokens` as a list."""
    return list(decode_tokens(prefill, decode, prompt_length, max_new_tokens, eos_ids, sample))
