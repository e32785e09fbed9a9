"""What epsilon = 0.998 does in practice: how many targets each discarded token merges into.

The threshold tau_i is the eps-quantile of row i of C [r, m] (linear interpolation, as torch.quantile),
at rank q = eps * (m - 1). With distinct values, the targets {j : C[i, j] >= tau_i} are the values at
ranks ceil(q) .. m-1, plus rank floor(q) when q is an integer: floor((1 - eps) * (m - 1)) + 1 targets.
At eps = 0.998 that is 1 whenever m - 1 < 500, i.e. whenever at most 500 tokens are kept: tau then lies
strictly between the two largest values. The count is derived here in exact rational arithmetic and
compared with `ficoco.core.merge_weights` (nonzero weights) on random rows and on real attention maps.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from ficoco.config import FiCoCoConfig, ModelGeometry, build_schedule
from ficoco.core import (
    language_correlation, language_redundancy, merge_weights, split_by_score, vision_correlation, vision_redundancy,
)

EPS = 0.998


def expected_targets(m: int, eps: str = "0.998") -> int:
    """floor((1 - eps)(m - 1)) + 1, exactly (eps as the decimal it is written as)."""
    return math.floor((1 - Fraction(eps)) * (m - 1)) + 1


def targets_per_row(corr: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """[B, r] number of targets each discarded token merges into (its nonzero weights)."""
    return (merge_weights(corr, eps) > 0).sum(-1)


def test_closed_form_counts() -> None:
    assert [expected_targets(m) for m in (2, 500, 501, 502, 1000, 1001, 1002, 1501, 2880)] == [1, 1, 2, 2, 2, 3, 3, 4, 6]
    assert max(m for m in range(2, 5000) if expected_targets(m) == 1) == 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_targets_per_row_on_random_rows(dtype) -> None:
    """Every kept count m from 2 to 3000: distinct random values (a random permutation, so no ties)."""
    gen = torch.Generator().manual_seed(0)
    for m in range(2, 3001):
        rows = torch.stack([torch.randperm(m, generator=gen) for _ in range(3)]).to(dtype)  # [3, m]
        corr = ((rows + 1) / m)[None]  # [1, 3, m] in (0, 1]
        counts = targets_per_row(corr)
        assert (counts == expected_targets(m)).all(), (m, counts.tolist(), expected_targets(m))


def test_ties_at_the_top_add_targets() -> None:
    """The count above assumes distinct values: two equal maxima are both targets, with equal weights."""
    corr = torch.tensor([[[0.1, 0.7, 0.3, 0.7, 0.2]]])
    assert merge_weights(corr, EPS)[0, 0].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]


@pytest.fixture(scope="module")
def real_maps(smol_dir: Path) -> dict[str, object]:
    """Head-averaged eager attention of smol-llava-1.5 on a picture: CLIP layer 12 [1, 577, 577] (seeded
    random tower) and SmolLM2 (real weights) decoder layer 4 [1, L, L], with the visual span."""
    from ficoco.models.presets import load
    from ficoco.models.real_presets import calibration_picture

    model, processor = load(smol_dir)
    model.set_attn_implementation("eager")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=calibration_picture(3), text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).int().argmax())
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[12]
        language = model(**inputs, output_attentions=True, logits_to_keep=1).attentions[4]
    return {"vision": vision.mean(1), "language": language.mean(1), "start": start, "length": 576}


@pytest.mark.parametrize("kept", [64, 144, 288, 450, 500, 501, 520, 549, 575])
def test_targets_per_row_on_real_attention(real_maps, kept) -> None:
    """FiCoCo's own filter picks the discarded set; each discarded token has exactly 1 target for <= 500 kept."""
    r = 576 - kept
    vision = real_maps["vision"]
    src, dst = split_by_score(vision_redundancy(vision, 0.35), r)
    counts = {"vision": targets_per_row(vision_correlation(vision, src, dst))}
    language, start, length = real_maps["language"], real_maps["start"], real_maps["length"]
    src, dst = split_by_score(language_redundancy(language, start, length, 0.6), r)
    counts["language"] = targets_per_row(language_correlation(language, start, length, src, dst, 0.6))
    for name, count in counts.items():
        assert count.shape == (1, r), name
        assert (count == expected_targets(kept)).all(), (name, kept, count.unique().tolist())


def test_only_the_first_steps_of_a_llava15_schedule_have_more_than_one_target() -> None:
    """The numbers the README quotes: LLaVA-1.5 (24 x 24 patches, CLIP layers 12..22, decoder layer 4)."""
    geometry = ModelGeometry(grid=(24, 24), vision_layers=24, feature_layer=22, text_layers=32)

    def adaptive(variant: str, ratio: float) -> list[tuple[str, int, int, int]]:
        schedule = build_schedule(FiCoCoConfig(variant, ratio=ratio), geometry)
        steps = [("V", s) for s in schedule.vision] + [("L", s) for s in schedule.language]
        return [(stage, s.layer, s.tokens_out, expected_targets(s.tokens_out)) for stage, s in steps
                if expected_targets(s.tokens_out) > 1]

    assert adaptive("v", 0.5) == [("V", 12, 549, 2), ("V", 13, 522, 2)]
    assert adaptive("v", 0.25) == [("V", 12, 536, 2)]
    assert adaptive("v", 0.11) == [("V", 12, 529, 2)]
    assert adaptive("vl", 0.25) == [("V", 12, 549, 2), ("V", 13, 522, 2)]
    assert adaptive("l", 0.5) == [] and adaptive("l", 0.868) == []  # round(0.868 * 576) = 500 kept
    assert adaptive("l", 0.87) == [("L", 4, 501, 2)] and adaptive("l", 0.9) == [("L", 4, 518, 2)]
