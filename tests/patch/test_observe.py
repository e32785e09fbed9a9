"""The observation hook (`ficoco.patch.observe`): what each FiCoCo step kept, reported to whoever asks."""

from __future__ import annotations

import pytest
import torch

from ficoco import FiCoCoConfig, apply, remove
from ficoco.core import language_step, vision_step
from ficoco.patch import clip, observe
from ficoco.patch.observe import LanguageEvent, VisionEvent, observing
from tests.conftest import make_inputs


@pytest.fixture
def patched_vl(tiny, photo):
    """(model, inputs) of tiny LLaVA-1.5 under FiCoCo-VL at ratio 0.25; undone afterwards."""
    model, processor = tiny["tiny-llava-1.5"]
    apply(model, FiCoCoConfig("vl", ratio=0.25))
    yield model, make_inputs(processor, photo)
    remove(model)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True)


def test_events_are_the_steps_of_the_plan_and_hold_what_core_keeps(patched_vl):
    """Vision events per scheduled encoder layer, then language events per decoder layer; each event's kept set
    is what `ficoco.core` keeps from the event's own inputs, and the steps chain (one's kept is the next's input)."""
    model, inputs = patched_vl
    plan = model.ficoco_plan
    with observing() as events:
        out = forward(model, inputs)
    visual = out.image_hidden_states.shape[0]
    language = plan.language_steps(visual)
    assert [type(e) for e in events] == [VisionEvent] * len(plan.vision) + [LanguageEvent] * len(language)
    vision_events, language_events = events[: len(plan.vision)], events[len(plan.vision) :]
    assert [(e.layer, e.r) for e in vision_events] == [(s.layer, s.r) for s in plan.vision]
    assert [(e.layer, e.length, e.r) for e in language_events] == [(s.layer, s.tokens_in, s.r) for s in language]
    positions = torch.arange(plan.geometry.patches)[None]
    for event in vision_events:
        assert torch.equal(event.positions, positions)  # the previous step's kept set
        out_x, kept = vision_step(event.x, event.attn, event.positions, event.r, event.params)
        assert torch.equal(event.kept, kept) and torch.equal(event.out, out_x)
        assert event.kept.shape == (1, event.positions.shape[1] - event.r)
        positions = event.kept
    assert positions.shape[1] == visual  # the last step's kept patches are the LLM's visual tokens (LLaVA-1.5)
    (event,) = language_events
    start = int((inputs["input_ids"][0] == model.config.image_token_id).int().argmax())
    assert (event.start, event.length) == (start, visual)
    _, rows = language_step(event.x, event.attn, event.start, event.length, event.r, event.params)
    assert torch.equal(event.rows, rows)
    assert torch.equal(event.kept, rows[:, start : start + visual - event.r] - start)
    kept = event.kept[0].tolist()
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < visual and len(kept) == language[0].tokens_out


def test_language_kept_set_is_what_the_cache_holds(patched_vl):
    """Independent of the step's own math: the layer after FiCoCo-L caches the text and the kept visual tokens
    at their original positions. Its keys, recomputed from the step's output with RoPE at the reported rows,
    equal the model's cache; at other rows they do not."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, inputs = patched_vl
    with observing() as events:
        out = forward(model, inputs)
    (event,) = [e for e in events if isinstance(e, LanguageEvent)]
    cache, decoder = out.past_key_values.layers, model.model.language_model
    assert cache[event.layer].keys.shape[-2] == event.x.shape[1]  # the reducing layer caches the whole prompt
    assert cache[event.layer + 1].keys.shape[-2] == event.x.shape[1] - event.r == event.rows.shape[1]
    layer, attn = decoder.layers[event.layer], decoder.layers[event.layer + 1].self_attn
    with torch.no_grad():
        after = event.out + layer.mlp(layer.post_attention_layernorm(event.out))  # the reducing layer's output
        normed = decoder.layers[event.layer + 1].input_layernorm(after)
        keys = attn.k_proj(normed).view(1, after.shape[1], -1, attn.head_dim).transpose(1, 2)  # [1, Hkv, L-r, D]

        def rotated(rows):
            return apply_rotary_pos_emb(keys, keys, *decoder.rotary_emb(after, position_ids=rows))[1]

        torch.testing.assert_close(rotated(event.rows), cache[event.layer + 1].keys, atol=1e-5, rtol=0)
        wrong = event.rows.clone()
        wrong[:, event.start : event.start + event.length - event.r] = event.start + torch.arange(
            event.length - event.r)  # the first visual rows instead of the kept ones
        assert not torch.equal(wrong, event.rows)
        assert not torch.allclose(rotated(wrong), cache[event.layer + 1].keys, atol=1e-3)


def test_vision_kept_set_is_what_the_encoder_returns(tiny, photo):
    """clip.encode's own output positions are the last vision event's kept set (the export's vision graph runs it)."""
    model, processor = tiny["tiny-llava-next"]
    from ficoco.patch.llava import make_plan

    plan = make_plan(model, FiCoCoConfig("v", ratio=0.25))
    pixels = make_inputs(processor, photo)["pixel_values"][0]  # [crops, 3, S, S]
    with torch.no_grad(), observing() as events:
        hidden, positions = clip.encode(model.model.vision_tower, pixels, plan.vision, plan.geometry.feature_layer,
                                        plan.vision_params)
    assert [e.layer for e in events] == [s.layer for s in plan.vision]
    assert events[-1].kept.shape == (pixels.shape[0], plan.vision_tokens)
    assert torch.equal(events[-1].kept, positions)
    assert hidden.shape[1] == 1 + plan.vision_tokens


def test_nothing_is_built_or_recorded_outside_the_context(patched_vl, monkeypatch):
    model, inputs = patched_vl
    built = []

    def counting(kind):
        def make(*args):
            built.append(kind)
            return kind(*args)
        return make

    monkeypatch.setattr(observe, "VisionEvent", counting(VisionEvent))
    monkeypatch.setattr(observe, "LanguageEvent", counting(LanguageEvent))
    assert not observe.active()
    forward(model, inputs)
    assert built == []  # off: no event is even made
    with observing() as events:
        forward(model, inputs)
    assert len(events) == len(built) > 0 and not observe.active()
    forward(model, inputs)
    assert len(events) == len(built)  # nothing recorded after the block


def test_observers_nest_and_are_removed_on_error(patched_vl):
    model, inputs = patched_vl
    seen = []

    def failing(event):
        raise RuntimeError("observer failed")

    with observing() as outer:
        with pytest.raises(RuntimeError, match="observer failed"):
            with observe.observe(failing):
                forward(model, inputs)
        with observe.observe(seen.append):
            forward(model, inputs)
    assert not observe.active()
    assert [type(e) for e in seen] == [type(e) for e in outer[-len(seen):]] and len(seen) > 0
    with pytest.raises(TypeError, match="observer must be callable, got list"):
        with observe.observe([]):
            pass
    assert not observe.active()
