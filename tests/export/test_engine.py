"""export.engine: flavour loading, supported versions, spec checks, command lines, and real builds on the CPU.

The build tests need TensorRT-RTX (the `rtx` extra) and skip without it; the rest run anywhere. Standard
TensorRT cannot be installed here; its code path (strongly typed network, no compute-capability
targets) is run through TensorRT-RTX's bindings, which share the TensorRT 10 builder API. Where a test
needs TensorRT to misbehave (a parser that reports an error yet succeeds, a builder that logs), the
real module is wrapped (`_Wrapped`), so everything else is still TensorRT's.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.engine import (
    BackendNotInstalledError,
    EngineBuildError,
    EngineSpec,
    Flavour,
    Profile,
    UnsupportedVersionError,
    build_engine,
    load_flavour,
    trtexec_command,
)
from runtime import trtlib

REPO = Path(__file__).resolve().parents[2]

SEQ = ((1, 4, 16), (1, 8, 16), (1, 64, 16))  # (min, opt, max) of the toy's input "x"
PROFILES = {"x": SEQ}


@pytest.fixture(scope="module")
def rtx() -> Flavour:
    """TensorRT-RTX, or a skip saying how to get it."""
    pytest.importorskip(
        "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'"
    )
    return load_flavour("tensorrt-rtx")


def _export_toy(path: Path, half: bool) -> Path:
    """A tiny graph with a dynamic sequence: LayerNorm, TopK (constant k), Gather(Elements), Softmax, MatMul, Scatter."""
    import torch

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.norm(self.proj(x))  # (1, S, 16)
            _, idx = torch.topk(h.mean(-1), 4, dim=-1)  # (1, 4)
            index = idx.unsqueeze(-1).expand(-1, -1, 16)
            kept = torch.gather(h, 1, index) + torch.index_select(h, 1, idx[0])
            out = torch.softmax(kept @ h.transpose(1, 2), dim=-1) @ h  # (1, 4, 16)
            return torch.scatter(h, 1, index, out), out

    dtype = torch.float16 if half else torch.float32
    model = Toy().eval().to(dtype)
    seq = torch.export.Dim("seq", min=SEQ[0][1], max=SEQ[2][1])
    torch.onnx.export(
        model, (torch.randn(SEQ[1], dtype=dtype),), str(path), dynamo=True,
        input_names=["x"], output_names=["updated", "merged"], dynamic_shapes=({1: seq},),
    )
    return path


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory, rtx: Flavour) -> dict[str, Path]:
    """{"fp32": path, "fp16": path} of the toy exported in each precision (weights as external data)."""
    root = tmp_path_factory.mktemp("onnx")
    return {p: _export_toy(root / f"toy_{p}.onnx", half=p == "fp16") for p in ("fp32", "fp16")}


class _Wrapped:
    """A TensorRT module with some attributes replaced (`overrides`); every other one is the real module's."""

    def __init__(self, module: object, **overrides: object) -> None:
        self._module, self._overrides = module, overrides

    def __getattr__(self, name: str) -> object:
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def _onnx_model(path: Path, node: object, inputs: list, outputs: list, initializers: tuple = ()) -> Path:
    """Save a one-node ONNX graph."""
    import onnx

    graph = onnx.helper.make_graph([node], "g", inputs, outputs, initializer=list(initializers))
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


# --- flavours -------------------------------------------------------------------------------


def test_one_tensorrt_layer_for_export_and_runtime() -> None:
    """export.engine builds with the runtime's TensorRT layer: the same importer, flavour type and error types, and no
    other module defines a TensorRT logger, a module table or an install hint of its own."""
    from runtime import backend_trt, errors

    assert load_flavour is trtlib.load_flavour and Flavour is trtlib.Flavour
    assert backend_trt.import_trt is trtlib.import_trt
    assert BackendNotInstalledError is errors.BackendNotInstalledError
    assert UnsupportedVersionError is errors.UnsupportedVersionError
    files = [p for folder in ("export", "runtime", "scripts") for p in (REPO / folder).glob("*.py")]
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in files}
    owners = {
        "(trt.ILogger)": {"runtime/trtlib.py"},
        "ficoco-edge[trt]": {"runtime/errors.py"},
        "ficoco-edge[rtx]": {"runtime/errors.py"},
        "class BackendNotInstalledError": {"runtime/errors.py"},
        '("tensorrt_rtx_bindings", "tensorrt_rtx")': {"runtime/errors.py"},
    }
    for text, where in owners.items():
        assert {name for name, source in sources.items() if text in source} == where, text


def test_unknown_backend_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'onnxruntime'"):
        load_flavour("onnxruntime")


def test_missing_standard_tensorrt_names_the_trt_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now raises ImportError
    with pytest.raises(BackendNotInstalledError, match=r"ficoco-edge\[trt\]") as info:
        load_flavour("tensorrt")
    assert isinstance(info.value, ValueError) and "JetPack" in str(info.value)


def test_auto_without_any_tensorrt_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendNotInstalledError) as info:
        load_flavour("auto")
    assert "ficoco-edge[trt]" in str(info.value) and "ficoco-edge[rtx]" in str(info.value)


def test_auto_falls_back_to_rtx(monkeypatch: pytest.MonkeyPatch, rtx: Flavour) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    flavour = load_flavour("auto")
    assert flavour == rtx and flavour.is_rtx and flavour.version.startswith("1.")


@pytest.mark.parametrize(("version", "supported"), [("10.3.0", True), ("10.13.3.9", True), ("8.6.2", False), ("11.4.0", False)])
def test_only_tensorrt_10_is_supported(monkeypatch: pytest.MonkeyPatch, version: str, supported: bool) -> None:
    """JetPack 6.0's TensorRT 8.6 (and any major this project was not written against) is refused in one line."""
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__=version))
    if supported:
        assert load_flavour("tensorrt").version == version
        return
    with pytest.raises(UnsupportedVersionError) as info:
        load_flavour("tensorrt")
    message = str(info.value)
    assert "\n" not in message and f"tensorrt {version} is not supported" in message and "TensorRT 10.x" in message
    assert ("JetPack 6.0 ships TensorRT 8.6" in message) == version.startswith("8.")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendNotInstalledError, match=f"tensorrt {version} is not supported"):
        load_flavour("auto")  # auto says why the installed TensorRT was passed over


def test_rtx_2_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", SimpleNamespace(__version__="2.0.0"))
    with pytest.raises(UnsupportedVersionError, match="TensorRT-RTX 1.x"):
        load_flavour("tensorrt-rtx")


# --- specs and command lines ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"precision": "int8"},
        {"compute_capabilities": ("86",)},
        {"compute_capabilities": ("8.6", "8.6")},
        {"profiles": {"x": ((1, 8, 16), (1, 4, 16), (1, 64, 16))}},  # min > opt
        {"profiles": {"x": ((1, 4), (1, 8, 16), (1, 64, 16))}},  # ranks differ
        {"profiles": {"x": ((1, 4, 16), (1, 8, 16))}},  # not a triple
        {"engine_path": "m.onnx"},
        {"compute_capabilities": ("current", "8.6")},  # the current GPU, or a list of targets, not both
    ],
)
def test_spec_rejects_bad_values(kwargs: dict) -> None:
    args = {"onnx_path": "m.onnx", "engine_path": "m.engine", **kwargs}
    with pytest.raises(ValueError):
        EngineSpec(**args)


def test_spec_normalises_profiles_and_paths() -> None:
    spec = EngineSpec("m.onnx", "m.engine", PROFILES, compute_capabilities=["8.6", "12.0"])
    assert spec.profiles["x"] == Profile(*SEQ) and spec.engine_path == Path("m.engine")
    assert spec.compute_capabilities == ("8.6", "12.0") and hash(spec)
    assert EngineSpec("m.onnx", "m.engine", compute_capabilities=["current"]).compute_capabilities == ("current",)


def test_engine_build_error_is_one_line_with_the_first_errors() -> None:
    error = EngineBuildError("tensorrt could not build m.onnx", ["a\n  b", "c", "d", "e"])
    assert str(error) == "tensorrt could not build m.onnx: a b; c; d; and 1 more" and error.errors[0] == "a b"


def test_trtexec_command_for_standard_tensorrt_is_strongly_typed_and_relative() -> None:
    spec = EngineSpec("/b/m.onnx", "/b/out dir/m.engine", PROFILES, precision="fp16")
    cmd = trtexec_command(spec, Flavour("tensorrt", None, "10.3.0"), ["8.7"], base=Path("/b"))
    assert cmd.startswith("trtexec --onnx=m.onnx '--saveEngine=out dir/m.engine'")
    for part in ("--minShapes=x:1x4x16", "--optShapes=x:1x8x16", "--maxShapes=x:1x64x16", "--stronglyTyped", "--skipInference"):
        assert part in cmd
    assert "--fp16" not in cmd and "--layerPrecisions" not in cmd and "--computeCapabilities" not in cmd
    assert "/b/m.onnx" in trtexec_command(spec, Flavour("tensorrt", None, "10.3.0"))  # no base: as given


def test_trtexec_command_for_rtx_has_shapes_and_targets_but_no_precision_flags() -> None:
    spec = EngineSpec("m.onnx", "m.engine", PROFILES, precision="fp16", compute_capabilities=("8.6", "12.0"))
    cmd = trtexec_command(spec, Flavour("tensorrt-rtx", None, "1.7.1"))
    assert cmd.startswith("tensorrt_rtx --onnx=m.onnx --saveEngine=m.engine")
    assert "--minShapes=x:1x4x16 --optShapes=x:1x8x16 --maxShapes=x:1x64x16" in cmd
    assert "--computeCapabilities=86,120" in cmd and "--fp16" not in cmd and "--stronglyTyped" not in cmd
    current = EngineSpec("m.onnx", "m.engine", PROFILES, compute_capabilities=("current",))
    assert "--computeCapabilities=89 " in trtexec_command(current, Flavour("tensorrt-rtx", None, "1.7.1"), ["8.9"])
    assert "--computeCapabilities" not in trtexec_command(current, Flavour("tensorrt-rtx", None, "1.7.1"), ["current"])


# --- real TensorRT-RTX builds ---------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_builds_the_toy_for_ampere_and_blackwell(
    rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path, precision: str
) -> None:
    spec = EngineSpec(toy_onnx[precision], tmp_path / "engines" / "toy.engine", PROFILES, precision, ("8.6", "12.0"))
    lines: list[str] = []
    report = build_engine(spec, rtx, log=lines.append)
    data = spec.engine_path.read_bytes()
    assert report["parser_errors"] == 0 and report["flavour"] == "tensorrt-rtx"  # the parser's count (an error stops the build)
    assert report["bytes"] == len(data) > 0 and report["sha256"] == hashlib.sha256(data).hexdigest()
    dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    assert report["inputs"] == [{"name": "x", "dtype": dtype, "shape": [1, -1, 16]}]
    assert report["outputs"] == [{"name": "updated", "dtype": dtype, "shape": [1, -1, 16]},
                                 {"name": "merged", "dtype": dtype, "shape": [1, 4, 16]}]
    assert report["compute_capabilities"] == ["8.6", "12.0"] and report["precision"] == precision
    assert "--maxShapes=x:1x64x16" in report["trtexec"] and "--computeCapabilities=86,120" in report["trtexec"]
    assert [p.name for p in spec.engine_path.parent.iterdir()] == ["toy.engine"]  # no temp file left


def _assert_nothing_written(engine: Path) -> None:
    assert not engine.exists() and not list(engine.parent.glob(f".{engine.name}*"))


def test_truncated_onnx_raises_and_writes_nothing(rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(toy_onnx["fp32"].read_bytes()[:200])
    engine = tmp_path / "broken.engine"
    with pytest.raises(EngineBuildError, match="could not parse") as info:
        build_engine(EngineSpec(broken, engine, PROFILES), rtx, log=lambda m: None)
    assert info.value.errors
    _assert_nothing_written(engine)


def _scatter_add(tmp_path: Path) -> Path:
    """A valid ONNX model TensorRT cannot parse: ScatterElements with reduction="add"."""
    from onnx import TensorProto
    from onnx.helper import make_node, make_tensor_value_info as value

    return _onnx_model(
        tmp_path / "scatter_add.onnx",
        make_node("ScatterElements", ["data", "idx", "upd"], ["y"], axis=1, reduction="add", name="scatter"),
        [value("data", TensorProto.FLOAT, [1, 4]), value("idx", TensorProto.INT64, [1, 3]),
         value("upd", TensorProto.FLOAT, [1, 3])],
        [value("y", TensorProto.FLOAT, [1, 4])],
    )


def test_scatter_with_reduction_is_a_parser_error(rtx: Flavour, tmp_path: Path) -> None:
    """The error lists exactly what TensorRT's own parser reports for the model (asked here directly)."""
    onnx_path = _scatter_add(tmp_path)
    trt = rtx.module
    builder = trt.Builder(trtlib.logger(trt, rtx.name))
    network = builder.create_network(0)  # kept alive while the parser is (TensorRT does not own it)
    parser = trt.OnnxParser(network, builder.logger)
    assert not parser.parse_from_file(str(onnx_path)) and parser.num_errors >= 1
    reported = [(" ".join(e.desc().split()), e.func()) for e in map(parser.get_error, range(parser.num_errors))]
    with pytest.raises(EngineBuildError, match="could not parse") as info:
        build_engine(EngineSpec(onnx_path, tmp_path / "s.engine"), rtx, log=lambda m: None)
    errors = info.value.errors
    assert len(errors) == len(reported) and all(d in e and f"[{f}]" in e for (d, f), e in zip(reported, errors))
    assert "Unsupported reduction type [importScatterElements]" in str(info.value)
    _assert_nothing_written(tmp_path / "s.engine")


class _ParserSays:
    """A real ONNX parser whose outcome is replaced: `parse_from_file` returns `ok`, and `errors` are its errors."""

    def __init__(self, real: object, ok: bool, errors: list[str]) -> None:
        self.real, self.ok, self.errors = real, ok, errors

    def parse_from_file(self, path: str) -> bool:
        self.real.parse_from_file(path)  # the network is really parsed
        return self.ok

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(node=lambda: 2, node_name=lambda: "n2", node_operator=lambda: "TopK",
                               desc=lambda: self.errors[i], func=lambda: "parseNode")


@pytest.mark.parametrize(("ok", "errors", "expected"), [
    (True, ["an error beside a successful parse"], "node 2 n2 (TopK): an error beside a successful parse [parseNode]"),
    (False, [], "the parser failed without reporting an error"),
    (True, [], None),  # the parser's own count is what the report records
])
def test_the_parser_decides_and_every_error_of_it_stops_the_build(
    rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path, ok: bool, errors: list[str], expected: str | None
) -> None:
    def parser(network: object, logger: object) -> _ParserSays:
        return _ParserSays(rtx.module.OnnxParser(network, logger), ok, errors)

    module = _Wrapped(rtx.module, OnnxParser=parser)
    flavour = Flavour("tensorrt-rtx", module, rtx.version)
    spec = EngineSpec(toy_onnx["fp32"], tmp_path / "toy.engine", PROFILES, compute_capabilities=("8.6",))
    if expected is None:
        assert build_engine(spec, flavour, log=lambda m: None)["parser_errors"] == 0
        return
    with pytest.raises(EngineBuildError, match="could not parse") as info:
        build_engine(spec, flavour, log=lambda m: None)
    assert info.value.errors == [expected]
    _assert_nothing_written(spec.engine_path)


def test_builder_errors_are_reported(rtx: Flavour, tmp_path: Path) -> None:
    """TopK with K over TensorRT's limit parses but fails to build; the builder's message is kept."""
    from onnx import TensorProto
    from onnx.helper import make_node, make_tensor, make_tensor_value_info as value

    onnx_path = _onnx_model(
        tmp_path / "topk.onnx",
        make_node("TopK", ["x", "k"], ["v", "i"], axis=-1),
        [value("x", TensorProto.FLOAT, [1, 5000])],
        [value("v", TensorProto.FLOAT, [1, 4000]), value("i", TensorProto.INT64, [1, 4000])],
        initializers=(make_tensor("k", TensorProto.INT64, [1], [4000]),),  # a constant K
    )
    with pytest.raises(EngineBuildError, match="could not build") as info:
        build_engine(EngineSpec(onnx_path, tmp_path / "t.engine"), rtx, log=lambda m: None)
    assert any("3840" in e for e in info.value.errors)
    _assert_nothing_written(tmp_path / "t.engine")


@pytest.mark.parametrize(
    ("precision", "profiles", "message"),
    [
        ("fp16", PROFILES, "strongly typed"),  # an fp32 ONNX cannot make an fp16 RTX engine
        ("fp32", {"y": SEQ}, "unknown input 'y'"),
        ("fp32", {}, "no profile"),
        ("fp32", {"x": ((1, 4, 8), (1, 8, 8), (1, 64, 8))}, "does not fit"),
    ],
)
def test_mismatches_with_the_network_raise_before_building(
    rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path, precision: str, profiles: dict, message: str
) -> None:
    engine = tmp_path / "m.engine"
    with pytest.raises(EngineBuildError, match=message):
        build_engine(EngineSpec(toy_onnx["fp32"], engine, profiles, precision), rtx, log=lambda m: None)
    _assert_nothing_written(engine)


def test_unknown_compute_capability_lists_the_known_ones(
    rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path
) -> None:
    spec = EngineSpec(toy_onnx["fp32"], tmp_path / "m.engine", PROFILES, compute_capabilities=("9.0",))
    with pytest.raises(EngineBuildError, match=r"cannot target \['9.0'\].*'8.6'"):
        build_engine(spec, rtx, log=lambda m: None)


def test_standard_tensorrt_path_builds_strongly_typed(rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path) -> None:
    """The standard-TensorRT code path (STRONGLY_TYPED network flag, no builder precision flags, no targets),
    run through TensorRT-RTX's bindings: an fp16 ONNX gives an fp16 engine; an fp32 ONNX cannot be built as fp16."""
    standard = Flavour("tensorrt", rtx.module, "10.13.0")
    lines: list[str] = []
    spec = EngineSpec(toy_onnx["fp16"], tmp_path / "toy.engine", PROFILES, "fp16", ("8.6",))
    report = build_engine(spec, standard, log=lines.append, base=toy_onnx["fp16"].parent)
    assert report["inputs"][0]["dtype"] == "float16" and report["outputs"][1]["dtype"] == "float16"
    assert report["compute_capabilities"] == ["local"]  # standard TensorRT builds for the local GPU (none here)
    args = shlex.split(report["trtexec"])
    assert args[:2] == ["trtexec", "--onnx=toy_fp16.onnx"] and "--stronglyTyped" in args and "--fp16" not in args
    assert any("compute capabilities ('8.6',) ignored" in line for line in lines)
    assert any("strongly typed fp16" in line for line in lines)
    with pytest.raises(EngineBuildError, match="builds strongly typed.*'float32'.*precision 'fp16'"):
        build_engine(EngineSpec(toy_onnx["fp32"], tmp_path / "m.engine", PROFILES, "fp16"), standard, log=lines.append)
    _assert_nothing_written(tmp_path / "m.engine")


def test_tensorrt_log_reaches_the_build_log(rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """What TensorRT logs during a build (here: its Builder, given the layer's logger) goes to build_engine's `log`
    (build.log), tagged with the flavour, warnings and errors only; after the build the logger writes to stderr again."""
    trt = rtx.module

    def chatty_builder(logger: object) -> object:
        for severity, message in (("WARNING", "a warning"), ("ERROR", "an error"), ("INFO", "chatter")):
            logger.log(getattr(trt.ILogger, severity), message)
        return trt.Builder(logger)

    flavour = Flavour("tensorrt-rtx", _Wrapped(trt, Builder=chatty_builder), rtx.version)
    lines: list[str] = []
    build_engine(EngineSpec(toy_onnx["fp32"], tmp_path / "toy.engine", PROFILES, compute_capabilities=("8.6",)), flavour,
                 log=lines.append)
    assert lines[:2] == ["[tensorrt-rtx] a warning", "[tensorrt-rtx] an error"] and not any("chatter" in x for x in lines)
    logger = trtlib.logger(trt, "tensorrt-rtx")
    assert logger.errors == ["an error"] and trtlib.last_error(logger, "none") == "an error"
    capsys.readouterr()
    logger.log(trt.ILogger.WARNING, "after the build")
    assert "[tensorrt-rtx] after the build" in capsys.readouterr().err and not any("after" in x for x in lines)


def test_rtx_engine_header_and_memory_mapped_loading(rtx: Flavour, toy_onnx: dict[str, Path], tmp_path: Path) -> None:
    """What runtime.backend_trt does before and while loading, against the real TensorRT-RTX runtime:
    get_engine_validity reads only the header (a zeroed one is MALFORMED_ENGINE; a good one is VALID on a
    GPU, INVALID with no diagnostic flag where there is none), and deserialize_cuda_engine takes the
    read-only memory map (no bytes copy) and returns None without a GPU rather than raising."""
    from runtime.backend_trt import _deserialize
    from runtime.device import driver

    trt = rtx.module
    engine = tmp_path / "toy.engine"
    build_engine(EngineSpec(toy_onnx["fp16"], engine, PROFILES, "fp16", ("8.6", "8.9", "12.0")), rtx, log=lambda m: None)
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    broken, flags = runtime.get_engine_validity(b"\0" * runtime.engine_header_size)
    assert broken == trt.EngineValidity.INVALID and int(flags) & int(trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    validity, diagnostics = runtime.get_engine_validity(engine.read_bytes()[: runtime.engine_header_size])
    gpu = driver()
    if gpu is None or gpu.devices == 0:
        assert (validity, int(diagnostics)) == (trt.EngineValidity.INVALID, 0)
        assert _deserialize(runtime, engine) is None
    elif gpu.compute_capability in ("8.6", "8.9", "12.0"):
        assert validity != trt.EngineValidity.INVALID
        assert _deserialize(runtime, engine) is not None
    else:
        assert int(diagnostics) & int(trt.EngineInvalidityDiagnostics.UNSUPPORTED_CC), (validity, diagnostics)
