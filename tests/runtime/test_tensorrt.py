"""The TensorRT backend: for real where a GPU and TensorRT are present, and its bookkeeping everywhere.

`test_tensorrt_engines_on_a_gpu` needs a CUDA device, TensorRT (or TensorRT-RTX) and cuda-python or
torch; it skips elsewhere, naming what is missing. The other tests run `runtime.backend_trt` against
`fake_tensorrt` (ONNX Runtime behind the TensorRT API and numpy behind the CUDA memory), which checks
shapes, per-layer cache lengths, addresses and the ping-pong cache sets, not TensorRT itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import backend as backend_module
from runtime import backend_trt, bench
from runtime.pipeline import Pipeline

from .conftest import PHOTOS
from .fake_tensorrt import FakeCuda, fake_trt_module


def without_engines(build: Path, tmp_path: Path) -> Path:
    """A copy of `build` with no engines (what `--backend none` writes)."""
    copy = tmp_path / "plain"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("*.engine"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engines"], manifest["tensorrt"] = {}, None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def with_engines(build: Path, tmp_path: Path, flavour: str = "tensorrt") -> Path:
    """A copy of `build` whose manifest lists its ONNX graphs as "engines" (what the fake loads)."""
    copy = tmp_path / "with-engines"
    shutil.copytree(build, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engines"] = {g: {k: e[k] for k in ("file", "sha256", "bytes")} for g, e in manifest["graphs"].items()}
    manifest["tensorrt"] = {"flavour": flavour, "version": "fake"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeCuda, object]:
    cuda = FakeCuda()
    module = fake_trt_module(cuda, max_dim=2048)
    monkeypatch.setattr(backend_trt, "import_trt", lambda flavour: module)
    monkeypatch.setattr(backend_trt, "open_cuda", lambda: cuda)
    monkeypatch.setattr(backend_trt, "cuda_devices", lambda: 1)
    return cuda, module


@pytest.mark.parametrize("name", ["1.5-vl", "next-vl"])
def test_backend_bookkeeping_through_a_fake_tensorrt(name: str, fake, build_dir, photo_files, tmp_path: Path) -> None:
    cuda, module = fake
    build = build_dir(name)
    engines = with_engines(build, tmp_path)
    with Pipeline.from_build(build, backend="onnxruntime") as reference, Pipeline.from_build(engines, backend="tensorrt") as pipe:
        assert pipe.backend.name.startswith("tensorrt fake (fake-cuda)")
        generated = []
        for photo in PHOTOS:
            expected = reference(photo_files[photo], "Describe the image.", max_new_tokens=12)
            result = pipe(photo_files[photo], "Describe the image.", max_new_tokens=12)
            assert result.token_ids == expected.token_ids and result.text == expected.text, photo
            assert result.cache_lengths == expected.cache_lengths  # read from get_tensor_shape
            generated.append(result.tokens.generated)
        settings = {"max_new_tokens": 12, "temperature": 1.2, "top_k": 50, "seed": 4}
        sampled = pipe(photo_files["coffee"], "What is this?", **settings)
        assert sampled.token_ids == reference(photo_files["coffee"], "What is this?", **settings).token_ids
        generated.append(sampled.tokens.generated)
        assert [engine.runs for engine in module.engines] == [3, 3, sum(n - 1 for n in generated)]  # vision, prefill, decode
        steps = bench.decode_step_ms(pipe, (1500, 2000), repeats=2, warmup=1)
        assert set(steps) == {1500, 2000} and min(steps.values()) > 0
    assert cuda.blocks == {}, "close() frees every buffer"


def test_cache_sets_alternate_and_capacity_is_checked(fake, build_dir, tmp_path: Path) -> None:
    engines = with_engines(build_dir("1.5-vl"), tmp_path)
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        backend = pipe.backend
        features = backend.vision(np.zeros((1, 3, 336, 336), np.float32))
        logits, cache = backend.prefill(np.array([[1, 5]]), features, np.array([[7, 8, 9]]))
        assert logits.shape == (749,) and cache.index == 0
        assert cache.lengths == pipe.build.cache_lengths(2 + 288 + 3) == (293,) * 5 + (149,) * 3
        _, second = backend.decode(int(logits.argmax()), 293, cache)
        _, third = backend.decode(3, 294, second)
        assert (second.index, third.index) == (1, 0) and third.lengths == tuple(n + 2 for n in cache.lengths)
        with pytest.raises(ValueError, match="below 2048"):
            backend.empty_cache((2048,) * 8)


def test_auto_prefers_tensorrt_only_when_everything_is_there(build_dir, tmp_path: Path, monkeypatch) -> None:
    from runtime.manifest import Build

    plain = Build.from_directory(without_engines(build_dir("1.5-vl"), tmp_path))
    engines = Build.from_directory(with_engines(build_dir("1.5-vl"), tmp_path))
    monkeypatch.setattr(backend_module, "has_module", lambda name: True)
    monkeypatch.setattr(backend_module, "cuda_devices", lambda: 1)
    assert backend_module.resolve("auto", engines) == "tensorrt"
    assert backend_module.resolve("auto", plain) == "onnxruntime"  # no engines in the build
    monkeypatch.setattr(backend_module, "cuda_devices", lambda: 0)
    assert backend_module.resolve("auto", engines) == "onnxruntime"  # no GPU
    monkeypatch.setattr(backend_module, "cuda_devices", lambda: 1)
    monkeypatch.setattr(backend_module, "has_module", lambda name: name not in ("tensorrt",))
    assert backend_module.resolve("auto", engines) == "onnxruntime"  # the engines' flavour is not installed


def _gpu_skip_reason() -> str | None:
    has = backend_module.has_module
    missing = []
    if not (has("tensorrt") or has("tensorrt_rtx_bindings") or has("tensorrt_rtx")):
        missing.append("TensorRT or TensorRT-RTX")
    if backend_module.cuda_devices() < 1:
        missing.append("a CUDA device")
    if not (has("cuda.bindings") or has("cuda.cudart") or has("torch")):
        missing.append("cuda-python or torch")
    return f"needs {', '.join(missing)}" if missing else None


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_tensorrt_engines_on_a_gpu(build_dir, photo_files, tmp_path: Path) -> None:
    """Compile the engines of a copy of a build on this GPU, then compare with ONNX Runtime (fp32; TF32 may differ slightly)."""
    from export.build import main

    copy = tmp_path / "gpu-build"
    shutil.copytree(build_dir("1.5-vl"), copy)
    with contextlib.redirect_stdout(io.StringIO()) as log:
        assert main(["--from-onnx", str(copy), "--backend", "auto"]) == 0, log.getvalue()
    reference = Pipeline.from_build(build_dir("1.5-vl"), backend="onnxruntime")
    with reference, Pipeline.from_build(copy, backend="tensorrt") as pipe:
        assert pipe.backend.name.startswith("tensorrt")
        for photo in PHOTOS:
            expected = reference(photo_files[photo], "Describe the image.", max_new_tokens=16)
            result = pipe(photo_files[photo], "Describe the image.", max_new_tokens=16)
            assert result.cache_lengths == expected.cache_lengths
            assert result.token_ids[:4] == expected.token_ids[:4], (result.token_ids, expected.token_ids)
        steps = bench.decode_step_ms(pipe, (400, 1000))
        assert set(steps) == {400, 1000}
