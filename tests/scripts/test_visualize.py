"""scripts/visualize.py on the tiny presets: one panel per FiCoCo-V step, kept counts as scheduled."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ficoco import FiCoCoConfig, build_schedule
from ficoco.config import ModelGeometry
from ficoco.patch import clip, observe
from scripts import visualize

TINY = ModelGeometry((24, 24), 24, 22, 8)


def png_panels(path) -> list[dict]:
    with Image.open(path) as image:
        image.load()
        return json.loads(image.text["ficoco"])["panels"]


def test_cli_writes_one_panel_per_step_with_the_scheduled_counts(preset_dirs, tmp_path):
    pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the default picture")
    out = tmp_path / "fig.png"
    assert visualize.main(["--model", str(preset_dirs["tiny-llava-1.5"]), "--ratio", "0.25", "--out", str(out)]) == 0
    steps = build_schedule(FiCoCoConfig("v", ratio=0.25), TINY).vision
    panels = png_panels(out)
    assert len(panels) == 1 + len(steps) == 12
    assert [p["kept"] for p in panels] == [576] + [s.tokens_out for s in steps]
    assert panels[-1]["kept"] == 144
    with Image.open(out) as image:
        rows = -(-len(panels) // 4)
        assert image.size == (4 * 336, visualize.TITLE_H + rows * (336 + visualize.TITLE_H) + visualize.LEGEND_H)
    assert not observe.active()  # the script's observer is gone


def test_trace_records_kept_discarded_and_merge_targets(tiny, photo):
    model, processor = tiny["tiny-llava-next"]  # base crop of LLaVA-NeXT, FiCoCo-V part of VL
    rgb, steps, plan = visualize.trace(model, processor, photo, FiCoCoConfig("vl", ratio=0.25))
    assert rgb.shape == (336, 336, 3)
    alive = set(range(576))
    for step, planned in zip(steps, plan.vision, strict=True):
        assert len(step.kept) == planned.tokens_out and len(step.discarded) == planned.r
        assert set(step.discarded) <= alive and set(step.targets) <= set(step.kept)
        alive -= set(step.discarded)
        assert alive == set(step.kept) and list(step.kept) == sorted(step.kept)
    assert len(alive) == 288  # sqrt(0.25) * 576
    pixels, _ = visualize.preprocess(processor, photo)  # the same encoder run, unobserved: its own kept positions
    with torch.no_grad():
        _, positions = clip.encode(model.model.vision_tower, pixels, plan.vision, plan.geometry.feature_layer,
                                   plan.vision_params)
    assert positions[0].tolist() == list(steps[-1].kept)


def test_variant_without_vision_steps_is_refused(tiny, photo):
    model, processor = tiny["tiny-llava-1.5"]
    with pytest.raises(ValueError, match="no FiCoCo-V step"):
        visualize.trace(model, processor, photo, FiCoCoConfig("v", ratio=1.0))
