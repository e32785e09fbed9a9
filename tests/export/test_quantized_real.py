"""Quantization on real weights (smol-llava-1.5: SmolLM2-135M), against its dequantized fp32 weights.

Slow (three builds of about 2-4 minutes each; run with `-m slow`): the README's agreement table.
int8 round-to-nearest passes its gate; symmetric int4 round-to-nearest (the form TensorRT takes)
changes this small model's answers beyond the int4 gate, and the build refuses it (exit 1, evidence in
NAME.failed/); HQQ's asymmetric int4 (ONNX Runtime only) passes.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from export.build import main

pytestmark = pytest.mark.slow


def build(tmp_path, *flags) -> tuple[int, dict]:
    out = tmp_path / "build"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--model", "smol-llava-1.5", "--variant", "l", "--ratio", "0.5", "--backend", "none",
                     "--out", str(out), *flags])
    where = out if code == 0 else out.with_name("build.failed")
    return code, json.loads((where / "quality.json").read_text())


def test_int8_rtn_passes(tmp_path, smol_dir):
    code, quality = build(tmp_path, "--weights", "int8")
    assert code == 0 and quality["passed"] and quality["agreement"] >= 0.90 and quality["cosine"] >= 0.995


def test_symmetric_int4_rtn_is_refused_with_its_evidence(tmp_path, smol_dir):
    code, quality = build(tmp_path, "--weights", "int4")
    assert code == 1 and not quality["passed"] and quality["agreement"] < quality["gate"]["agreement"]
    assert not (tmp_path / "build").exists()


def test_int4_hqq_passes(tmp_path, smol_dir):
    code, quality = build(tmp_path, "--weights", "int4", "--quant-method", "hqq")
    assert code == 0 and quality["passed"] and quality["agreement"] >= 0.75
