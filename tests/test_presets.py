"""Tests for the offline tiny LLaVA presets (ficoco/models/presets.py)."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ficoco.models import presets
from ficoco.models.presets import PRESETS, ModelSourceError, PresetSpec, build_preset, load, resolve_model_dir

PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


@pytest.fixture(scope="module")
def loaded(preset_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """{preset name: (model, processor)} loaded through the public `load` path."""
    return {name: load(path) for name, path in preset_dirs.items()}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A deterministic 500x400 (W x H) RGB noise image with a bright square."""
    arr = (np.random.default_rng(0).random((400, 500, 3)) * 255).astype(np.uint8)
    arr[100:200, 150:300] = 255
    return Image.fromarray(arr)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_spec_validation_and_geometry() -> None:
    spec = PRESETS["tiny-llava-1.5"]
    assert (spec.num_patches, spec.num_vision_tokens) == (576, 577)
    with pytest.raises(ValueError, match="kv heads"):
        PresetSpec(name="bad", architecture="llava", text_kv_heads=3)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        PresetSpec(name="bad", architecture="llava_next")
    with pytest.raises(ValueError, match="architecture"):
        PresetSpec(name="bad", architecture="qwen")
    with pytest.raises(ValueError, match="pinpoint"):
        PresetSpec(name="bad", architecture="llava_next", image_grid_pinpoints=((336, 500),))
    with pytest.raises(AttributeError):
        spec.seed = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "name, model_cls, proc_cls, image_proc_prefix",
    [
        ("tiny-llava-1.5", "LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessor"),
        ("tiny-llava-next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessor"),
    ],
)
def test_loaded_classes_and_geometry(loaded, name, model_cls, proc_cls, image_proc_prefix) -> None:
    model, processor = loaded[name]
    assert type(model).__name__ == model_cls and not model.training
    assert type(processor).__name__ == proc_cls
    assert type(processor.image_processor).__name__.startswith(image_proc_prefix)
    cfg = model.config
    vision = model.model.vision_tower  # CLIPVisionModel; in transformers 5.23 it has no .vision_model
    assert vision.embeddings.num_positions == 577
    assert len(vision.encoder.layers) == 24 and cfg.vision_config.hidden_act == "quick_gelu"
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    text = cfg.text_config
    assert len(model.model.language_model.layers) == 8
    attn = model.model.language_model.layers[0].self_attn
    head_dim = text.hidden_size // text.num_attention_heads
    assert attn.q_proj.out_features == 4 * head_dim and attn.k_proj.out_features == 2 * head_dim  # GQA
    assert text.vocab_size == len(processor.tokenizer) and text.max_position_embeddings == 4096
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.image_token_id == processor.image_token_id == image_id
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_image_token_and_round_trip(loaded) -> None:
    tok = loaded["tiny-llava-1.5"][1].tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert 500 <= len(tok) <= 1000
    assert tok.encode("<image>", add_special_tokens=False) == [image_id]
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(image_id) == 1
    assert tok.decode(ids) == "<s>" + PROMPT
    sentence = "An astronaut drinks coffee next to a purple rocket, 42 km away!"
    assert tok.decode(tok(sentence)["input_ids"], skip_special_tokens=True) == sentence
    assert (tok.eos_token, tok.pad_token) == ("</s>", "<pad>")


@pytest.mark.parametrize("name", list(PRESETS))
def test_chat_template_renders_llava_format(loaded, preset_dirs, name) -> None:
    processor = loaded[name][1]
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == PROMPT
    assert (preset_dirs[name] / "chat_template.jinja").is_file()


def test_llava15_processor_expands_576_image_tokens(loaded, image) -> None:
    model, processor = loaded["tiny-llava-1.5"]
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits  # [1, seq, vocab]
    assert sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats) == 576
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_next_processor_matches_model_feature_count(loaded, image) -> None:
    model, processor = loaded["tiny-llava-next"]
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == [[400, 500]]
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output  # per image: [n_features, text_hidden]
        logits = model(**inputs).logits
    assert n_tokens > 576 and n_tokens == sum(f.shape[0] for f in feats)
    assert torch.isfinite(logits).all()


def test_vision_attention_is_not_uniform(loaded, image) -> None:
    model, processor = loaded["tiny-llava-1.5"]
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    original = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = tower(pixel_values, output_attentions=True).attentions[0]  # [1, heads, 577, 577]
    finally:
        tower.set_attn_implementation(original)
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean().item()
    assert entropy < 0.95 * math.log(577)


@pytest.mark.parametrize("name", list(PRESETS))
def test_build_is_deterministic(preset_dirs, tmp_path, name) -> None:
    again = build_preset(name, tmp_path / name)
    for fname in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _sha256(again / fname) == _sha256(preset_dirs[name] / fname), fname


@pytest.mark.parametrize("name", list(PRESETS))
def test_greedy_generate_runs(loaded, image, name) -> None:
    model, processor = loaded[name]
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    n_in = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n_in], inputs["input_ids"]) and 1 <= out.shape[1] - n_in <= 5
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), out)


def test_resolve_unknown_name_and_bad_dir(tmp_path) -> None:
    with pytest.raises(ModelSourceError, match="tiny-llava-9") as err:
        resolve_model_dir("tiny-llava-9", cache_dir=tmp_path)
    assert isinstance(err.value, ValueError) and "tiny-llava-1.5, tiny-llava-next" in str(err.value)
    empty = tmp_path / "ckpt"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="ckpt"):
        resolve_model_dir(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match=re.escape(str(empty))):
        load(empty)


def test_checkpoint_sits_below_presets() -> None:
    """ficoco.models.checkpoint owns ModelSourceError and imports nothing of ficoco.models.presets (no import cycle), at any level."""
    import ast

    from ficoco.models import checkpoint, real_presets

    tree = ast.parse(Path(checkpoint.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not [name for name in imported if name and "presets" in name], sorted(filter(None, imported))
    assert presets.ModelSourceError is checkpoint.ModelSourceError is real_presets.ModelSourceError
    assert ModelSourceError.__module__ == "ficoco.models.checkpoint"


def test_resolve_existing_dir_and_cached_preset(preset_dirs, tmp_path, monkeypatch) -> None:
    assert resolve_model_dir(preset_dirs["tiny-llava-1.5"]) == preset_dirs["tiny-llava-1.5"]
    calls: list[Path] = []

    def fake_build(name: str, out_dir: Path) -> Path:
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(presets, "build_preset", fake_build)
    monkeypatch.setenv("FICOCO_CACHE", str(tmp_path / "env-cache"))
    first = resolve_model_dir("tiny-llava-next")
    assert first == tmp_path / "env-cache" / f"tiny-llava-next-{presets.PRESET_VERSION}"
    assert resolve_model_dir("tiny-llava-next") == first and len(calls) == 1
    assert calls[0].parent == first.parent and calls[0] != first  # built in a temporary sibling
    explicit = resolve_model_dir("tiny-llava-next", cache_dir=tmp_path / "arg-cache")
    assert explicit.parent == tmp_path / "arg-cache" and len(calls) == 2
    assert sorted(p.name for p in explicit.parent.iterdir()) == [explicit.name]


def test_interrupted_cache_build_leaves_nothing(tmp_path, monkeypatch) -> None:
    from transformers import LlavaProcessor

    def broken_save(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_dir("tiny-llava-1.5", cache_dir=tmp_path)
    assert not (tmp_path / f"tiny-llava-1.5-{presets.PRESET_VERSION}").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either
