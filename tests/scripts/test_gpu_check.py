"""scripts/gpu_check.py: its report, run against the fake TensorRT (no GPU here) and ONNX Runtime on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import backend as backend_module
from scripts import gpu_check
from tests.runtime.fake_tensorrt import FakeCuda, fake_trt_module
from tests.runtime.test_tensorrt import install, with_engines


def test_report_compares_tensorrt_and_onnxruntime_with_the_cpu(build_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_trt_module(cuda))
    engines = with_engines(build_dir("1.5-v"), tmp_path)
    report_file = tmp_path / "report.json"
    assert gpu_check.main(["--engine-dir", str(engines), "--max-new-tokens", "6", "--json", str(report_file)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert report["tensorrt_engines"] == "the build's engines"
    rows = report["backends"]
    assert set(rows) == {"onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"}
    assert "CUDAExecutionProvider" in rows["onnxruntime-cuda"]["skipped"]  # CPU-only onnxruntime here
    for kind in ("onnxruntime-cpu", "tensorrt"):  # the fake runs the same graphs: parity is exact
        parity = rows[kind]["parity"]
        assert parity["features_cosine"] == pytest.approx(1.0, abs=1e-6), kind
        assert parity["kept_overlap"] == 1.0 and parity["token_agreement"] == 1.0 and parity["tokens_identical"], kind
        assert set(rows[kind]["timings"]) == {"vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"}
    assert rows["tensorrt"]["backend"].startswith("tensorrt 10.3.0") and rows["onnxruntime-cpu"]["backend"].startswith("onnxruntime")
    table = out.split("\n{")[0]
    assert "onnxruntime-cuda  skipped:" in table and table.count("1.000000") == 2


def test_engines_that_do_not_fit_are_compiled_for_this_gpu(build_dir, tmp_path: Path, monkeypatch) -> None:
    """Engines for another TensorRT version: gpu_check compiles a copy with --from-onnx (the export CLI, recorded here)."""
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_trt_module(cuda, version="10.4.0"))  # the build's engines say 10.3.0
    engines = with_engines(build_dir("1.5-v"), tmp_path)
    calls = []
    monkeypatch.setattr("export.build.main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(backend_module, "has_module", lambda name: name == "tensorrt")
    directory, how = gpu_check.engines_for_this_gpu(engines, rebuild=False, work=tmp_path / "work")
    assert directory == tmp_path / "work" / engines.name and (directory / "manifest.json").is_file()
    assert calls == [["--from-onnx", str(directory), "--backend", "tensorrt"]] and "compiled here" in how
    monkeypatch.setattr(backend_module.device, "driver", lambda: None)  # no GPU: nothing to compile for
    directory, how = gpu_check.engines_for_this_gpu(engines, rebuild=False, work=tmp_path / "work2")
    assert directory is None and "no CUDA device" in how
