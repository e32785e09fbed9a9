"""scripts/bench_weights.py --smoke: every file and table row is written (never an assertion on speed or size targets)."""

from __future__ import annotations

import json
import math

import pytest

from scripts import bench_weights

# four tiny builds (with TensorRT-RTX engines when installed): about 4 minutes on 2 cores; run with -m slow.
pytestmark = pytest.mark.slow


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    assert bench_weights.main(["--smoke", "--out-dir", str(out)]) == 0
    return out, json.loads((out / "weights.json").read_text())


def test_files_and_table_rows(smoke_run):
    out, results = smoke_run
    assert (out / "weights.log").is_file()
    text = (out / "weights.md").read_text()
    for heading in ("## 1-2. Bytes on disk", "## Targets", "## 3. Memory plan", "## Machine and commands"):
        assert heading in text
    for fmt in bench_weights.FORMATS:
        assert f"\n| {fmt} | " in text
        assert f"--weights {fmt} " in text  # the exact export.build command
    assert "python scripts/bench_weights.py --smoke" in text and "Smoke mode" in text
    assert text.count("PASS") + text.count("FAIL") == len(results["targets"]) == 2
    assert set(results) >= {"machine", "settings", "formats", "ratios", "targets", "memory", "load_average_end", "duration_s"}


def test_format_figures(smoke_run):
    _, results = smoke_run
    rows = {r["format"]: r for r in results["formats"]}
    assert list(rows) == list(bench_weights.FORMATS)
    for fmt, row in rows.items():
        assert positive(row["bytes"]["llm"]) and positive(row["bytes"]["vision"]) and set(row["bytes"]["llm_graphs"]) == {"decoder.0"}
        assert positive(row["generation"]["ttft_ms"]) and positive(row["generation"]["decode_tokens_per_s"])
        assert len(row["generation"]["samples"]) == 1 and len(row["generation"]["token_ids"]) == 8
        assert ("fusion" in row) == (fmt in ("int8", "int4"))
        assert ("engines" in row["bytes"]) == results["settings"]["engines"]
    assert rows["int4"]["bytes"]["llm"] < rows["fp16"]["bytes"]["llm"] < rows["fp32"]["bytes"]["llm"]
    assert rows["int4"]["fusion"]["decoder.0"]["after"]["MatMulNBits"] > 0  # ORT fuses the QDQ pairs at load
    assert set(results["ratios"]) >= {"llm_int4_over_fp16", "llm_int8_over_fp16", "decode_int4_over_fp32"}
    assert results["machine"]["load_average_start"] and results["load_average_end"]


def test_memory_plan_of_the_7b_on_the_nano(smoke_run):
    memory = smoke_run[1]["memory"]
    assert memory["device"]["name"] == bench_weights.NANO and memory["device"]["system_reserve"] > 0
    int4 = [r for r in memory["rows"] if r["label"].startswith("int4 (")]
    assert [r["max_seq_len"] for r in int4][0] == 2048 and not int4[0]["fits"]  # 2048 does not fit the Nano
    fit = int4[0]["largest_fitting"]
    assert fit and fit < 2048 and int4[-1]["max_seq_len"] == fit and int4[-1]["fits"]
    assert not next(r for r in memory["rows"] if r["label"] == "fp16")["fits"]
