"""FiCoCo inside the tiny LLaVA-1.5 and LLaVA-NeXT presets, against Hugging Face and the plain reference."""

from __future__ import annotations

import copy

import pytest
import torch

from ficoco import FiCoCoConfig, apply, remove
from ficoco.patch.observe import LanguageEvent, observing
from tests.conftest import make_inputs
from tests.reference import ref_language_step, ref_vision_step

PRESETS = ("tiny-llava-1.5", "tiny-llava-next")


@pytest.fixture
def patched(tiny):
    """Yield a function (preset, config) -> (model, processor) with FiCoCo applied; undone afterwards."""
    used = []

    def make(name, config):
        model, processor = tiny[name]
        used.append(model)
        return apply(model, config), processor

    yield make
    for model in used:
        remove(model)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True)


def kv_lengths(cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


# --------------------------------------------------------------------------- no-op and accounting


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("variant", ["v", "l", "vl"])
def test_ratio_one_gives_exactly_hugging_face_logits(tiny, patched, photo, name, variant):
    model, processor = tiny[name]
    inputs = make_inputs(processor, photo)
    reference = run(model, inputs).logits
    model, _ = patched(name, FiCoCoConfig(variant, ratio=1.0))
    assert model.ficoco_plan.vision == () and not model.ficoco_plan.own_decoder
    assert torch.equal(run(model, inputs).logits, reference)


def next_grid_and_crops(model, inputs) -> tuple[int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = model.config
    rows, cols = get_anyres_image_grid_shape(inputs["image_sizes"][0], config.image_grid_pinpoints, 336)
    return rows, cols


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("variant", ["v", "l", "vl"])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.11])
def test_token_accounting_follows_the_schedule(tiny, patched, photo, name, variant, ratio):
    base_model, processor = tiny[name]
    inputs = make_inputs(processor, photo)
    unreduced = run(base_model, inputs).image_hidden_states.shape[0]  # HF's visual tokens
    prompt_text = inputs["input_ids"].shape[1] - int((inputs["input_ids"] == base_model.config.image_token_id).sum())
    model, _ = patched(name, FiCoCoConfig(variant, ratio=ratio))
    plan = model.ficoco_plan
    out = run(model, inputs)
    visual = out.image_hidden_states.shape[0]
    if plan.vision and name == "tiny-llava-1.5":
        assert visual == plan.vision[-1].tokens_out == max(1, round((ratio if variant == "v" else ratio**0.5) * 576))
    elif plan.vision:
        rows, cols = next_grid_and_crops(model, inputs)
        assert visual == plan.vision[-1].tokens_out * (1 + rows * cols) + rows
    else:
        assert visual == unreduced
    steps = plan.language_steps(visual)
    lengths = kv_lengths(out.past_key_values)
    layer = steps[0].layer if steps else len(lengths) - 1
    assert lengths[: layer + 1] == [prompt_text + visual] * (layer + 1)
    if steps:
        assert lengths[layer + 1 :] == [prompt_text + steps[-1].tokens_out] * (len(lengths) - layer - 1)
        if name == "tiny-llava-1.5":  # overall fraction of the 576 patch tokens
            assert steps[-1].tokens_out == round(ratio * 576)
    assert (ratio == 1.0) == (not plan.vision and not steps)


# --------------------------------------------------------------------------- against the reference


def check_vision_event(event):
    x, attn, positions, params = event.x, event.attn, event.positions, event.params
    for b in range(x.shape[0]):
        ref = ref_vision_step(x[b], attn[b], positions[b], event.r, grid=params.grid, lam=params.lam, eps=params.eps,
                              window=params.window, scale=params.scale, penalty=params.penalty)
        assert event.kept[b].tolist() == ref["positions"].tolist()
        torch.testing.assert_close(event.out[b], ref["x"], atol=1e-5, rtol=0)
        assert torch.equal(event.out[b, 0], x[b, 0])  # CLS is never reduced
        assert bool((event.kept[b].diff() > 0).all())  # raster order


@pytest.mark.parametrize("name", PRESETS)
def test_vision_steps_match_reference_inside_the_model(tiny, patched, photo, name):
    _, processor = tiny[name]
    model, _ = patched(name, FiCoCoConfig("v", ratio=0.25))
    with observing() as events:
        run(model.double(), make_inputs(processor, photo))
    model.float()
    assert [(e.layer, e.r) for e in events] == [(step.layer, step.r) for step in model.ficoco_plan.vision]
    for event in events:
        check_vision_event(event)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("instruction", ["Hi.", "Describe the image in detail: " + "what is the color of each object? " * 8])
def test_language_step_matches_reference_inside_the_model(tiny, patched, photo, name, instruction):
    _, processor = tiny[name]
    model, _ = patched(name, FiCoCoConfig("vl", ratio=0.25))
    inputs = make_inputs(processor, photo, instruction)
    with observing() as events:
        run(model.double(), inputs)
    model.float()
    event = next(e for e in events if isinstance(e, LanguageEvent))
    assert event.start == int((inputs["input_ids"][0] == model.config.image_token_id).int().argmax())  # span from <image>
    params = event.params
    ref = ref_language_step(event.x[0], event.attn[0], event.start, event.length, event.r,
                            beta=params.beta, gamma=params.gamma, eps=params.eps)
    assert event.rows[0].tolist() == list(ref["kept_rows"])
    torch.testing.assert_close(event.out[0], ref["x"], atol=1e-5, rtol=0)


def test_attention_maps_are_hugging_face_eager_attention(preset_dirs, photo):
    """The maps FiCoCo scores are HF's own eager attention probabilities, averaged over heads."""
    from ficoco.models.presets import load

    model, processor = load(preset_dirs["tiny-llava-1.5"], dtype=torch.float64)
    model.set_attn_implementation("eager")
    inputs = make_inputs(processor, photo)
    with torch.no_grad():
        hf = model(**inputs, output_attentions=True)
        hf_vision = model.model.vision_tower(inputs["pixel_values"].double(), output_attentions=True).attentions
    apply(model, FiCoCoConfig("v", ratio=0.5))
    with observing() as vision:
        run(model, inputs)
    assert vision[0].layer == 12
    torch.testing.assert_close(vision[0].attn, hf_vision[12].mean(1), atol=1e-10, rtol=0)
    apply(model, FiCoCoConfig("l", ratio=0.5))
    with observing() as language:
        run(model, inputs)
    assert language[0].layer == 4
    torch.testing.assert_close(language[0].attn, hf.attentions[4].mean(1), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- generation


def greedy_by_hand(model, inputs, steps: int, variant: str) -> torch.Tensor:
    """The logits [steps, V] of `steps` greedy tokens recomputed without `generate`: full forwards without a
    cache under FiCoCo-V (its reduction depends on the image only); under FiCoCo-L (whose scores depend on the
    text after the image, so the prompt is reduced once) one patched prefill, then Hugging Face's own decoder
    forward at layer 0's cache length, the unreduced position."""
    ids, logits = inputs["input_ids"], []
    with torch.no_grad():
        if variant == "v":
            for _ in range(steps):
                mask = torch.ones_like(ids)
                logits.append(model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits[0, -1])
                ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
            return torch.stack(logits)
        out = model(**inputs, use_cache=True)
        cache, decoder = out.past_key_values, model.model.language_model
        logits.append(out.logits[0, -1])
        for _ in range(steps - 1):
            token = logits[-1].argmax().view(1, 1)
            hidden = type(decoder).forward(
                decoder, inputs_embeds=decoder.embed_tokens(token), position_ids=torch.tensor([[cache.get_seq_length(0)]]),
                past_key_values=cache, use_cache=True,
            ).last_hidden_state
            logits.append(model.lm_head(hidden[0, -1]))
    return torch.stack(logits)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("variant", ["v", "l", "vl"])
def test_greedy_generate_equals_recomputation_at_quarter_ratio(tiny, patched, photo, name, variant):
    """`generate`'s tokens and every step's logits equal the recomputation (the tiny presets' random weights
    often repeat one token, so the logits are what catches a wrong decode position or cache)."""
    _, processor = tiny[name]
    model, _ = patched(name, FiCoCoConfig(variant, ratio=0.25))
    inputs = make_inputs(processor, photo)
    n_in = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :n_in], inputs["input_ids"])
    generated = out.sequences[0, n_in:]
    assert len(generated) == 8 or generated[-1] == model.generation_config.eos_token_id  # early only at EOS
    expected = greedy_by_hand(model, inputs, len(generated), variant)  # [n, V]
    assert torch.equal(generated, expected.argmax(-1))
    torch.testing.assert_close(torch.cat(out.logits), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_vision_reduction_decodes_the_same_with_and_without_cache(tiny, patched, photo, name):
    """FiCoCo-V is deterministic per prompt, so cached decoding must equal full recomputation."""
    _, processor = tiny[name]
    model, _ = patched(name, FiCoCoConfig("v", ratio=0.25))
    inputs = make_inputs(processor, photo)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        fresh = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("name", PRESETS)
def test_language_reduction_decodes_at_original_positions(tiny, patched, photo, name):
    """After FiCoCo-L the next token sits at the unreduced prompt length, over per-layer caches of different lengths.

    Hugging Face's own LlamaModel.forward, given the same cache and that position, must give the same logits.
    """
    _, processor = tiny[name]
    model, _ = patched(name, FiCoCoConfig("l", ratio=0.25))
    inputs = make_inputs(processor, photo)
    prefill = run(model, inputs)
    length = prefill.past_key_values.get_seq_length(0)
    token = prefill.logits[:, -1:].argmax(-1)  # [1, 1]
    hf_cache = copy.deepcopy(prefill.past_key_values)
    with torch.no_grad():
        ours = model(input_ids=token, past_key_values=prefill.past_key_values, use_cache=True).logits
        decoder = model.model.language_model
        hidden = type(decoder).forward(
            decoder, inputs_embeds=decoder.embed_tokens(token), position_ids=torch.tensor([[length]]),
            past_key_values=hf_cache, use_cache=True,
        ).last_hidden_state
    torch.testing.assert_close(ours, model.lm_head(hidden), atol=1e-5, rtol=0)
    assert len(set(kv_lengths(prefill.past_key_values))) == 2


# --------------------------------------------------------------------------- NeXT layout and bad input


def test_next_reduced_layout_places_newlines_after_each_row_of_crops(tiny, patched, photo):
    model, processor = patched("tiny-llava-next", FiCoCoConfig("v", ratio=0.11))
    inputs = make_inputs(processor, photo)
    features = run(model, inputs).image_hidden_states  # [n, D]
    k = model.ficoco_plan.vision_tokens
    rows, cols = next_grid_and_crops(model, inputs)
    newline = model.model.image_newline
    ends = [k + (row + 1) * (cols * k + 1) - 1 for row in range(rows)]
    is_newline = (features == newline).all(-1)
    assert is_newline.nonzero().flatten().tolist() == ends


def test_bad_inputs_name_the_values(tiny, photo):
    model, processor = tiny["tiny-llava-1.5"]
    with pytest.raises(ValueError, match="ratio=0"):
        FiCoCoConfig("v", ratio=0)
    with pytest.raises(ValueError, match="ratio=1.5"):
        FiCoCoConfig("v", ratio=1.5)
    with pytest.raises(ValueError, match="tokens=600 .* 576"):
        apply(model, FiCoCoConfig("v", tokens=600))
    assert not hasattr(model, "ficoco_plan")
    with pytest.raises(ValueError, match="unsupported architecture LlamaForCausalLM"):
        from transformers import LlamaConfig, LlamaForCausalLM

        apply(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=16)), FiCoCoConfig("l", ratio=0.5))
    inputs = make_inputs(processor, photo)
    no_image = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5)
    apply(model, FiCoCoConfig("v", ratio=0.5))
    try:
        with pytest.raises(ValueError, match=f"no image placeholder \\(token id {model.config.image_token_id}\\)"):
            run(model, {**inputs, "input_ids": no_image})
    finally:
        remove(model)
