"""scripts/flops.py: the paper's vanilla figures, the budget search, and the ONNX cross-check."""

from __future__ import annotations

import json

import pytest

from scripts import flops

PAPER_VANILLA = {"llava-1.5-7b": 8.5, "llava-1.5-13b": 24.9, "llava-v1.6-vicuna-7b": 42.7}


def tflops(model: str, variant: str = "none", tokens: int | None = None) -> float:
    return flops.count(flops.load_model_config(model), variant, tokens).prefill / 1e12


# --------------------------------------------------------------------------- paper figures


def test_shipped_configs_are_hugging_face_shaped():
    assert flops.shipped_models() == sorted(PAPER_VANILLA)
    for name, paper in PAPER_VANILLA.items():
        config = flops.load_model_config(name)
        assert config["ficoco_paper"]["vanilla_tflops"] == paper
        assert flops.F.text_of(config["text_config"]).layers in (32, 40)
        assert flops.F.vision_of(config["vision_config"]).layers == 24
        assert flops.config_geometry(config).patches == 576 and flops.config_geometry(config).feature_layer == 22


@pytest.mark.parametrize("model", ["llava-1.5-7b", "llava-v1.6-vicuna-7b"])
def test_vanilla_prefill_reproduces_the_paper(model):
    assert tflops(model) == pytest.approx(PAPER_VANILLA[model], rel=0.05)


def test_llava_1_5_7b_is_8_45_tflops_with_576_visual_and_60_text_tokens():
    count = flops.count(flops.load_model_config("llava-1.5-7b"))
    assert (count.crops, count.visual_tokens) == (1, 576)
    assert count.prefill / 1e12 == pytest.approx(8.45, abs=0.005)


def test_llava_next_counts_five_crops_of_576_tokens_and_the_newlines():
    """As a build lays them out (and its manifest counts them): 2x2 grid + base crop, one image_newline per grid row."""
    config = flops.load_model_config("llava-v1.6-vicuna-7b")
    count = flops.count(config)
    assert (count.crops, count.visual_tokens) == (5, 5 * 576 + 2)
    text = flops.F.text_of(config["text_config"])
    assert count.prefill == flops.F.prefill_flops(text, 60, 2882, {})
    assert count.prefill / 1e12 == pytest.approx(42.64, abs=0.005)
    three = flops.count(config, grid=(1, 2))
    assert (three.crops, three.visual_tokens) == (3, 3 * 576 + 1)


def test_llava_1_5_13b_follows_the_shapes():
    """Vicuna-13B's widths give 16.47 TFLOPs: 1.95x the 7B, as its per-token cost (5120/4096)^2 * 40/32 says."""
    assert tflops("llava-1.5-13b") == pytest.approx(16.47, abs=0.01)
    assert tflops("llava-1.5-13b") / tflops("llava-1.5-7b") == pytest.approx(1.95, abs=0.01)


@pytest.mark.xfail(strict=True, reason="the paper's 24.9 TFLOPs for LLaVA-1.5-13B is 2.93x its 7B figure; no per-token "
                   "convention that gives 8.5 for 7B and 42.7 for NeXT-7B gives it (ours: 16.47)")
def test_llava_1_5_13b_paper_figure():
    assert tflops("llava-1.5-13b") == pytest.approx(PAPER_VANILLA["llava-1.5-13b"], rel=0.05)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget, low, high", [(3.3, 185, 200), (2.4, 115, 135), (1.5, 48, 64)])
def test_paper_budgets_map_to_about_192_128_64_tokens(budget, low, high):
    config = flops.load_model_config("llava-1.5-7b")
    tokens = flops.tokens_for_budget(config, budget, "v")
    assert low <= tokens <= high
    assert tflops("llava-1.5-7b", "v", tokens) <= budget < tflops("llava-1.5-7b", "v", tokens + 1)


@pytest.mark.parametrize("variant", ["v", "l", "vl"])
def test_budget_search_is_monotone(variant):
    config = flops.load_model_config("llava-1.5-7b")
    found = [flops.tokens_for_budget(config, budget, variant) for budget in (2.8, 3.3, 4.5, 6.0, 8.0)]
    assert found == sorted(found) and found[0] < found[-1]
    assert flops.tokens_for_budget(config, 9.0, variant) == 576  # the unreduced model fits


def test_ficoco_l_cannot_reach_1_5_tflops_and_says_so():
    with pytest.raises(ValueError, match="no FiCoCo-L schedule fits 1.5 TFLOPs"):
        flops.tokens_for_budget(flops.load_model_config("llava-1.5-7b"), 1.5, "l")


def test_llava_next_budget_is_per_crop_and_counts_the_newlines():
    """2.9 TFLOPs: 31 tokens per crop, 5 x 31 + 2 newlines = 157 visual tokens (32 per crop, 162, does not fit)."""
    config = flops.load_model_config("llava-v1.6-vicuna-7b")
    text = flops.F.text_of(config["text_config"])
    assert flops.tokens_for_budget(config, 2.9, "v") == 31
    assert flops.F.prefill_flops(text, 60, 5 * 31 + 2, {}) <= 2.9e12 < flops.F.prefill_flops(text, 60, 5 * 32 + 2, {})


def test_vl_schedule_matches_ficoco_config():
    count = flops.count(flops.load_model_config("llava-1.5-7b"), "vl", 144)
    assert count.schedule.vision[-1].tokens_out == 288 and count.visual_tokens == 288
    assert [(s.layer, s.tokens_out) for s in count.schedule.language] == [(4, 144)]


def test_real_checkpoint_config_with_default_widths(tmp_path):
    """llava-hf's config.json leaves Llama's widths to the defaults; they are filled in."""
    shipped = flops.load_model_config("llava-1.5-7b")
    sparse = {k: v for k, v in shipped.items() if k != "ficoco_paper"}
    sparse["text_config"] = {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(sparse))
    loaded = flops.load_model_config(tmp_path)
    assert flops.count(loaded).prefill == flops.count(shipped).prefill


def test_cli_prints_vanilla_budgets_and_schedule(capsys):
    assert flops.main(["--model", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "convention:" in out and "vanilla prefill 8.45 TFLOPs (paper 8.5" in out
    assert "paper budget 1.5 TFLOPs -> tokens per crop: V 55" in out
    assert flops.main(["--model", "llava-1.5-7b", "--tflops", "3.3"]) == 0
    out = capsys.readouterr().out
    assert "keep 192 of 576 tokens per crop" in out and "schedule: vision [(12, 576," in out
    assert flops.main(["--model", "no-such-model"]) == 2


# --------------------------------------------------------------------------- ONNX cross-check


def test_onnx_graphs_agree_with_the_analytic_count(small_build, small_source):
    """vision.onnx / decoder.0.onnx MatMul+Gemm FLOPs vs ficoco.analysis.flops: within 1%, and the rest fully explained."""
    rows = {row.graph: row for row in flops.cross_check(small_build, model=small_source)}
    vision, prefill = rows["vision"], rows["prefill"]
    assert abs(vision.relative) < 0.01 and abs(prefill.relative) < 0.001
    for row in rows.values():
        assert abs(row.unexplained) <= 1e-9 * row.analytic, (row.graph, row.terms, row.unexplained)
    assert set(prefill.terms) == {"LM head on the last position"}
    assert list(prefill.graphs) == ["decoder.0"] and prefill.onnx == prefill.graphs["decoder.0"]  # no FiCoCo-L: one segment
    assert vision.conv > 0  # the patch embedding, outside the convention


def test_onnx_cross_check_follows_the_text_length(small_build, small_source):
    short, long = (flops.cross_check(small_build, 2, a, model=small_source)[1] for a in (3, 40))
    assert long.onnx > short.onnx
    for row in (short, long):
        assert abs(row.unexplained) <= 1e-9 * row.analytic


def test_prefill_dims_follow_the_segments():
    """decoder.s runs on the prompt less what s FiCoCo-L steps removed, over empty past buffers."""
    from ficoco.config import ModelGeometry, Step
    from ficoco.geometry import TextGeometry
    from ficoco.plan import assemble

    plan = assemble("v", ModelGeometry((24, 24), 24, 22, 12), TextGeometry(12, 64, 4, 4, 16, 100), None,
                    (Step(22, 576, 290),), (Step(4, 290, 200), Step(8, 200, 100)), 2048)
    assert flops.prefill_dims(plan, 5, 55) == {
        "decoder.0": {"tokens": 350, "capacity": 0}, "reduce.1": {"tokens": 350, "text_before": 5},
        "decoder.1": {"tokens": 260, "capacity": 0}, "reduce.2": {"tokens": 260, "text_before": 5},
        "decoder.2": {"tokens": 160, "capacity": 0}}


def test_llava_next_ficoco_l_chain_agrees_with_the_analytic_count(build_dir, preset_dirs):
    """LLaVA-NeXT FiCoCo-VL: decoder.0 + reduce.1 + decoder.1 (newline tokens in the visual span) against
    ficoco.analysis.flops, every difference itemised; and the manifest's FLOPs are the script's count."""
    build, source = build_dir("next-vl"), preset_dirs["tiny-llava-next"]
    manifest = json.loads((build / "manifest.json").read_text())
    schedule = manifest["schedule"]
    assert schedule["newline_rows"] > 0 and schedule["language"]
    rows = {row.graph: row for row in flops.cross_check(build, model=source)}
    prefill = rows["prefill"]
    assert list(prefill.graphs) == ["decoder.0", "reduce.1", "decoder.1"]
    assert prefill.graphs["reduce.1"] > 0  # FiCoCo-L's own products: in the graph, not in the convention
    assert "FiCoCo-L merges (alpha^T X_S)" in prefill.terms
    for row in rows.values():
        assert abs(row.unexplained) <= 1e-9 * row.analytic, (row.graph, row.terms, row.unexplained)
    config = flops.load_model_config(source)
    tokens = round(manifest["ficoco"]["ratio"] * schedule["patches_per_crop"])
    count = flops.count(config, "vl", tokens, grid=tuple(schedule["grid"]))
    counted = json.loads(json.dumps(count.plan.to_dict()))
    cache = ("max_seq_len", "segments")  # FLOPs do not depend on the cache: the counted plan holds any prompt
    assert {k: v for k, v in counted.items() if k not in cache} == {k: v for k, v in schedule.items() if k not in cache}
    assert count.visual_tokens == schedule["visual_tokens"]
    assert manifest["flops"]["tflops"]["prefill"] == pytest.approx(count.prefill / 1e12, rel=1e-12)
    assert manifest["flops"]["tflops"]["vision"] == pytest.approx(count.vision / 1e12, rel=1e-12)


def test_manifest_flops_match_the_script(small_build, small_source):
    manifest = json.loads((small_build / "manifest.json").read_text())
    config = flops.load_model_config(small_source)
    count = flops.count(config, "v", manifest["schedule"]["kept_per_crop"])
    assert count.schedule.vision_tokens == {layer: out for layer, _, out in manifest["schedule"]["vision"]}
    assert manifest["flops"]["tflops"]["prefill"] == pytest.approx(count.prefill / 1e12, rel=1e-12)
    assert manifest["flops"]["tflops"]["vision"] == pytest.approx(count.vision / 1e12, rel=1e-12)


def test_unbound_dynamic_dims_are_an_error(small_build):
    with pytest.raises(ValueError, match="tokens"):
        flops.graph_flops(small_build / "decoder.0.onnx", {"capacity": 0})
