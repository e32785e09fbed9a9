"""TensorRT object lifetimes the bindings leave to the caller, against the strict fake (tests/runtime/fake_tensorrt.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from runtime import backend_trt
from runtime.errors import BackendError
from runtime.pipeline import Pipeline

from .fake_tensorrt import FakeCuda, fake_trt_module
from .test_tensorrt import install, with_engines


def test_the_rtx_runtime_config_lives_as_long_as_its_context(build_dir, photo_files, tmp_path: Path, monkeypatch) -> None:
    """The bindings keep a context's engine alive but not its IRuntimeConfig, and neither does the strict fake: the
    backend keeps each config while its context lives; one that drops it fails at its first run."""
    monkeypatch.setenv("FICOCO_CACHE", str(tmp_path / "user-cache"))
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_trt_module(cuda, version="1.7.1", rtx=True))
    engines = with_engines(build_dir("1.5-l"), tmp_path, flavour="tensorrt-rtx")
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        gc.collect()
        assert all(engine.context._runtime_config is engine.config is not None for engine in pipe.backend.engines.values())
        assert pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=2).tokens.generated >= 1
    keeping = backend_trt._Engine.__init__

    def dropping(self, *args, **kwargs):  # broken: the config is a local, as before the fix
        keeping(self, *args, **kwargs)
        self.config = None

    monkeypatch.setattr(backend_trt._Engine, "__init__", dropping)
    with Pipeline.from_build(engines, backend="tensorrt") as pipe, pytest.raises(BackendError, match="IRuntimeConfig"):
        gc.collect()
        pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=2)
