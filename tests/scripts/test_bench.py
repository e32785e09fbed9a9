"""scripts/bench.py --quick, as CI runs it: every section is written with sane figures (never an assertion on speed)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib", reason="scripts/bench.py draws bench.png with matplotlib")

from ficoco import flops as F
from ficoco.config import FiCoCoConfig, ModelGeometry, build_schedule
from scripts import bench

MODE = bench.MODES["quick"]


# bench.py --quick is a 2-minute benchmark run; CI keeps to correctness (run with -m slow).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_build):
    """One --quick run (issue 5: under 5 minutes in CI) over the shared tiny FiCoCo-V build: (out dir, bench.json)."""
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--build", str(small_build), "--out-dir", str(out)]) == 0
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
    assert "quick mode" in text and text.count("PASS") + text.count("FAIL") == 3
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


def test_decode_and_ficoco_ops_figures(quick_run):
    results = quick_run[1]
    rows = results["decode"]["rows"]
    assert [row["cache_length"] for row in rows] == [n for n in MODE.lengths if n < 2048]  # the build holds < max_seq_len
    assert all(positive(row["runtime_ms"]) and positive(row["hf_ms"]) for row in rows)
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
    assert len(targets) == 3 and all(isinstance(t["passed"], bool) and t["measured"] for t in targets)


def test_baseline_build_needs_build(capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--baseline-build", "x"])
    assert error.value.code == 2 and "--baseline-build needs --build" in capsys.readouterr().err
