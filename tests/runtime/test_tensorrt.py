"""The TensorRT backend: for real where a GPU and TensorRT are present, and against a strict fake everywhere.

`test_tensorrt_engines_on_a_gpu` needs a CUDA device, TensorRT (or TensorRT-RTX) and cuda-python or a
CUDA build of torch; it skips elsewhere, naming what is missing. The other tests run `runtime.backend_trt`
against `fake_tensorrt` (ONNX Runtime behind the TensorRT API, numpy behind the CUDA memory), whose
strictness is itself tested: `test_the_fake_catches_a_broken_backend` runs deliberately broken copies
of the backend, one per kind of strictness, and each must be caught. Device selection (`auto`), the
checks of engines against the device, the Jetson hints and the CUDA-bindings/driver check run with
stand-ins for the driver.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export.from_onnx import engine_profiles, optimum_shapes
from runtime import backend as backend_module
from runtime import backend_trt, bench, cuda as cuda_module, device, errors, names
from runtime.backend import BackendError, BackendNotInstalledError, EngineMismatchError
from runtime.device import Driver
from runtime.manifest import Build, BuildError, sha256_file
from runtime.pipeline import Pipeline

from .conftest import PHOTOS, tree_digest
from .fake_tensorrt import FakeCuda, Strategy, fake_trt_module, serialize_engine

VERSIONS = {"tensorrt": "10.3.0", "tensorrt-rtx": "1.7.1"}
LONG_PROMPT = "Describe the image in detail, naming every object, its colour, its position and what it is used for."


def without_engines(build: Path, tmp_path: Path) -> Path:
    """A copy of `build` with no engines (what `--backend none` writes)."""
    copy = tmp_path / "plain"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("*.engine"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engines"], manifest["tensorrt"] = {}, None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def io_dtypes(manifest: dict, floats: str, ints: str) -> dict[str, str]:
    """Engine I/O types for every tensor of the build's graphs: float tensors as `floats`, int64 ones as `ints`."""
    kinds = {"float32": floats, "int64": ints}
    return {t["name"]: kinds[t["dtype"]] for g in manifest["graphs"].values() for t in [*g["inputs"], *g["outputs"]]}


def with_engines(build: Path, tmp_path: Path, flavour: str = "tensorrt", cc: str = "8.6", dtypes: dict | None = None,
                 text_max: int | None = None, device_memory: int = 1 << 20, header_version: str | None = None) -> Path:
    """A copy of `build` with fake engines: each graph's ONNX behind a header with the export's own profiles."""
    copy = tmp_path / f"engines-{flavour}"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("*.engine"))
    manifest = json.loads((copy / "manifest.json").read_text())
    version, engines = VERSIONS[flavour], {}
    for graph, entry in manifest["graphs"].items():
        profiles = engine_profiles(entry, manifest["max_seq_len"], optimum_shapes(manifest))
        if text_max is not None and graph == names.PREFILL:
            profiles = {k: (p[0], p[0], (1, text_max)) if k.startswith("input_ids") else p for k, p in profiles.items()}
        data = serialize_engine((copy / entry["file"]).read_bytes(), version=header_version or version,
                                compute_capabilities=[cc], profiles=profiles, dtypes=dtypes, device_memory=device_memory)
        (copy / f"{graph}.engine").write_bytes(data)
        engines[graph] = {"file": f"{graph}.engine", "sha256": sha256_file(copy / f"{graph}.engine"), "bytes": len(data)}
    manifest["engines"] = engines
    manifest["tensorrt"] = {"flavour": flavour, "version": version, "compute_capabilities": [cc]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def install(monkeypatch: pytest.MonkeyPatch, cuda: FakeCuda, module: SimpleNamespace) -> None:
    """The fake as what runtime.backend finds: TensorRT importable, a driver with one GPU, an allocator."""
    monkeypatch.setattr(backend_trt, "import_trt", lambda flavour, directory=".": module)
    monkeypatch.setattr(backend_trt, "open_cuda", cuda.open)
    monkeypatch.setattr(device, "driver", lambda: Driver(13000, 1, cuda.compute_capability))
    monkeypatch.setattr(backend_module, "cuda_allocator", lambda: True)
    monkeypatch.setattr(backend_module, "has_module", lambda name: True)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[FakeCuda, SimpleNamespace]:
    monkeypatch.setenv("FICOCO_CACHE", str(tmp_path / "user-cache"))
    cuda = FakeCuda()
    module = fake_trt_module(cuda)
    install(monkeypatch, cuda, module)
    return cuda, module


@pytest.mark.parametrize("name", ["1.5-vl", "next-vl"])
def test_backend_bookkeeping_through_a_fake_tensorrt(name: str, fake, build_dir, photo_files, tmp_path: Path) -> None:
    cuda, module = fake
    build = build_dir(name)
    engines = with_engines(build, tmp_path)
    with Pipeline.from_build(build, backend="onnxruntime") as reference, Pipeline.from_build(engines, backend="tensorrt") as pipe:
        assert pipe.backend.name.startswith("tensorrt 10.3.0 (fake-cuda)")
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
    assert module.loaded_from == ["mmap"] * 3, "engines are deserialized from a memory map, not a bytes copy"
    assert cuda.blocks == {} and cuda.closed, "close() frees every buffer and destroys the stream"


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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("floats", "ints", "cosine"), [("HALF", "INT32", 0.999), ("BF16", "INT64", 0.99), ("FLOAT", "INT32", 0.999999)])
def test_engines_with_fp16_bf16_and_int32_tensors(floats: str, ints: str, cosine: float, fake, build_dir, photo_files,
                                                  tmp_path: Path) -> None:
    """Engine I/O in fp16 / bf16 floats and int32 ids: the backend converts on the host and sizes buffers by the
    engine's types. Rounding makes them differ from fp32, so the test asks for close values, not equal tokens."""
    build = build_dir("1.5-vl")
    dtypes = io_dtypes(json.loads((build / "manifest.json").read_text()), floats, ints)
    engines = with_engines(build, tmp_path, dtypes=dtypes)
    with Pipeline.from_build(build, backend="onnxruntime") as reference, Pipeline.from_build(engines, backend="tensorrt") as pipe:
        pixels, ids = reference.prepare(photo_files["astronaut"], "Describe the image.", 4)
        expected, _ = reference.backend.prefill(ids.before, reference.backend.vision(pixels.pixel_values), ids.after)
        features_pointer = pipe.backend.vision(pixels.pixel_values)
        features, kept = pipe.backend.vision_outputs()
        logits, cache = pipe.backend.prefill(ids.before, features_pointer, ids.after)
        assert logits.dtype == np.float32 and _cosine(logits, expected) >= cosine, _cosine(logits, expected)
        assert features.dtype == np.float32 and features.shape == (1, 288, 128) and kept.shape == (1, 288)
        assert cache.lengths == reference.build.cache_lengths(ids.length(288))
        result = pipe(photo_files["astronaut"], "Describe the image.", max_new_tokens=6)
        assert result.cache_lengths == cache.lengths and 1 <= len(result.token_ids) <= 6


# --- choosing TensorRT, and checking engines against the device -------------------------------------------


def test_auto_prefers_tensorrt_only_when_everything_is_there(fake, build_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    cuda, _ = fake
    plain = Build.from_directory(without_engines(build_dir("1.5-vl"), tmp_path))
    engines = Build.from_directory(with_engines(build_dir("1.5-vl"), tmp_path))
    assert backend_module.resolve("auto", engines) == "tensorrt" and capsys.readouterr().err == ""
    assert backend_module.resolve("auto", plain) == "onnxruntime"  # no engines in the build
    assert capsys.readouterr().err.count("\n") == 1  # a GPU is there: one line says why not TensorRT
    monkeypatch.setattr(backend_module, "cuda_allocator", lambda: False)  # e.g. only a CPU build of torch
    assert backend_module.resolve("auto", engines) == "onnxruntime"
    assert "cuda-python" in capsys.readouterr().err
    monkeypatch.setattr(backend_module, "cuda_allocator", lambda: True)
    monkeypatch.setattr(device, "driver", lambda: None)  # no GPU: ONNX Runtime, silently
    assert backend_module.resolve("auto", engines) == "onnxruntime" and capsys.readouterr().err == ""
    monkeypatch.setattr(device, "driver", lambda: Driver(13000, 1, "8.6"))
    monkeypatch.setattr(backend_module, "has_module", lambda name: name not in ("tensorrt",))
    assert backend_module.resolve("auto", engines) == "onnxruntime"  # the engines' flavour is not installed
    assert "ficoco-edge[trt]" in capsys.readouterr().err


def test_a_cpu_build_of_torch_is_not_a_cuda_allocator() -> None:
    """torch imports here, but it is the CPU build: `auto` must not count it (read from torch/version.py)."""
    import torch

    assert device.torch_has_cuda() is (torch.version.cuda is not None)
    if not (errors.has_module("cuda.bindings") or errors.has_module("cuda.cudart")) and torch.version.cuda is None:
        assert not cuda_module.cuda_allocator()
        with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[cuda12\]"):
            cuda_module.open_cuda()


@pytest.mark.parametrize(("installed", "gpu", "message"), [
    ("10.4.0", "8.6", "built with tensorrt 10.3.0 and this machine has 10.4.0"),
    ("10.3.0", "8.7", "built for compute capability 8.6 and this GPU is 8.7"),
])
def test_engines_that_do_not_fit_the_device(installed: str, gpu: str, message: str, build_dir, tmp_path: Path,
                                            monkeypatch, capsys) -> None:
    """--backend tensorrt refuses in one line naming the rebuild command; auto falls back with one line."""
    cuda = FakeCuda(compute_capability=gpu)
    install(monkeypatch, cuda, fake_trt_module(cuda, version=installed))
    build = Build.from_directory(with_engines(build_dir("1.5-vl"), tmp_path))
    with pytest.raises(EngineMismatchError, match=message) as info:
        backend_module.resolve("tensorrt", build)
    assert f"--from-onnx {build.directory} --backend tensorrt" in str(info.value) and "\n" not in str(info.value)
    assert backend_module.resolve("auto", build) == "onnxruntime"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: using ONNX Runtime, not TensorRT:") and message in err


def test_unsupported_tensorrt_is_refused_at_run_time(build_dir, tmp_path: Path, monkeypatch) -> None:
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_trt_module(cuda, version="8.6.2"))
    build = Build.from_directory(with_engines(build_dir("1.5-vl"), tmp_path))
    with pytest.raises(BackendNotInstalledError, match="tensorrt 8.6.2 is not supported.*JetPack 6.0 ships TensorRT 8.6"):
        backend_module.resolve("tensorrt", build)


def test_on_a_jetson_the_hint_is_from_onnx(build_dir, tmp_path: Path, monkeypatch) -> None:
    """RTX engines copied to a Jetson: TensorRT-RTX does not exist there, so the hint is to compile with JetPack's."""
    build = Build.from_directory(with_engines(build_dir("1.5-vl"), tmp_path, flavour="tensorrt-rtx"))
    monkeypatch.setattr(backend_module, "has_module", lambda name: not name.startswith("tensorrt_rtx"))
    tegra = tmp_path / "nv_tegra_release"
    monkeypatch.setattr(errors, "TEGRA_RELEASE", tegra)
    with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[rtx\]"):  # not a Jetson: the extra
        backend_module.resolve("tensorrt", build)
    tegra.write_text("# R36 (release), REVISION: 4.3\n")
    with pytest.raises(BackendNotInstalledError) as info:
        backend_module.resolve("tensorrt", build)
    assert f"--from-onnx {build.directory} --backend tensorrt" in str(info.value) and "ficoco-edge[rtx]" not in str(info.value)


def test_cuda_bindings_newer_than_the_driver_are_one_line_with_the_fix() -> None:
    """JetPack 6 (CUDA 12.6 driver) with cuda-python 13: found before any CUDA call, and from cudaErrorInsufficientDriver."""
    jetpack6 = Driver(12060, 1, "8.7")
    line = cuda_module.driver_mismatch("13.0.2", jetpack6)
    assert line is not None and "\n" not in line and "cuda-python 13.0.2 is built for CUDA 13" in line
    assert "supports CUDA 12.6" in line and "pip install 'cuda-python>=12.0,<13'" in line and "ficoco-edge[cuda12]" in line
    assert cuda_module.driver_mismatch("12.6.2", jetpack6) is None and cuda_module.driver_mismatch("12.9.0", Driver(13000, 1, "12.0")) is None
    with pytest.raises(BackendNotInstalledError, match="cudaErrorInsufficientDriver"):
        cuda_module.CudaPython(cudart=_fake_cudart(), found=jetpack6, bindings="13.0.2")
    with pytest.raises(BackendNotInstalledError, match=r"cuda-python>=12.0,<13"):  # the driver answers first
        cuda_module.CudaPython(cudart=_fake_cudart(insufficient=True), found=Driver(12020, 1, "8.7"), bindings="13.0.2")
    cudart = _fake_cudart()
    cuda = cuda_module.CudaPython(cudart=cudart, found=jetpack6, bindings="12.6.2")
    cuda.close()
    assert cudart.calls == ["cudaFree", "cudaStreamCreate", "cudaStreamSynchronize", "cudaStreamDestroy"]


def _fake_cudart(insufficient: bool = False) -> SimpleNamespace:
    """cuda.bindings.runtime as far as CudaPython's start and close use it: (error, *values) tuples."""
    errors_ = SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)
    calls: list[str] = []

    def call(name: str, *values: object):
        def run(*args: object) -> tuple:
            calls.append(name)
            return (35 if insufficient and name == "cudaFree" else 0, *values)
        return run

    return SimpleNamespace(cudaError_t=errors_, calls=calls, cudaFree=call("cudaFree"), cudaStreamCreate=call("cudaStreamCreate", 99),
                           cudaStreamSynchronize=call("cudaStreamSynchronize"), cudaStreamDestroy=call("cudaStreamDestroy"),
                           cudaGetErrorString=lambda e: (0, b"CUDA driver version is insufficient for CUDA runtime version"))


# --- TensorRT-RTX at run time -----------------------------------------------------------------------------


def test_rtx_runtime_cache_and_kernel_specialization(build_dir, photo_files, tmp_path: Path, monkeypatch) -> None:
    """The JIT kernel cache lives in the user cache directory and makes a second start compile nothing; decode
    (a new cache length at every step) never compiles a shape-specialized kernel; the build is never written."""
    cache_root = tmp_path / "user-cache"
    monkeypatch.setenv("FICOCO_CACHE", str(cache_root))
    cuda = FakeCuda()
    module = fake_trt_module(cuda, version="1.7.1", rtx=True)
    install(monkeypatch, cuda, module)
    engines = with_engines(build_dir("1.5-vl"), tmp_path, flavour="tensorrt-rtx")
    before = tree_digest(engines)
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        contexts = {g: e.context for g, e in pipe.backend.engines.items()}
        assert contexts[names.DECODE].config.dynamic_shapes_kernel_specialization_strategy == Strategy.NONE
        assert contexts[names.PREFILL].config.dynamic_shapes_kernel_specialization_strategy == Strategy.LAZY
        first = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=10)
        assert first.tokens.generated > 1 and module.compiles == 2  # vision's one shape, prefill's one prompt shape
    assert sorted(p.name.split("-")[0] for p in (cache_root / "tensorrt-rtx").iterdir()) == ["decode", "prefill", "vision"]
    assert tree_digest(engines) == before, "the runtime cache must not be written into the build"
    module.compiles = 0
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        again = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=10)
    assert again.token_ids == first.token_ids and module.compiles == 0, "kernels come from the runtime cache"


def test_load_failures_are_one_line_and_release_what_was_allocated(fake, build_dir, tmp_path: Path, monkeypatch) -> None:
    cuda, _ = fake
    mismatch = with_engines(build_dir("1.5-vl"), tmp_path, header_version="10.3.1")  # the manifest says 10.3.0
    with pytest.raises(BuildError, match=r"cannot load .*vision.engine.*10.3.1.*--from-onnx") as info:
        Pipeline.from_build(mismatch, backend="tensorrt")
    assert "\n" not in str(info.value) and cuda.blocks == {} and cuda.closed
    small = FakeCuda(memory=1 << 10)
    install(monkeypatch, small, fake_trt_module(small))
    with pytest.raises(BackendError, match="execution context for vision: out of GPU memory"):
        Pipeline.from_build(with_engines(build_dir("1.5-vl"), tmp_path / "oom"), backend="tensorrt")
    assert small.blocks == {} and small.closed


# --- the fake's strictness: a deliberately broken backend per check, each caught ----------------------------


def _ignore_shape_result(self, graph, name, shape, pointer):
    self.engines[graph].context.set_input_shape(name, tuple(shape))  # broken: the result is not checked
    self._address(graph, name, pointer)


def _unaligned_malloc(self, key, nbytes):
    self.buffers[key] = self.cuda.malloc(nbytes + 64) + 64  # broken: sub-allocated at a 64-byte offset
    return self.buffers[key]


def _host_ignoring_engine_dtype(self, graph, name, array):
    return np.ascontiguousarray(array)  # broken: int64 ids into an int32 engine input


def _logits_read_before_sync(self):
    self.cuda.download(self.logits_host, self.buffers[names.LOGITS])
    row = self.logits_host[0].astype(np.float32)  # broken: read before the stream is synchronized
    self.cuda.sync()
    return row


_BIND_OUTPUTS = backend_trt.TensorRTBackend._bind_outputs


def _shapes_for_outputs_too(self, graph, target):
    context = self.engines[graph].context
    for name in names.cache_names(names.present, self.build.layers):  # broken: outputs are not inputs
        if not context.set_input_shape(name, tuple(context.get_tensor_shape(name))):
            raise BackendError(f"{graph}: TensorRT refused the shape of {name}")
    return _BIND_OUTPUTS(self, graph, target)


def _load_unchecked(trt, runtime, logger, build, graph, flavour):
    return backend_trt._deserialize(runtime, build.path("engines", graph))  # broken: None not checked


def _context_unchecked(engine, config, logger, graph):
    return engine.create_execution_context(config) if config is not None else engine.create_execution_context()


def _empty_cache_without_memset(self, lengths):
    return backend_trt.TrtCache(0, tuple(lengths))  # broken: relies on cudaMalloc'd memory being zero


def _generate(pipe, reference, photo_files) -> None:
    expected = reference(photo_files["coffee"], LONG_PROMPT, max_new_tokens=6)
    result = pipe(photo_files["coffee"], LONG_PROMPT, max_new_tokens=6)
    assert result.token_ids == expected.token_ids, "the answer differs from ONNX Runtime's"


def _empty_decode(pipe, reference, photo_files) -> None:
    lengths = pipe.build.cache_lengths(400)
    expected, _ = reference.backend.decode(5, 400, reference.backend.empty_cache(lengths))
    logits, _ = pipe.backend.decode(5, 400, pipe.backend.empty_cache(lengths))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# (strictness, what is broken, engines' options, scenario, what the correct backend raises, what catches the broken one)
BROKEN = {
    "profile": ("_set_input", _ignore_shape_result, {"text_max": 16}, _generate,
                (BackendError, r"input_ids_after shape \[1, \d+\] is outside the engine's profile \[1, 1\]..\[1, 16\]"),
                (BackendError, r"prefill: present.0.key has shape \[1, 2, -1, 32\]")),  # the refused shape stays unset
    "alignment": ("_malloc", _unaligned_malloc, {}, _generate, None,
                  (BackendError, r"refused the address 0x[0-9a-f]+ of pixel_values")),
    "dtype": ("_host", _host_ignoring_engine_dtype, {"ints": "INT32"}, _generate, None,
              (AssertionError, r"input_ids_before: device bytes hold int64 but the tensor is int32")),
    "async": ("_logits", _logits_read_before_sync, {}, _generate, None,
              (AssertionError, r"the answer differs from ONNX Runtime's")),
    "output shape": ("_bind_outputs", _shapes_for_outputs_too, {}, _generate, None,
                     (BackendError, r"TensorRT refused the shape of present.0.key")),
    "deserialize None": (("module", "_load"), _load_unchecked, {"header_version": "10.4.0"}, None,
                         (BuildError, r"cannot load"), (AttributeError, r"'NoneType' object has no attribute")),
    "context None": (("module", "_context"), _context_unchecked, {"device_memory": 1 << 40}, _generate,
                     (BackendError, r"out of GPU memory"), (AttributeError, r"'NoneType' object has no attribute")),
    "not zeroed": ("empty_cache", _empty_cache_without_memset, {}, _empty_decode, None,
                   (AssertionError, r"reads device memory that was never written")),
}


@pytest.mark.parametrize("broken", [False, True], ids=["correct", "broken"])
@pytest.mark.parametrize("check", list(BROKEN))
def test_the_fake_catches_a_broken_backend(check: str, broken: bool, fake, build_dir, photo_files, tmp_path: Path,
                                           monkeypatch) -> None:
    target, replacement, options, scenario, correct, caught = BROKEN[check]
    if broken:
        where, attribute = (backend_trt, target[1]) if isinstance(target, tuple) else (backend_trt.TensorRTBackend, target)
        monkeypatch.setattr(where, attribute, replacement)
    build = build_dir("1.5-vl")
    options = dict(options)
    if "ints" in options:
        options["dtypes"] = io_dtypes(json.loads((build / "manifest.json").read_text()), "FLOAT", options.pop("ints"))
    engines = with_engines(build, tmp_path, **options)
    expected = caught if broken else correct
    with contextlib.ExitStack() as stack, Pipeline.from_build(build, backend="onnxruntime") as reference:
        if expected is None:
            pipe = stack.enter_context(Pipeline.from_build(engines, backend="tensorrt"))
            scenario(pipe, reference, photo_files)
            return
        with pytest.raises(expected[0], match=expected[1]):
            pipe = Pipeline.from_build(engines, backend="tensorrt")
            stack.callback(_close_quietly, pipe)
            scenario(pipe, reference, photo_files)


def _close_quietly(pipe: Pipeline) -> None:
    with contextlib.suppress(AssertionError, AttributeError, BackendError):
        pipe.close()


def test_the_fake_uses_only_names_tensorrt_rtx_has() -> None:
    """Every TensorRT name the fake stands in for exists in the real TensorRT-RTX bindings (the same API as TensorRT 10)."""
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")
    from .fake_tensorrt import FakeContext, FakeEngine, FakeRuntimeCache, FakeRuntimeConfig

    module = fake_trt_module(FakeCuda(), rtx=True)
    pairs = [(FakeEngine, trt.ICudaEngine), (FakeContext, trt.IExecutionContext), (FakeRuntimeConfig, trt.IRuntimeConfig),
             (FakeRuntimeCache, trt.IRuntimeCache), (module.Runtime, trt.Runtime)]
    for fake_class, real in pairs:
        public = {n for n in vars(fake_class) if not n.startswith("_")}
        assert public <= set(dir(real)), (fake_class.__name__, public - set(dir(real)))
    assert set(Strategy.__members__) == set(trt.DynamicShapesKernelSpecializationStrategy.__members__)
    assert {m: int(v) for m, v in Strategy.__members__.items()} == \
        {m: int(v) for m, v in trt.DynamicShapesKernelSpecializationStrategy.__members__.items()}
    assert {"INPUT", "OUTPUT"} <= set(trt.TensorIOMode.__members__) and hasattr(trt.ILogger, "ERROR")
    used = {trt.ICudaEngine: ("num_io_tensors",), trt.IRuntimeConfig: ("dynamic_shapes_kernel_specialization_strategy",),
            trt.Runtime: ("engine_header_size", "get_engine_validity")}  # what backend_trt uses beyond the fake's methods
    assert all(hasattr(cls, name) for cls, names_ in used.items() for name in names_)
    assert hasattr(trt, "EngineValidity") and hasattr(trt, "EngineInvalidityDiagnostics")


# --- on a real GPU ------------------------------------------------------------------------------------------


def _gpu_skip_reason() -> str | None:
    has = errors.has_module
    missing = []
    if not (has("tensorrt") or has("tensorrt_rtx_bindings") or has("tensorrt_rtx")):
        missing.append("TensorRT or TensorRT-RTX")
    if backend_module.cuda_devices() < 1:
        missing.append("a CUDA device")
    if not cuda_module.cuda_allocator():
        missing.append("cuda-python or a CUDA build of torch")
    return f"needs {', '.join(missing)}" if missing else None


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_tensorrt_engines_on_a_gpu(build_dir, photo_files, tmp_path: Path) -> None:
    """Compile the engines of a copy of a build for this GPU, then compare with ONNX Runtime (fp32; TF32 may differ slightly)."""
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
