"""runtime.trtlib, the one TensorRT layer of the runtime and the export: the importer's install hints (off and on a
Jetson, for a build's engines and for building them) and the logger (one per module, a sink a build can route,
errors kept). Runs anywhere: TensorRT is made unimportable, or is tests/runtime/fake_tensorrt.py's stand-in.
export.engine's use of the layer, against the real TensorRT-RTX builder, is in tests/export/test_engine.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runtime import errors, trtlib
from runtime.errors import BackendNotInstalledError

from .fake_tensorrt import FakeCuda, Severity, fake_trt_module


def test_import_trt_says_what_to_install_for_a_build_or_for_building(tmp_path: Path, monkeypatch) -> None:
    """Off a Jetson: the extra, and why each module failed. On a Jetson: JetPack's TensorRT; for a build's RTX engines
    the command that recompiles them there, for building engines (no build directory) the backend to build with."""
    for module in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    tegra = tmp_path / "nv_tegra_release"
    monkeypatch.setattr(errors, "TEGRA_RELEASE", tegra)
    with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[rtx\]' \(tensorrt_rtx_bindings: .*; tensorrt_rtx: "):
        trtlib.import_trt("tensorrt-rtx", "/builds/b")
    with pytest.raises(BackendNotInstalledError, match=r"it ships with JetPack; elsewhere pip install 'ficoco-edge\[trt\]'"):
        trtlib.load_flavour("tensorrt")
    with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[trt\].*ficoco-edge\[rtx\]"):
        trtlib.load_flavour("auto")
    tegra.write_text("# R36 (release), REVISION: 4.3\n")
    with pytest.raises(BackendNotInstalledError, match="does not exist on Jetson.*--from-onnx /builds/b --backend tensorrt"):
        trtlib.import_trt("tensorrt-rtx", "/builds/b")
    with pytest.raises(BackendNotInstalledError, match="does not exist on Jetson") as info:
        trtlib.import_trt("tensorrt-rtx")
    assert "--backend tensorrt" in str(info.value) and "--from-onnx" not in str(info.value)
    with pytest.raises(BackendNotInstalledError, match="python3-libnvinfer"):
        trtlib.import_trt("tensorrt")
    with pytest.raises(ValueError, match="'onnxruntime'"):
        trtlib.import_trt("onnxruntime")


def test_one_logger_per_module_warnings_to_its_sink_errors_kept(capsys) -> None:
    """The backend's and the export's logger: one per TensorRT module; warnings and errors to stderr, or to the sink
    a build routes them to (and back after); errors kept, the last one on one line for messages; info dropped."""
    module = fake_trt_module(FakeCuda())
    logger = trtlib.logger(module, "tensorrt")
    assert trtlib.logger(module, "tensorrt") is logger and isinstance(logger, module.ILogger)
    assert trtlib.logger(module, "tensorrt-rtx") is not logger  # tagged with its own flavour
    logger.errors.clear()
    capsys.readouterr()
    logger.log(Severity.ERROR, "cannot\n  deserialize")
    logger.log(Severity.WARNING, "a warning")
    logger.log(Severity.INFO, "chatter")
    assert capsys.readouterr().err == "[tensorrt] cannot\n  deserialize\n[tensorrt] a warning\n"
    assert logger.errors == ["cannot\n  deserialize"] and trtlib.last_error(logger, "none") == "cannot deserialize"
    lines: list[str] = []
    with trtlib.routed(logger, lines.append):
        assert logger.errors == [] and trtlib.last_error(logger, "none") == "none"
        logger.log(Severity.INTERNAL_ERROR, "routed")
    logger.log(Severity.WARNING, "back")
    assert lines == ["[tensorrt] routed"] and capsys.readouterr().err == "[tensorrt] back\n"
