"""scripts/bench.py --quick, as CI runs it: every section is written with sane figures (never an assertion on speed)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib", reason="scripts/bench.py draws bench.png with matplotlib")

from ficoco.analysis import flops as F
from ficoco.config import FiCoCoConfig, ModelGeometry, build_schedule
from runtime.manifest import Build
from scripts import bench

MODE = bench.MODES["quick"]


# bench.py --quick is a 2-minute benchmark run; CI keeps to correctness (run with -m slow).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_build, small_source):
    """One --quick run (issue 5: under 5 minutes in CI) over the shared tiny FiCoCo-V build: (out dir, bench.json)."""
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--build", str(small_build), "--model", str(small_source), "--out-dir", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def geometry(model: dict) -> ModelGeometry:
    v = model["vision"]
    side = v["image_size"] // v["patch_size"]
    return ModelGeometry((side, side), v["num_hidden_layers"], v["num_hidden_layers"] - 2, model["text"]["num_hidden_layers"])


def test_writes_markdown_json_png_and_log(quick_run):
    out, results = quick_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "bench.png").stat().st_size > 10_000
    assert (out / "bench.log").is_file()
    text = (out / "bench.md").read_text()
    for heading in ("## 1. Vision encoder", "## 2. LLM prefill", "## 3. Decode step", "## 4. FiCoCo operations",
                    "## 5. Hugging Face eager vs the runtime", "## Targets"):
        assert heading in text
    assert "quick mode" in text and text.count("PASS") + text.count("FAIL") == 4
    assert set(results) >= {"machine", "settings", "vision", "prefill", "decode", "ficoco_ops", "chat", "targets", "duration_s"}


def test_machine_and_settings_are_recorded(quick_run):
    _, results = quick_run
    machine, settings = results["machine"], results["settings"]
    assert machine["cpu"] and machine["cores"] >= 1 and positive(machine["ram_gb"]) and machine["date"]
    assert machine["torch"] and machine["onnxruntime"] and machine["transformers"]
    assert settings["name"] == "quick" and settings["ort_session"]["intra_op_num_threads"] == settings["threads"] >= 1
    assert settings["repeats"] == MODE.repeats


def test_vision_rows_follow_the_schedule_and_ficoco_flops(quick_run):
    vision = quick_run[1]["vision"]
    model = F.vision_of(vision["model"]["vision"])
    geo = geometry(vision["model"])
    full = F.vision_flops(model, 1, geo.patches, {}, geo.feature_layer)
    assert [row["ratio"] for row in vision["rows"]] == list(MODE.ratios)
    for row in vision["rows"]:
        schedule = build_schedule(FiCoCoConfig("v", ratio=row["ratio"]), geo).vision
        assert row["vision"] == [[s.layer, s.tokens_in, s.tokens_out] for s in schedule]
        assert row["kept_per_crop"] == (schedule[-1].tokens_out if schedule else geo.patches)
        reduced = F.vision_flops(model, 1, geo.patches, {s.layer: s.tokens_out for s in schedule}, geo.feature_layer)
        assert row["flops_ratio"] == pytest.approx(reduced / full) and row["flops_speedup"] == pytest.approx(full / reduced)
        assert positive(row["ms"]) and positive(row["speedup"]) and len(row["samples_ms"]) == MODE.repeats
    assert vision["rows"][0]["speedup"] == 1.0 and vision["rows"][-1]["flops_ratio"] < 1.0


def test_prefill_rows_follow_the_schedule_and_ficoco_flops(quick_run):
    prefill = quick_run[1]["prefill"]
    text, geo = F.text_of(prefill["model"]["text"]), ModelGeometry((24, 24), 24, 22, prefill["model"]["text"]["num_hidden_layers"])
    tokens = prefill["text_tokens"]
    assert tokens == F.TEXT_TOKENS
    full = F.prefill_flops(text, tokens, geo.patches, {})
    expected = [("none", 1.0)] + [(v, r) for r in MODE.prefill_ratios for v in ("v", "l")]
    assert [(row["variant"], row["ratio"]) for row in prefill["rows"]] == expected
    for row in prefill["rows"]:
        schedule = build_schedule(FiCoCoConfig("v" if row["variant"] == "none" else row["variant"], ratio=row["ratio"]), geo)
        visual = schedule.vision[-1].tokens_out if schedule.vision else geo.patches
        assert row["visual_tokens"] == visual
        assert row["language"] == [[s.layer, s.tokens_in, s.tokens_out] for s in schedule.language]
        reduced = F.prefill_flops(text, tokens, visual, {s.layer: s.tokens_out for s in schedule.language})
        assert row["flops_ratio"] == pytest.approx(reduced / full) and positive(row["ms"]) and positive(row["speedup"])
    assert [row["language"][0][0] for row in prefill["rows"] if row["variant"] == "l"] == [4] * len(MODE.prefill_ratios)
    for row in prefill["rows"]:  # the build layout: FiCoCo-L splits the decoder at its layer
        assert row["graphs"] == (["decoder.0", "reduce.1", "decoder.1"] if row["variant"] == "l" else ["decoder.0"])


def test_decode_and_ficoco_ops_figures(quick_run, small_build):
    results = quick_run[1]
    decode = results["decode"]
    rows = decode["rows"]
    assert [row["cache_length"] for row in rows] == [n for n in MODE.lengths if n < 2048]  # the build holds < max_seq_len
    assert all(positive(row["runtime_ms"]) and positive(row["hf_ms"]) for row in rows)
    plan = Build.from_directory(small_build).plan
    text, max_seq_len = plan.text, plan.max_seq_len
    row_bytes = 2 * text.layers * text.kv_heads * text.head_dim * 4  # K and V, fp32, every layer (no FiCoCo-L)
    assert decode["max_seq_len"] == max_seq_len and decode["cache_bytes"] == row_bytes * max_seq_len  # one copy, at capacity
    assert decode["cache_bytes_before_at_max"] == 2 * decode["cache_bytes"]  # before: past and present
    assert [row["cache_bytes_before"] for row in rows] == [2 * row_bytes * row["cache_length"] for row in rows]
    ops = results["ficoco_ops"]
    schedule = build_schedule(FiCoCoConfig("v", ratio=ops["ratio"]), geometry(results["vision"]["model"])).vision
    assert [(s["layer"], s["tokens_in"], s["tokens_out"]) for s in ops["steps"]] == [(s.layer, s.tokens_in, s.tokens_out) for s in schedule]
    assert all(positive(s["ms"]) for s in ops["steps"]) and positive(ops["encoder"]["ms"]) and positive(ops["layer"]["ms"])
    assert ops["steps_ms"] == pytest.approx(sum(s["ms"] for s in ops["steps"]))
    assert ops["share_of_encoder"] == pytest.approx(ops["steps_ms"] / ops["encoder"]["ms"])


def test_chat_rows_and_targets(quick_run):
    results = quick_run[1]
    rows = results["chat"]["rows"]
    assert [(row["system"].split()[0], row["setting"] == "unreduced") for row in rows] == [
        ("Hugging", True), ("Hugging", False), ("runtime", False)]
    for row in rows:
        assert positive(row["ttft_ms"]) and len(row["samples"]) == MODE.repeats
        assert row.get("decode_tokens_per_s") is None or positive(row["decode_tokens_per_s"])
    assert rows[-1]["same_tokens_as_hf"]  # the runtime answers exactly as the FiCoCo-patched HF model
    assert positive(rows[-1]["vision_ms"]) and positive(rows[-1]["prefill_ms"])
    targets = results["targets"]
    assert len(targets) == 4 and all(isinstance(t["passed"], bool) and t["measured"] for t in targets)
    low, high = min(r["cache_length"] for r in results["decode"]["rows"]), max(r["cache_length"] for r in results["decode"]["rows"])
    assert f"step({high}) / step({low})" in targets[-1]["measured"] and "before" not in targets[-1]["measured"]  # quick: no BEFORE


def test_sections_merge_into_an_existing_run(quick_run, small_build, small_source, tmp_path):
    """--sections decode re-measures that section only; the others' figures stay as they were."""
    out, first = quick_run
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    (merged_dir / "bench.json").write_text(json.dumps(first))
    assert bench.main(["--quick", "--sections", "decode", "--build", str(small_build), "--model", str(small_source),
                       "--out-dir", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "bench.json").read_text())
    for key in ("vision", "prefill", "ficoco_ops", "chat", "machine", "settings", "duration_s"):
        assert merged[key] == first[key], key
    assert merged["decode"] != first["decode"] and [r["cache_length"] for r in merged["decode"]["rows"]] == [
        r["cache_length"] for r in first["decode"]["rows"]]
    assert merged["runs"]["decode"]["date"] != first["machine"]["date"] and merged["complete"]
    text = (merged_dir / "bench.md").read_text()
    assert "Measured by a later run (`--sections`)" in text and text.count("PASS") + text.count("FAIL") == 4
    smoke = ["--smoke", "--sections", "decode", "--build", str(small_build), "--model", str(small_source), "--out-dir", str(merged_dir)]
    assert bench.main(smoke) == 2  # a quick-mode bench.json takes quick-mode sections only


def test_prefill_step_runs_as_the_torch_reference(tmp_path):
    """bench_models.prefill_step (the runtime's OrtBackend through runtime.chain: decoder.0, reduce.1, decoder.1)
    gives the logits and the cache rows of the patched model's own prefill (export.trace.graphs.PrefillReference)."""
    import numpy as np
    import torch

    from scripts import bench_models as M

    model = M.random_llava(M.TINY_CLIP, M.SMOKE_TEXT)
    build = M.export_prefill(model, "l", 0.25, tmp_path, 5, 55)
    assert build.graph_names == ["vision", "embed", "decoder.0", "reduce.1", "decoder.1"]
    assert (build.plan.language[0].layer, build.plan.language[0].tokens_in) == (4, 576)
    before, features, after = M.prefill_inputs(model, build.plan.visual_tokens, 5, 55)
    prefill = M.prefill_step(build, {"before": before.numpy(), "features": features.numpy(), "after": after.numpy()}, 1)
    logits = prefill()
    with torch.no_grad():
        reference = M.graph_set(model, "l", 0.25).prefill(before, features, after)
    assert np.abs(logits - reference[0].numpy()[0]).max() < 1e-4
    cache = prefill.backend.cache
    for layer in range(build.layers):
        key = reference[1 + 2 * layer].numpy()
        assert cache.lengths[layer] == key.shape[2]
        assert np.abs(cache.keys[layer][:, :, :key.shape[2]] - key).max() < 1e-4, layer


def test_baseline_build_needs_build(capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--baseline-build", "x"])
    assert error.value.code == 2 and "--baseline-build needs --build" in capsys.readouterr().err
