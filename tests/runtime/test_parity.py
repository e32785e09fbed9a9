"""The runtime (ONNX Runtime backend) against the FiCoCo-patched PyTorch model, and the prompt against HF.

Greedy tokens must be identical to `model.generate` of the patched Hugging Face model, token for
token, on real photographs, for LLaVA-1.5 (v, l, vl) and LLaVA-NeXT (vl); every step's logits are
compared as well. The rendering and ids of the prompt must equal the HF processor's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import Pipeline
from runtime.prompt import ChatTokenizer

from tests.conftest import BUILDS

from .conftest import PHOTOS

NEW_TOKENS = 24
INSTRUCTIONS = ("Describe the image.", "What is the colour of the sky in this picture, and why? ¿Qué es? 日本")


def reference_model(build: Path, source: Path) -> tuple[Any, Any]:
    """The patched HF model and processor of a build made from checkpoint `source`, the NeXT grid pinned as
    export.trace.pipeline.fix_grid does."""
    from ficoco import FiCoCoConfig, apply
    from ficoco.models.presets import load

    manifest = json.loads((build / "manifest.json").read_text())
    model, processor = load(source)
    grid = manifest["schedule"]["grid"]
    if grid:
        side = model.config.vision_config.image_size
        pinpoint = [grid[0] * side, grid[1] * side]
        model.config.image_grid_pinpoints = [pinpoint]
        processor.image_processor.image_grid_pinpoints = [pinpoint]
    apply(model, FiCoCoConfig(manifest["variant"], ratio=manifest["ficoco"]["ratio"], crop_layout="crops"))
    return model, processor


def hf_generate(model: Any, processor: Any, image: Image.Image, instruction: str) -> tuple[list[int], list[np.ndarray]]:
    """(greedy tokens, raw logits [V] per step) of the patched model's own generate."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, [step[0].numpy() for step in out.logits]


def spy_logits(pipe: Pipeline) -> list[np.ndarray]:
    """Record a copy of the logits of every prefill / decode step of `pipe`'s backend."""
    seen: list[np.ndarray] = []
    backend, prefill, decode = pipe.backend, pipe.backend.prefill, pipe.backend.decode

    def record(result: tuple[np.ndarray, Any]) -> tuple[np.ndarray, Any]:
        seen.append(np.array(result[0], dtype=np.float32))
        return result

    backend.prefill = lambda *a: record(prefill(*a))  # type: ignore[method-assign]
    backend.decode = lambda *a: record(decode(*a))  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", list(BUILDS))
def test_greedy_tokens_equal_patched_pytorch_generate(name: str, build_dir, preset_dirs, photo_files) -> None:
    build = build_dir(name)
    model, processor = reference_model(build, preset_dirs[BUILDS[name][0]])
    with Pipeline.from_build(build, backend="onnxruntime") as pipe:
        logits = spy_logits(pipe)
        for photo in PHOTOS:
            for instruction in INSTRUCTIONS:
                logits.clear()
                image = Image.open(photo_files[photo]).convert("RGB")
                expected, expected_logits = hf_generate(model, processor, image, instruction)
                result = pipe(photo_files[photo], instruction, max_new_tokens=NEW_TOKENS)
                where = f"{name} {photo} {instruction!r}"
                assert list(result.token_ids) == expected, where
                assert len(logits) == len(expected_logits), where
                worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, expected_logits, strict=True))
                assert worst < 2e-3, f"{where}: logits differ by {worst}"
                assert result.text == processor.decode(expected, skip_special_tokens=True), where
                assert result.cache_lengths == pipe.build.plan.cache_lengths(result.tokens.prompt), where


def paper_counts(preset: str, variant: str, ratio: float) -> tuple[int, int, int, int]:
    """(crops, kept per crop, visual tokens into the LLM, visual tokens after FiCoCo-L), written from the paper's
    rule for the tiny presets (576 patches, LLaVA-NeXT at its 2 x 2 grid: base + 4 crops, 2 newlines), not read
    from the build."""
    crops, newlines = (5, 2) if "next" in preset else (1, 0)
    kept = round((ratio ** 0.5 if variant == "vl" else ratio) * 576) if "v" in variant else 576
    visual = crops * kept + newlines
    after = round(ratio * 576 / kept * visual) if variant == "vl" else round(ratio * visual) if variant == "l" else visual
    return crops, kept, visual, after


@pytest.mark.parametrize("name", list(BUILDS))
def test_token_counts_follow_the_schedule(name: str, build_dir, photo_files) -> None:
    build = build_dir(name)
    crops, kept, visual, after = paper_counts(*BUILDS[name])
    with Pipeline.from_build(build, backend="onnxruntime") as pipe:
        result = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=3)
    counts = result.tokens
    assert (counts.patches_per_crop, counts.crops, counts.kept_per_crop) == (576, crops, kept)
    assert (counts.into_llm, counts.after_ficoco_l) == (visual, after)
    if "l" in BUILDS[name][1]:
        assert after < visual and min(result.cache_lengths) == counts.prompt - (visual - after)
    else:
        assert set(result.cache_lengths) == {counts.prompt}
    assert max(result.cache_lengths) == counts.prompt == counts.text_before + counts.into_llm + counts.text_after


@pytest.mark.parametrize("preset", ["tiny-llava-1.5", "tiny-llava-next"])
def test_prompt_rendering_and_ids_equal_hf_processor(preset: str, preset_dirs, tiny) -> None:
    _, processor = tiny[preset]
    ours = ChatTokenizer.from_directory(preset_dirs[preset])
    image = Image.new("RGB", (640, 480), (120, 30, 200))
    for instruction in (*INSTRUCTIONS, "a", "  spaces  and\nnew lines\n", "tokens </s> and <s> in text", "{{ x }} {% raw %}"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert ours.render(instruction) == text
        ids = processor(images=image, text=text, return_tensors="np")["input_ids"][0]  # [L], <image> expanded
        split = ours.encode(instruction)
        image_run = int((ids == ours.image_token_id).sum())
        assert image_run > 1 and ids[0] == 1, "HF expands <image> and adds BOS"
        rebuilt = np.concatenate([split.before[0], [ours.image_token_id] * image_run, split.after[0]])
        np.testing.assert_array_equal(rebuilt, ids)
