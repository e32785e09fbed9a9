"""The schedule: Python ints fixed before any forward, pinned to hand-computed numbers."""

from __future__ import annotations

import pytest

from ficoco.config import FiCoCoConfig, ModelGeometry, Step, build_schedule, even_steps

LLAVA_15 = ModelGeometry(grid=(24, 24), vision_layers=24, feature_layer=22, text_layers=32)


def test_released_code_setting_r42_leaves_114_tokens():
    """The authors reduce layers 12..22 by r = 42 each, leaving 114 patch tokens."""
    schedule = build_schedule(FiCoCoConfig("v", tokens=114), LLAVA_15)
    assert [s.layer for s in schedule.vision] == list(range(12, 23))
    assert {s.r for s in schedule.vision} == {42}
    assert schedule.vision[-1].tokens_out == 114 and schedule.language == ()


def test_half_ratio_spreads_the_remainder_over_the_first_layers():
    schedule = build_schedule(FiCoCoConfig("v", ratio=0.5), LLAVA_15)  # 288 discards over 11 layers
    assert [s.r for s in schedule.vision] == [27, 27] + [26] * 9
    assert [s.tokens_out for s in schedule.vision][:3] == [549, 522, 496]
    assert schedule.vision[-1].tokens_out == 288


@pytest.mark.parametrize("ratio, kept", [(1.0, 576), (0.5, 288), (0.25, 144), (0.11, 63)])
def test_language_only_reduces_at_layer_four(ratio, kept):
    schedule = build_schedule(FiCoCoConfig("l", ratio=ratio), LLAVA_15)
    assert schedule.vision == ()
    assert schedule.language == (() if ratio == 1.0 else (Step(4, 576, kept),))


def test_vl_splits_geometrically_and_ends_at_the_overall_ratio():
    schedule = build_schedule(FiCoCoConfig("vl", ratio=0.25), LLAVA_15)
    assert schedule.vision[-1].tokens_out == 288  # sqrt(0.25) * 576
    assert schedule.language == (Step(4, 288, 144),)  # 0.25 * 576
    schedule = build_schedule(FiCoCoConfig("vl", tokens=64), LLAVA_15)
    assert (schedule.vision[-1].tokens_out, schedule.language[-1].tokens_out) == (192, 64)


def test_language_schedule_follows_the_span_it_is_given():
    """LLaVA-NeXT: the span is whatever the prompt holds (here HF's 2438 tokens of a 500x400 image)."""
    schedule = build_schedule(FiCoCoConfig("l", ratio=0.25), LLAVA_15, visual_tokens=2438)
    assert schedule.language == (Step(4, 2438, 610),)


def test_even_steps_drops_empty_layers():
    assert even_steps([1, 2, 3], 10, 8) == (Step(1, 10, 9), Step(2, 9, 8))
    assert even_steps([1, 2, 3], 10, 10) == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="x", ratio=0.5), "variant must be one of"),
        (dict(variant="v"), "exactly one of ratio and tokens"),
        (dict(variant="v", ratio=0.5, tokens=3), "ratio=0.5, tokens=3"),
        (dict(variant="v", ratio=0.0), r"ratio must be in \(0, 1\], got ratio=0.0"),
        (dict(variant="v", ratio=-1), "got ratio=-1"),
        (dict(variant="v", ratio=1.01), "got ratio=1.01"),
        (dict(variant="v", tokens=0), "got tokens=0"),
        (dict(variant="v", ratio=0.5, epsilon=1.0), "epsilon=1.0"),
        (dict(variant="l", ratio=0.5, language_layers=(5, 4)), r"got \(5, 4\)"),
    ],
)
def test_bad_config_names_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FiCoCoConfig(**kwargs)


def test_schedule_errors_name_the_model_limits():
    with pytest.raises(ValueError, match="tokens=577 is more than the 576 visual tokens"):
        build_schedule(FiCoCoConfig("v", tokens=577), LLAVA_15)
    with pytest.raises(ValueError, match="vision_start_layer=23 .*layer 22 of 24"):
        build_schedule(FiCoCoConfig("v", ratio=0.5, vision_start_layer=23), LLAVA_15)
    with pytest.raises(ValueError, match=r"language_layers=\(32,\) .* 32 decoder layers"):
        build_schedule(FiCoCoConfig("l", ratio=0.5, language_layers=(32,)), LLAVA_15)


def test_lists_become_tuples_so_the_config_stays_hashable():
    """`language_layers=[4, 8]` (a JSON manifest, a caller's list) is the tuple config, hashable as the patch needs."""
    config = FiCoCoConfig("vl", ratio=0.25, language_layers=[4, 8], window=[3, 3])
    assert config.language_layers == (4, 8) and config.window == (3, 3)
    assert config == FiCoCoConfig("vl", ratio=0.25, language_layers=(4, 8), window=(3, 3))
    assert hash(config) == hash(FiCoCoConfig("vl", ratio=0.25, language_layers=(4, 8), window=(3, 3)))
    assert build_schedule(config, LLAVA_15).language == (Step(4, 288, 216), Step(8, 216, 144))


@pytest.mark.parametrize("kwargs", [dict(language_layers=4), dict(language_layers="4"), dict(language_layers=[4.0]),
                                    dict(window=(True, 2)), dict(window=None)])
def test_layers_and_window_that_are_not_ints_are_refused_by_name(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"{name} must be a sequence of ints, got {name}="):
        FiCoCoConfig("vl", ratio=0.25, **kwargs)
