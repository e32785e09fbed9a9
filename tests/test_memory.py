"""ficoco.analysis.memory: parameter counts against real Hugging Face modules, weight bytes, KV capacities, the plan."""

from __future__ import annotations

import pytest

from ficoco.analysis import memory as M
from ficoco.config import FiCoCoConfig, Step
from ficoco.geometry import config_geometry, text_geometry
from ficoco.plan import assemble, default_max_seq_len, plan
from scripts.flops import load_model_config

# --------------------------------------------------------------------------- against Hugging Face


def hf_model(kind: str, vision: dict, text: dict, **top):
    """A LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with random weights, and its config dict."""
    import transformers as T

    config_cls, model_cls = {"llava": (T.LlavaConfig, T.LlavaForConditionalGeneration),
                             "llava_next": (T.LlavaNextConfig, T.LlavaNextForConditionalGeneration)}[kind]
    config = config_cls(vision_config=vision, text_config=text, **top)
    return model_cls(config), config.to_dict()


def graph_of(name: str, cuts: list[int], tied: bool, segments: int) -> str:
    """The graph of the build layout that HF parameter `name` belongs to (independently of ficoco.analysis.memory)."""
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")):
        return "vision"
    if name.startswith("model.language_model.embed_tokens."):
        return f"decoder.{segments - 1}" if tied else "embed"  # tied: named_parameters names the shared table once
    if name.startswith(("lm_head.", "model.language_model.norm.")):
        return f"decoder.{segments - 1}"
    parts = name.split(".")  # model.language_model.layers.{i}.{self_attn|mlp|*_layernorm}...
    layer, part = int(parts[3]), parts[4]
    after = part in ("mlp", "post_attention_layernorm") and layer in cuts
    return f"decoder.{sum(c < layer for c in cuts) + after}"


def hf_counts(model, cuts: list[int], tied: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():  # shared (tied) parameters once, as sum(p.numel()) counts them
        graph = graph_of(name, cuts, tied, len(cuts) + 1)
        counts[graph] = counts.get(graph, 0) + p.numel()
    return counts


def check(model, config: dict, cuts: list[int]) -> None:
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert M.tied_embeddings(config) == tied
    ours = M.parameter_counts(config, cuts)
    assert ours["vision"] + ours["embed"] + ours["decoder"] == sum(p.numel() for p in model.parameters())
    expected = hf_counts(model, cuts, tied)
    assert {k: v for k, v in ours.items() if k != "decoder" and (v or k != "embed")} == expected
    assert (ours["embed"] == 0) == tied


@pytest.fixture(scope="module")
def tokenizer():
    from ficoco.models.presets import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("name", ["tiny-llava-1.5", "tiny-llava-next"])
@pytest.mark.parametrize("cuts", [[], [4], [1, 5, 7]])
def test_counts_match_the_tiny_presets(name, cuts, tokenizer):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from ficoco.models.presets import PRESETS, _model_config

    config = _model_config(PRESETS[name], tokenizer)
    cls = LlavaForConditionalGeneration if config.model_type == "llava" else LlavaNextForConditionalGeneration
    check(cls(config), config.to_dict(), cuts)


VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)


def text(tie: bool, **extra) -> dict:
    return dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=tie, **extra)


@pytest.mark.parametrize(("kind", "text_tie", "top", "tied"), [
    ("llava", True, {}, True),  # LlavaConfig takes text_config's tie
    ("llava", False, {"tie_word_embeddings": True}, True),
    ("llava", False, {}, False),
    ("llava_next", True, {}, False),  # LlavaNextConfig does not
    ("llava_next", False, {"tie_word_embeddings": True}, True),
])
@pytest.mark.parametrize("cuts", [[], [0], [2, 3]])
def test_counts_match_llava_tied_and_untied(kind, text_tie, top, tied, cuts):
    model, config = hf_model(kind, VISION, text(text_tie), **top)
    assert M.tied_embeddings(config) is tied
    check(model, config, cuts)


def test_counts_follow_head_dim_biases_and_feature_layers():
    """head_dim != hidden / heads, attention and MLP biases, no projector bias, two feature layers."""
    model, config = hf_model("llava", VISION, text(False, head_dim=12, attention_bias=True, mlp_bias=True),
                             multimodal_projector_bias=False, vision_feature_layer=[-2, -3])
    check(model, config, [1])
    t = text_geometry(config)
    assert (t.hidden, t.heads, t.kv_heads, t.head_dim) == (32, 4, 2, 12)


def test_bytes_follow_the_formats():
    config = load_model_config("llava-1.5-7b")
    params = M.parameter_counts(config, [4])
    for weights, width in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        assert M.weight_bytes(config, weights, reduction_layers=[4]) == {k: width * v for k, v in params.items()}
    mixed = M.weight_bytes(config, "int8", "fp32")
    assert mixed["vision"] == 4 * params["vision"] and mixed["embed"] == 2 * params["embed"]  # int8 keeps it fp16
    assert set(M.weight_bytes(config)) == {"vision", "embed", "decoder"}  # segments only with reduction layers


def test_quantized_linears_by_hand():
    assert M.Linear(64, 32, False).nbytes("int8", 32) == 64 * 32 + 2 * 32  # + fp16 scale per output row
    assert M.Linear(64, 32, True).nbytes("int8", 32) == 64 * 32 + 2 * 32 + 2 * 32  # + fp16 bias
    assert M.Linear(64, 32, False).nbytes("int4", 32) == 64 * 32 // 2 + 32 * 2 * (2 + 0.5)  # 2 blocks per row
    assert M.Linear(96, 8, False).nbytes("int4", 64) == 96 * 8 // 2 + 8 * 2 * 2.5  # ceil(96 / 64) = 2 blocks
    assert M.Linear(2, 1, False).nbytes("int4", 32) == 2 + 2  # 3 nibbles -> 2 bytes, + one fp16 scale


def test_int8_keeps_embeddings_norms_and_head_in_fp16():
    config = {"text_config": text(False), "vision_config": VISION, "model_type": "llava"}
    h, i, kv, v = 32, 40, 16, 101  # kv: 2 heads x 8
    layer = (h * h + 2 * h) * 2 + (h * kv + 2 * kv) * 2 + (h * i + 2 * i) * 2 + (i * h + 2 * h) + 2 * h * 2
    got = M.weight_bytes(config, "int8", reduction_layers=[])
    assert got["embed"] == v * h * 2
    assert got["decoder"] == got["decoder.0"] == 4 * layer + h * 2 + v * h * 2  # final norm, lm_head fp16


def test_bad_weights_and_layers():
    config = load_model_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="weights must be one of"):
        M.weight_bytes(config, "int3")
    with pytest.raises(ValueError, match="block_size"):
        M.weight_bytes(config, "int4", block_size=0)
    with pytest.raises(ValueError, match="reduction layers"):
        M.weight_bytes(config, reduction_layers=[32])


# --------------------------------------------------------------------------- KV cache


def test_kv_capacities_shrink_after_each_reduction():
    config = load_model_config("llava-1.5-7b")
    assert plan(config, FiCoCoConfig("l", ratio=0.5), max_seq_len=2048).capacities == (2048,) * 5 + (1760,) * 27
    two = plan(config, FiCoCoConfig("l", ratio=0.5, language_layers=(2, 6)), max_seq_len=2048)
    assert two.language == (Step(2, 576, 432), Step(6, 432, 288))
    assert two.capacities == (2048,) * 3 + (1904,) * 4 + (1760,) * 25
    per_token = 2 * 32 * 128 * 2  # K and V, 32 heads of 128, fp16
    assert M.kv_bytes(two, 2) == per_token * (3 * 2048 + 4 * 1904 + 25 * 1760)
    assert M.kv_bytes(plan(config, None, max_seq_len=2048), 2) == 2**30


def test_the_default_max_seq_len_holds_an_unreduced_image_and_room_to_answer():
    """default_max_seq_len: visual tokens of an unreduced image at the build's grid + 512, up to a multiple of 1024,
    at least 2048 (576 -> 2048; NeXT 2x2: 5 x 576 + 2 = 2882 -> 4096; 1x2: 3 x 576 + 1 = 1729 -> 3072)."""
    assert default_max_seq_len(load_model_config("llava-1.5-7b")) == 2048
    next_7b = load_model_config("llava-v1.6-vicuna-7b")
    assert default_max_seq_len(next_7b) == default_max_seq_len(next_7b, (2, 2)) == 4096
    assert default_max_seq_len(next_7b, (1, 2)) == 3072
    unreduced = plan(next_7b, None, (2, 2), max_seq_len=default_max_seq_len(next_7b))
    assert unreduced.max_seq_len - unreduced.visual_tokens >= 512


def test_kv_uses_kv_heads_and_head_dim():
    config = {"text_config": text(False, head_dim=12), "vision_config": VISION, "model_type": "llava"}
    geometry = config_geometry(config)
    p = assemble("l", geometry, text_geometry(config), None, (), (Step(1, 16, 6),), 100)
    assert p.capacities == (100, 100, 90, 90)
    assert M.kv_bytes(p, 4) == 2 * 2 * 12 * 4 * (2 * 100 + 2 * 90)


def test_kv_rejects_bad_lengths():
    config = load_model_config("llava-1.5-7b")
    with pytest.raises(ValueError, match="max_seq_len"):
        plan(config, FiCoCoConfig("l", ratio=0.5), max_seq_len=288)
    with pytest.raises(ValueError, match="positive integer"):
        plan(config, None, max_seq_len=0)
    with pytest.raises(ValueError, match="outside"):
        assemble("l", config_geometry(config), text_geometry(config), None, (), (Step(40, 576, 288),), 2048)


# --------------------------------------------------------------------------- plan and devices


def test_plan_adds_up_and_splits_the_decoder():
    config = load_model_config("llava-1.5-7b")
    plan = M.plan_memory(config, FiCoCoConfig("l", ratio=0.5), 2048, "fp16")
    assert list(plan.weights) == ["vision", "embed", "decoder.0", "decoder.1"]
    assert plan.language_steps == (Step(4, 576, 288),) and plan.kv_capacities == (2048,) * 5 + (1760,) * 27
    assert plan.total == sum(plan.weights.values()) + plan.kv_bytes + plan.activation_bytes
    # prefill of T = 2048: T (hidden + intermediate) x 2 bytes x 4, one layer's [32, T, T] fp32 scores and fp16
    # probabilities, FiCoCo-L's head-mean [T, T] fp32 map
    assert plan.prompt_len == 2048
    assert plan.activation_bytes == 2048 * (4096 + 11008) * 2 * 4 + 32 * 2048**2 * (4 + 2) + 2048**2 * 4
    short = M.plan_memory(config, FiCoCoConfig("l", ratio=0.5), 2048, "fp16", prompt_len=700)
    assert short.activation_bytes == 700 * (4096 + 11008) * 2 * 4 + 32 * 700**2 * (4 + 2) + 700**2 * 4
    assert short.kv_bytes == plan.kv_bytes and short.total < plan.total
    unreduced = M.plan_memory(config, None, 2048, "fp16")
    assert list(unreduced.weights) == ["vision", "embed", "decoder.0"] and unreduced.kv_bytes == 2**30
    assert unreduced.weight_bytes == plan.weight_bytes
    measured = M.plan_memory(config, None, 2048, engine_memory=123)
    assert (measured.activation_bytes, measured.activation_source) == (123, "TensorRT")


def test_plan_counts_llava_next_crops_and_newlines():
    config = load_model_config("llava-v1.6-vicuna-7b")
    plan = M.plan_memory(config, FiCoCoConfig("v", ratio=0.25), 2048, "int4", grid=(1, 2))
    assert (plan.crops, plan.visual_tokens) == (3, 3 * 144 + 1)
    with pytest.raises(ValueError, match="cannot hold"):
        M.plan_memory(config, None, 2048)  # 5 x 576 + 2 newlines
    with pytest.raises(ValueError, match="kv_dtype"):
        M.plan_memory(config, None, 4096, kv_dtype="fp4")
    with pytest.raises(ValueError, match="prompt_len"):
        M.plan_memory(config, None, 4096, prompt_len=2882)  # no room for text
    with pytest.raises(ValueError, match="prompt_len"):
        M.plan_memory(config, None, 4096, prompt_len=4097)


def test_vision_can_dominate_the_activations():
    """LLaVA-NeXT's 5 crops through CLIP-L (eager attention) outweigh a short prefill."""
    config = load_model_config("llava-v1.6-vicuna-7b")
    plan = M.plan_memory(config, FiCoCoConfig("v", ratio=0.25), 4096, prompt_len=800)
    assert plan.activation_bytes == 5 * 577 * (1024 + 4096) * 2 * 4 + 5 * 16 * 577**2 * (4 + 2)


def test_fits_and_format():
    config = load_model_config("llava-1.5-7b")
    plan = M.plan_memory(config, FiCoCoConfig("v", ratio=0.25), 2048, "int4")
    small = M.Device("small", plan.total + 10, 10, True)
    rows = M.fits(plan, [small, M.Device("tiny", plan.total, 1, False)])
    assert [(free, ok) for _, free, ok in rows] == [(0, True), (-1, False)]
    assert [d.name for d, _, _ in M.fits(plan)] == [d.name for d in M.DEVICES] and len(M.DEVICES) == 6
    lines = M.format_plan(plan)
    assert any(line.startswith("| **total** | ") for line in lines)
    assert sum(line.startswith("| Jetson") or line.startswith("| RTX") for line in lines) == 6
    assert not any("device" in line for line in M.format_plan(plan, devices=()))
    data = M.plan_dict(plan)
    assert data["total"] == plan.total and len(data["devices"]) == 6


def test_tied_plan_names_where_the_table_lives():
    model_config = {"text_config": text(True), "vision_config": VISION, "model_type": "llava",
                    "vision_feature_layer": -2}
    plan = M.plan_memory(model_config, FiCoCoConfig("l", ratio=0.5, language_layers=(1,)), 64)
    assert plan.weights["embed"] == 0
    assert any("tied" in line and "decoder.1" in line for line in M.format_plan(plan))
