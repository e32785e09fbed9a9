"""The TensorRT backend: for real where a GPU and TensorRT are present, and against a strict fake everywhere.

`test_tensorrt_engines_on_a_gpu` needs a CUDA device, TensorRT (or TensorRT-RTX) and cuda-python or a
CUDA build of torch; it skips elsewhere, naming what is missing. The other tests run `runtime.backend_trt`
against `fake_tensorrt` (ONNX Runtime behind the TensorRT API, numpy behind the CUDA memory), whose
strictness is itself tested: `test_the_fake_catches_a_broken_backend` runs deliberately broken copies
of the backend, one per kind of strictness (and the KV rows written one row off, or past_length one
too many), and each must be caught. Device selection (`auto`), the checks of engines against the
device and the Jetson hints run with stand-ins for the driver; tests/runtime/test_cuda.py tests
runtime.cuda (the bindings against the driver, the device-to-device copies).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from export.from_onnx import ENGINELESS, dim_ranges, engine_profiles
from ficoco.plan import BuildPlan
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
                 tokens_max: int | None = None, device_memory: int = 1 << 20, header_version: str | None = None) -> Path:
    """A copy of `build` with fake engines: each graph's ONNX (embed's excepted) behind a header with the export's
    own profiles (`tokens_max`: the decoder segments take at most that many tokens)."""
    copy = tmp_path / f"engines-{flavour}"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("*.engine"))
    manifest = json.loads((copy / "manifest.json").read_text())
    version, engines = VERSIONS[flavour], {}
    for graph, entry in manifest["graphs"].items():
        if graph in ENGINELESS:
            continue
        ranges = dim_ranges(BuildPlan.from_dict(manifest["schedule"]), graph)
        if tokens_max is not None and graph.startswith("decoder."):
            ranges["tokens"] = (1, min(ranges["tokens"][1], tokens_max), tokens_max)
        profiles = engine_profiles(entry, ranges)
        onnx_bytes = onnx.load(str(copy / entry["file"])).SerializeToString()  # weights inline, as in an engine
        data = serialize_engine(onnx_bytes, version=header_version or version,
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


def engine_graphs(directory: Path) -> list[str]:
    """The graphs that have engines, in running order (the order the backend loads them)."""
    return [g for g in Build.from_directory(directory).graph_names if g not in ENGINELESS]


@pytest.mark.parametrize("name", ["1.5-l", "1.5-v", "next-vl"])
def test_backend_bookkeeping_through_a_fake_tensorrt(name: str, fake, build_dir, photo_files, tmp_path: Path) -> None:
    """Greedy and sampled tokens equal ONNX Runtime's: FiCoCo-L (decoder.0, reduce.1, decoder.1), FiCoCo-V (decoder.0
    only), and LLaVA-NeXT (crops, newline rows). The fake computes every output from the device memory the backend
    bound, so the in-place rows, their pitch and past_length are what is tested."""
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
            assert result.cache_lengths == expected.cache_lengths
            generated.append(result.tokens.generated)
        settings = {"max_new_tokens": 12, "temperature": 1.2, "top_k": 50, "seed": 4}
        sampled = pipe(photo_files["coffee"], "What is this?", **settings)
        assert sampled.token_ids == reference(photo_files["coffee"], "What is this?", **settings).token_ids
        generated.append(sampled.tokens.generated)
        graphs, steps = engine_graphs(engines), sum(n - 1 for n in generated)
        assert names.EMBED not in pipe.backend.engines and list(pipe.backend.engines) == graphs
        runs = {g: 3 + steps if g.startswith("decoder.") else 3 for g in graphs}  # prefills (+ decode steps)
        runs[names.VISION] = len(PHOTOS) + 1
        assert dict(zip(graphs, (engine.runs for engine in module.engines))) == runs
        timings = bench.decode_step_ms(pipe, (1500, 2000), repeats=2, warmup=1)
        assert set(timings) == {1500, 2000} and min(timings.values()) > 0
    assert module.loaded_from == ["mmap"] * len(graphs), "engines are deserialized from a memory map, not a bytes copy"
    assert cuda.blocks == {} and cuda.closed, "close() frees every buffer and destroys the stream"


def _download(backend, pointer: int, shape: tuple[int, ...]) -> np.ndarray:
    host = np.empty(shape, backend.cache_dtype)
    backend.cuda.download(host, pointer)
    backend.cuda.sync()
    return host


def test_cache_rows_are_written_in_place(fake, build_dir, tmp_path: Path) -> None:
    """After a prefill and two decode steps, every layer's buffer holds ONNX Runtime's rows at rows 0 .. len_i - 1
    (the layout [1, Hkv, capacity_i, Dh]) and zeros after them; the one cache object is updated in place."""
    cuda, _ = fake
    build = build_dir("1.5-l")
    with Pipeline.from_build(build, backend="onnxruntime") as reference, \
            Pipeline.from_build(with_engines(build, tmp_path), backend="tensorrt") as pipe:
        backend, ort, b = pipe.backend, reference.backend, pipe.build
        pixels = np.random.default_rng(0).normal(size=(1, 3, 336, 336)).astype(np.float32)
        before, after, prompt = np.array([[1, 5]]), np.array([[7, 8, 9]]), 2 + b.plan.visual_tokens + 3
        outputs = [ort.prefill(before, ort.vision(pixels), after), backend.prefill(before, backend.vision(pixels), after)]
        for step in range(2):
            token = int(outputs[0][0].argmax())
            np.testing.assert_allclose(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
            outputs = [ort.decode(token, prompt + step, outputs[0][1]), backend.decode(token, prompt + step, outputs[1][1])]
        (_, expected), (_, cache) = outputs
        assert cache is backend.cache and cache.capacities == b.plan.capacities == (2048,) * 5 + (1760,) * 3
        assert backend.cache_lengths(cache) == ort.cache_lengths(expected) == tuple(n + 2 for n in b.plan.cache_lengths(prompt))
        for i in range(b.layers):
            for pointer, rows in ((cache.keys[i], expected.keys[i]), (cache.values[i], expected.values[i])):
                buffer = _download(backend, pointer, rows.shape)
                np.testing.assert_allclose(buffer[:, :, :cache.lengths[i]], rows[:, :, :cache.lengths[i]], rtol=1e-5, atol=1e-5)
                assert not buffer[:, :, cache.lengths[i]:].any(), f"layer {i}: rows written past its length"
        with pytest.raises(ValueError, match="need 8 cache lengths"):
            backend.empty_cache((5,) * 7)
        with pytest.raises(BackendError, match="layer 0's cache holds 2048 tokens"):
            backend.empty_cache((2048,) * 8)
        assert backend.empty_cache((300,) * 8) is cache and cache.lengths == [300] * 8
        blocks = len(cuda.blocks)
        backend.decode(3, 300, cache)
        assert len(cuda.blocks) == blocks and cache.lengths == [301] * 8, "a step allocates nothing"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("floats", "ints", "cosine"), [("HALF", "INT32", 0.999), ("BF16", "INT64", 0.99), ("FLOAT", "INT32", 0.999999)])
def test_engines_with_fp16_bf16_and_int32_tensors(floats: str, ints: str, cosine: float, fake, build_dir, photo_files,
                                                  tmp_path: Path) -> None:
    """Engine I/O in fp16 / bf16 floats and int32 ids: the backend converts on the host and sizes buffers by the
    engine's types. Rounding makes them differ from fp32, so the test asks for close values, not equal tokens."""
    build = build_dir("1.5-l")
    dtypes = io_dtypes(json.loads((build / "manifest.json").read_text()), floats, ints)
    engines = with_engines(build, tmp_path, dtypes=dtypes)
    with Pipeline.from_build(build, backend="onnxruntime") as reference, Pipeline.from_build(engines, backend="tensorrt") as pipe:
        pixels, ids = reference.prepare(photo_files["astronaut"], "Describe the image.", 4)
        expected, _ = reference.backend.prefill(ids.before, reference.backend.vision(pixels.pixel_values), ids.after)
        features_pointer = pipe.backend.vision(pixels.pixel_values)
        features, kept = pipe.backend.vision_outputs()
        logits, cache = pipe.backend.prefill(ids.before, features_pointer, ids.after)
        assert logits.dtype == np.float32 and _cosine(logits, expected) >= cosine, _cosine(logits, expected)
        plan = reference.build.plan
        n = plan.visual_tokens
        assert features.dtype == np.float32 and features.shape == (n, 128) and kept.shape == (1, n)
        assert pipe.backend.cache_lengths(cache) == plan.cache_lengths(ids.length(plan))
        result = pipe(photo_files["astronaut"], "Describe the image.", max_new_tokens=6)
        assert result.cache_lengths == plan.cache_lengths(ids.length(plan)) and 1 <= len(result.token_ids) <= 6


# --- choosing TensorRT, and checking engines against the device -------------------------------------------


def test_auto_prefers_tensorrt_only_when_everything_is_there(fake, build_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    cuda, _ = fake
    plain = Build.from_directory(without_engines(build_dir("1.5-l"), tmp_path))
    engines = Build.from_directory(with_engines(build_dir("1.5-l"), tmp_path))
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


@pytest.mark.parametrize(("installed", "gpu", "message"), [
    ("10.4.0", "8.6", "built with tensorrt 10.3.0 and this machine has 10.4.0"),
    ("10.3.0", "8.7", "built for compute capability 8.6 and this GPU is 8.7"),
])
def test_engines_that_do_not_fit_the_device(installed: str, gpu: str, message: str, build_dir, tmp_path: Path,
                                            monkeypatch, capsys) -> None:
    """--backend tensorrt refuses in one line naming the rebuild command; auto falls back with one line."""
    cuda = FakeCuda(compute_capability=gpu)
    install(monkeypatch, cuda, fake_trt_module(cuda, version=installed))
    build = Build.from_directory(with_engines(build_dir("1.5-l"), tmp_path))
    with pytest.raises(EngineMismatchError, match=message) as info:
        backend_module.resolve("tensorrt", build)
    assert f"--from-onnx {build.directory} --backend tensorrt" in str(info.value) and "\n" not in str(info.value)
    assert backend_module.resolve("auto", build) == "onnxruntime"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: using ONNX Runtime, not TensorRT:") and message in err


def test_unsupported_tensorrt_is_refused_at_run_time(build_dir, tmp_path: Path, monkeypatch) -> None:
    cuda = FakeCuda()
    install(monkeypatch, cuda, fake_trt_module(cuda, version="8.6.2"))
    build = Build.from_directory(with_engines(build_dir("1.5-l"), tmp_path))
    with pytest.raises(BackendNotInstalledError, match="tensorrt 8.6.2 is not supported.*JetPack 6.0 ships TensorRT 8.6"):
        backend_module.resolve("tensorrt", build)


def test_on_a_jetson_the_hint_is_from_onnx(build_dir, tmp_path: Path, monkeypatch) -> None:
    """RTX engines copied to a Jetson: TensorRT-RTX does not exist there, so the hint is to compile with JetPack's."""
    build = Build.from_directory(with_engines(build_dir("1.5-l"), tmp_path, flavour="tensorrt-rtx"))
    monkeypatch.setattr(backend_module, "has_module", lambda name: not name.startswith("tensorrt_rtx"))
    tegra = tmp_path / "nv_tegra_release"
    monkeypatch.setattr(errors, "TEGRA_RELEASE", tegra)
    with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[rtx\]"):  # not a Jetson: the extra
        backend_module.resolve("tensorrt", build)
    tegra.write_text("# R36 (release), REVISION: 4.3\n")
    with pytest.raises(BackendNotInstalledError) as info:
        backend_module.resolve("tensorrt", build)
    assert f"--from-onnx {build.directory} --backend tensorrt" in str(info.value) and "ficoco-edge[rtx]" not in str(info.value)


# --- TensorRT-RTX at run time -----------------------------------------------------------------------------


def test_rtx_runtime_cache_and_kernel_specialization(build_dir, photo_files, tmp_path: Path, monkeypatch) -> None:
    """The JIT kernel cache lives in the user cache directory and makes a second start compile nothing; decode (the
    same shapes at every step: one token, the whole buffers) compiles one kernel per segment; the build is never written."""
    cache_root = tmp_path / "user-cache"
    monkeypatch.setenv("FICOCO_CACHE", str(cache_root))
    cuda = FakeCuda()
    module = fake_trt_module(cuda, version="1.7.1", rtx=True)
    install(monkeypatch, cuda, module)
    engines = with_engines(build_dir("1.5-l"), tmp_path, flavour="tensorrt-rtx")
    before = tree_digest(engines)
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        contexts = {g: e.context for g, e in pipe.backend.engines.items()}
        assert set(contexts) == {names.VISION, "decoder.0", "reduce.1", "decoder.1"}
        assert {c._runtime_config.dynamic_shapes_kernel_specialization_strategy for c in contexts.values()} == {Strategy.LAZY}
        first = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=10)
        assert first.tokens.generated > 1 and module.compiles == 6  # vision; reduce.1's prompt; each segment's prompt and q = 1
    assert sorted(p.name.split("-")[0] for p in (cache_root / "tensorrt-rtx").iterdir()) == ["decoder.0", "decoder.1", "reduce.1", "vision"]
    assert tree_digest(engines) == before, "the runtime cache must not be written into the build"
    module.compiles = 0
    with Pipeline.from_build(engines, backend="tensorrt") as pipe:
        again = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=10)
    assert again.token_ids == first.token_ids and module.compiles == 0, "kernels come from the runtime cache"


def test_load_failures_are_one_line_and_release_what_was_allocated(fake, build_dir, tmp_path: Path, monkeypatch) -> None:
    cuda, _ = fake
    mismatch = with_engines(build_dir("1.5-l"), tmp_path, header_version="10.3.1")  # the manifest says 10.3.0
    with pytest.raises(BuildError, match=r"cannot load .*vision.engine.*10.3.1.*--from-onnx") as info:
        Pipeline.from_build(mismatch, backend="tensorrt")
    assert "\n" not in str(info.value) and cuda.blocks == {} and cuda.closed
    small = FakeCuda(memory=1 << 10)
    install(monkeypatch, small, fake_trt_module(small))
    with pytest.raises(BackendError, match="execution context for vision: out of GPU memory"):
        Pipeline.from_build(with_engines(build_dir("1.5-l"), tmp_path / "oom"), backend="tensorrt")
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


_OUTPUT = backend_trt.TensorRTBackend._output


def _shapes_for_outputs_too(self, graph, name, expected, pointer, free=()):
    if not self.engines[graph].context.set_input_shape(name, tuple(expected)):  # broken: outputs are not inputs
        raise BackendError(f"{graph}: TensorRT refused the shape of {name}")
    return _OUTPUT(self, graph, name, expected, pointer, free)


def _load_unchecked(trt, runtime, logger, build, graph, flavour):
    return backend_trt._deserialize(runtime, build.path("engines", graph))  # broken: None not checked


def _context_unchecked(engine, config, logger, graph):
    return engine.create_execution_context(config) if config is not None else engine.create_execution_context()


_ALLOCATE_CACHE, _WRITE_ROWS, _SEGMENT = (getattr(backend_trt.TensorRTBackend, n) for n in ("_allocate_cache", "_write_rows", "_segment"))


def _cache_not_zeroed(self):
    self.cuda.memset = lambda pointer, nbytes: None  # broken: relies on cudaMalloc'd memory being zero
    try:
        _ALLOCATE_CACHE(self)
    finally:
        del self.cuda.memset


def _rows_one_off(self, graph, layers, q, first):
    copy2d, row = self.cuda.copy2d, self.row
    self.cuda.copy2d = lambda dst, *rest: copy2d(dst + row, *rest)  # broken: the new rows land one row further on
    try:
        _WRITE_ROWS(self, graph, layers, q, first)
    finally:
        del self.cuda.copy2d


def _past_length_one_more(self, graph, last, layers, q, io, past_length):
    return _SEGMENT(self, graph, last, layers, q, io, past_length + 1)  # broken: one stale row more in the past


def _generate(pipe, reference, photo_files) -> None:
    expected = reference(photo_files["coffee"], LONG_PROMPT, max_new_tokens=6)
    result = pipe(photo_files["coffee"], LONG_PROMPT, max_new_tokens=6)
    assert result.token_ids == expected.token_ids, "the answer differs from ONNX Runtime's"


def _empty_decode(pipe, reference, photo_files) -> None:
    lengths = pipe.build.plan.cache_lengths(400)
    expected, _ = reference.backend.decode(5, 400, reference.backend.empty_cache(lengths))
    logits, _ = pipe.backend.decode(5, 400, pipe.backend.empty_cache(lengths))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _same_logits(pipe, reference, photo_files) -> None:
    """The prefill's and three decode steps' logits, step by step, against ONNX Runtime's."""
    pixels, ids = reference.prepare(photo_files["coffee"], LONG_PROMPT, 4)
    ours, theirs = pipe.backend, reference.backend
    logits = [theirs.prefill(ids.before, theirs.vision(pixels.pixel_values), ids.after),
              ours.prefill(ids.before, ours.vision(pixels.pixel_values), ids.after)]
    for position in range(ids.length(pipe.build.plan), ids.length(pipe.build.plan) + 4):
        np.testing.assert_allclose(logits[1][0], logits[0][0], rtol=1e-4, atol=1e-4, err_msg=f"before position {position}")
        token = int(logits[0][0].argmax())
        logits = [theirs.decode(token, position, logits[0][1]), ours.decode(token, position, logits[1][1])]


# (strictness, what is broken, engines' options, scenario, what the correct backend raises, what catches the broken one)
BROKEN = {
    "profile": ("_set_input", _ignore_shape_result, {"tokens_max": 16}, _generate,
                (BackendError, r"decoder.0: input hidden_states shape \[1, \d+, 128\] is outside the engine's profile "
                               r"\[1, 1, 128\]..\[1, 16, 128\]"),
                (BackendError, r"decoder.0: present.0.key has shape \[1, 2, -1, 32\]")),  # the refused shape stays unset
    "alignment": ("_malloc", _unaligned_malloc, {}, _generate, None,
                  (BackendError, r"refused the address 0x[0-9a-f]+ of pixel_values")),
    "dtype": ("_host", _host_ignoring_engine_dtype, {"ints": "INT32"}, _generate, None,
              (AssertionError, r"position_ids: device bytes hold int64 but the tensor is int32")),
    "async": ("logits", _logits_read_before_sync, {}, _generate, None,
              (AssertionError, r"the answer differs from ONNX Runtime's")),
    "output shape": ("_output", _shapes_for_outputs_too, {}, _generate, None,
                     (BackendError, r"TensorRT refused the shape of present.0.key")),
    "deserialize None": (("module", "_load"), _load_unchecked, {"header_version": "10.4.0"}, None,
                         (BuildError, r"cannot load"), (AttributeError, r"'NoneType' object has no attribute")),
    "context None": (("module", "_context"), _context_unchecked, {"device_memory": 1 << 40}, _generate,
                     (BackendError, r"out of GPU memory"), (AttributeError, r"'NoneType' object has no attribute")),
    "not zeroed": ("_allocate_cache", _cache_not_zeroed, {}, _empty_decode, None,
                   (AssertionError, r"past.0.key: reads device memory that was never written")),
    "row offset": ("_write_rows", _rows_one_off, {}, _same_logits, None, (AssertionError, r"Not equal to tolerance")),
    "past length": ("_segment", _past_length_one_more, {}, _same_logits, None, (AssertionError, r"Not equal to tolerance")),
}


@pytest.mark.parametrize("broken", [False, True], ids=["correct", "broken"])
@pytest.mark.parametrize("check", list(BROKEN))
def test_the_fake_catches_a_broken_backend(check: str, broken: bool, fake, build_dir, photo_files, tmp_path: Path,
                                           monkeypatch) -> None:
    target, replacement, options, scenario, correct, caught = BROKEN[check]
    if broken:
        where, attribute = (backend_trt, target[1]) if isinstance(target, tuple) else (backend_trt.TensorRTBackend, target)
        monkeypatch.setattr(where, attribute, replacement)
    build = build_dir("1.5-l")
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
    shutil.copytree(build_dir("1.5-l"), copy)
    with contextlib.redirect_stdout(io.StringIO()) as log:
        assert main(["--from-onnx", str(copy), "--backend", "auto"]) == 0, log.getvalue()
    reference = Pipeline.from_build(build_dir("1.5-l"), backend="onnxruntime")
    with reference, Pipeline.from_build(copy, backend="tensorrt") as pipe:
        assert pipe.backend.name.startswith("tensorrt")
        for photo in PHOTOS:
            expected = reference(photo_files[photo], "Describe the image.", max_new_tokens=16)
            result = pipe(photo_files[photo], "Describe the image.", max_new_tokens=16)
            assert result.cache_lengths == expected.cache_lengths
            assert result.token_ids[:4] == expected.token_ids[:4], (result.token_ids, expected.token_ids)
        steps = bench.decode_step_ms(pipe, (400, 1000))
        assert set(steps) == {400, 1000}
