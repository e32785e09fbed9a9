"""The generation loop, after gpt-fast's `generate.py`: small functions that take step functions
and know nothing of the backend (ONNX Runtime, TensorRT, or PyTorch in the export's checks).

A `prefill()` returns (logits [V], cache) for the prompt; a `decode(token, position, cache)`
returns (logits [V], cache) for one more token. Positions follow the original prompt
numbering: the t-th generated token (t = 0, 1, ...) sits at `prompt_length + t`, also when
FiCoCo-L has shortened the caches of later layers. The cache is opaque here: whatever the
backend's steps pass along (ONNX Runtime OrtValues, TensorRT device buffers, torch tensors).

    sample            logits [V] -> token id (greedy, or temperature / top-k / top-p with a seeded
                      numpy Generator); `sampler(Sampling)` binds the settings and the generator
    prefill           prompt -> (first token, cache)
    decode_one_token  (token, position, cache) -> (next token, cache)
    decode_tokens     the loop as a generator: yields each token as soon as it is chosen
    generate          all tokens as a list

Logits handed to a sampler may be a view of a backend buffer that the next step overwrites:
a sampler reads them at once and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Prefill = Callable[[], tuple[np.ndarray, Any]]
Decode = Callable[[int, int, Any], tuple[np.ndarray, Any]]
Sampler = Callable[[np.ndarray], int]


class SamplingError(ValueError):
    """Sampling settings out of range; the message names the value."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 is greedy (top_k, top_p and seed are then unused).

    top_k 0 and top_p 1.0 switch those filters off; the filters run in Hugging Face's order:
    temperature, then top-k, then top-p. seed None draws fresh entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature < float("inf")):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise SamplingError(f"seed must be an int >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def greedy(logits: np.ndarray) -> int:
    """logits: [V] -> the argmax token (first on ties, like torch.argmax)."""
    return int(np.argmax(logits))


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """logits [V] -> float64 probabilities [V] after temperature, top-k and top-p (zeros elsewhere)."""
    scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / sampling.temperature  # [V]
    if 0 < sampling.top_k < scaled.size:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)  # ties with the k-th are kept, as in HF
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # [V] most likely first
        mass_before = np.cumsum(probs[order]) - probs[order]  # [V] mass of the more likely tokens
        drop = order[mass_before >= sampling.top_p]  # the first token is always kept
        probs[drop] = 0.0
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token from logits [V]: argmax when greedy, else an inverse-CDF draw from `probabilities`."""
    if sampling.greedy:
        return greedy(logits)
    cdf = np.cumsum(probabilities(logits, sampling))  # [V] non-decreasing, ends at ~1
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(token, cdf.size - 1)


def sampler(sampling: Sampling) -> Sampler:
    """A Sampler bound to the settings and a fresh numpy Generator seeded with `sampling.seed`."""
    if sampling.greedy:
        return greedy
    rng = np.random.default_rng(sampling.seed)
    return lambda logits: sample(logits, sampling, rng)


def prefill(step: Prefill, choose: Sampler) -> tuple[int, Any]:
    """Run the prompt; returns (first generated token, cache)."""
    logits, cache = step()
    return choose(logits), cache


def decode_one_token(step: Decode, token: int, position: int, cache: Any, choose: Sampler) -> tuple[int, Any]:
    """Feed `token` at `position`; returns (next token, cache grown by one)."""
    logits, cache = step(token, position, cache)
    return choose(logits), cache


def decode_tokens(
    prefill_step: Prefill, decode_step: Decode, prompt_length: int, max_new_tokens: int, eos_ids: set[int],
    sample: Sampler = greedy,
) -> Iterator[int]:
    """Yield generated tokens one by one; the EOS token is yielded, then the loop stops."""
    if max_new_tokens < 1:
        return
    token, cache = prefill(prefill_step, sample)
    for step in range(max_new_tokens):
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        token, cache = decode_one_token(decode_step, token, prompt_length + step, cache, sample)


def generate(
    prefill_step: Prefill, decode_step: Decode, prompt_length: int, max_new_tokens: int, eos_ids: set[int],
    sample: Sampler = greedy,
) -> list[int]:
    """All tokens of `decode_tokens` as a list."""
    return list(decode_tokens(prefill_step, decode_step, prompt_length, max_new_tokens, eos_ids, sample))
