"""runtime.loop: sampling filters, seeded determinism, and the backend-agnostic decode loop."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import loop
from runtime.loop import Sampling, SamplingError


def test_greedy_is_argmax_first_on_ties() -> None:
    assert loop.greedy(np.array([0.0, 3.0, 3.0, -1.0])) == 1
    assert loop.sampler(Sampling()) is loop.greedy


def test_top_k_keeps_k_most_likely_and_ties() -> None:
    logits = np.array([1.0, 5.0, 3.0, 3.0, 0.0])
    probs = loop.probabilities(logits, Sampling(temperature=1.0, top_k=2))
    assert set(np.flatnonzero(probs)) == {1, 2, 3}  # the 2nd best ties with index 3: both kept, like HF
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: set(np.flatnonzero(loop.probabilities(logits, Sampling(temperature=1.0, top_p=p))))
    assert kept(0.49) == {0} and kept(0.51) == {0, 1} and kept(0.79) == {0, 1} and kept(0.81) == {0, 1, 2}
    assert kept(0.01) == {0}  # the most likely token always stays
    probs = loop.probabilities(logits, Sampling(temperature=1.0, top_p=0.79))
    np.testing.assert_allclose(probs[:2], [0.5 / 0.8, 0.3 / 0.8])


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([2.0, 1.0, 0.0])
    cold, hot = (loop.probabilities(logits, Sampling(temperature=t)) for t in (0.1, 10.0))
    assert cold[0] > 0.99 and hot.max() - hot.min() < 0.1


def test_sampling_with_a_seed_is_deterministic_and_follows_the_distribution() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=50)
    settings = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=123)
    choosers = [loop.sampler(settings) for _ in range(2)]  # one generator per sequence, same seed
    draws = [[choose(logits) for _ in range(30)] for choose in choosers]
    assert draws[0] == draws[1]
    allowed = set(np.flatnonzero(loop.probabilities(logits, settings)))
    assert set(draws[0]) <= allowed and len(set(draws[0])) > 1
    other = loop.sampler(Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=124))
    assert [other(logits) for _ in range(30)] != draws[0]
    chooser = loop.sampler(Sampling(temperature=1.0, seed=5))
    frequencies = np.bincount([chooser(np.log([0.7, 0.2, 0.1])) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(frequencies, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("inf")}, {"top_k": -1}, {"top_k": 2.5}, {"top_p": 0.0},
    {"top_p": 1.5}, {"seed": -3}, {"seed": "x"},
])
def test_bad_sampling_settings_name_the_value(kwargs: dict) -> None:
    with pytest.raises(SamplingError, match=next(iter(kwargs))):
        Sampling(**kwargs)


class FakeModel:
    """Steps over a fake cache (a list of tokens seen); the next token is `script[len(cache)]`."""

    def __init__(self, script: list[int], prompt: list[int], vocab: int = 10):
        self.script, self.prompt, self.vocab, self.positions = script, prompt, vocab, []

    def logits(self, cache: list[int]) -> np.ndarray:
        out = np.zeros(self.vocab)
        out[self.script[len(cache) - len(self.prompt)]] = 1.0
        return out

    def prefill(self) -> tuple[np.ndarray, list[int]]:
        return self.logits(self.prompt), list(self.prompt)

    def decode(self, token: int, position: int, cache: list[int]) -> tuple[np.ndarray, list[int]]:
        self.positions.append(position)
        cache = [*cache, token]
        return self.logits(cache), cache


def test_decode_loop_positions_eos_and_length() -> None:
    model = FakeModel([5, 6, 2, 7, 8], prompt=[1, 1, 1])
    assert loop.generate(model.prefill, model.decode, 40, 10, {2}) == [5, 6, 2]  # EOS yielded, then stop
    assert model.positions == [40, 41]  # P + t, whatever the cache holds
    model = FakeModel([5, 6, 7, 8, 9], prompt=[1])
    assert loop.generate(model.prefill, model.decode, 3, 4, {2}) == [5, 6, 7, 8]
    assert model.positions == [3, 4, 5]  # no decode step after the last token
    assert loop.generate(model.prefill, model.decode, 3, 0, {2}) == []


def test_gpt_fast_style_steps() -> None:
    model = FakeModel([4, 3], prompt=[1, 1])
    token, cache = loop.prefill(model.prefill, loop.greedy)
    assert token == 4 and cache == [1, 1]
    token, cache = loop.decode_one_token(model.decode, token, 2, cache, loop.greedy)
    assert token == 3 and cache == [1, 1, 4] and model.positions == [2]
