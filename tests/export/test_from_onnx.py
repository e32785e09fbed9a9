"""`python -m export.build --from-onnx`: what it records, that it replaces a build whole or not at all, and its targets.

The builds need TensorRT-RTX (the `rtx` extra) and skip without it. Building for the current GPU
(ComputeCapability.CURRENT) needs a GPU; here its target choice and record are checked with a stand-in driver.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from export import from_onnx
from export.build import main
from export.engine import CURRENT, EngineBuildError, EngineSpec, Flavour, _apply_compute_capabilities, trtexec_command
from runtime.device import Driver
from runtime.manifest import BuildError, check_files, read
from tests.conftest import rtx_installed
from tests.runtime.conftest import tree_digest

requires_rtx = pytest.mark.skipif(not rtx_installed(), reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")


def _copy(build: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "build"
    shutil.copytree(build, copy)
    return copy


@requires_rtx
def test_from_onnx_records_targets_version_and_commands_that_run_from_the_build(build_dir, tmp_path: Path) -> None:
    copy = _copy(build_dir("1.5-v"), tmp_path)
    stale = read(copy)["memory"]["engine_bytes"]  # the build's engines: for RTX's default targets, not 8.9 alone
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["--from-onnx", str(copy), "--backend", "tensorrt-rtx", "--compute-capability", "8.9"]) == 0
    manifest = read(copy)
    check_files(copy, manifest["engines"])
    engine_bytes = {graph: entry["bytes"] for graph, entry in manifest["engines"].items()}
    assert stale != engine_bytes and manifest["memory"]["engine_bytes"] == engine_bytes  # the memory plan's: these engines
    assert f"(total {sum(engine_bytes.values()) / 2**20:.1f}," in "".join(manifest["memory"]["lines"])
    section = manifest["tensorrt"]
    import tensorrt_rtx_bindings

    assert section["flavour"] == "tensorrt-rtx" and section["version"] == tensorrt_rtx_bindings.__version__
    assert section["compute_capabilities"] == ["8.9"] and section["trtexec_cwd"] == "."
    for graph, command in section["trtexec"].items():
        args = shlex.split(command)
        assert args[0] == "tensorrt_rtx" and "--computeCapabilities=89" in args, command
        onnx = next(a.split("=", 1)[1] for a in args if a.startswith("--onnx="))
        engine = next(a.split("=", 1)[1] for a in args if a.startswith("--saveEngine="))
        assert (onnx, engine) == (manifest["graphs"][graph]["file"], f"{graph}.engine")  # relative to the build
        assert (copy / onnx).is_file() and (copy / engine).is_file()
    log = (copy / "build.log").read_text()
    assert "# --from-onnx" in log and "[tensorrt-rtx] strongly typed fp32" in log and "built in" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"], "the workspace is gone"
    assert "engine vision (tensorrt-rtx)" in out.getvalue()


@requires_rtx
def test_a_failed_from_onnx_changes_nothing(build_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """The second engine fails: the first one was already written, but only inside the workspace."""
    copy = _copy(build_dir("1.5-v"), tmp_path)
    before = tree_digest(copy)
    built = []
    real = from_onnx.build_engine

    def second_fails(spec, flavour, log, base):
        if built:
            raise EngineBuildError(f"{flavour.name} could not build {spec.onnx_path}", ["a builder error\nover two lines"])
        built.append(spec.engine_path)
        return real(spec, flavour, log=log, base=base)

    monkeypatch.setattr(from_onnx, "build_engine", second_fails)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--from-onnx", str(copy), "--backend", "tensorrt-rtx", "--compute-capability", "8.6"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "could not build" in err and "a builder error over two lines" in err
    assert built and built[0].parent != copy, "engines are written in the workspace, not the build"
    assert tree_digest(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"], "the workspace is gone"


def test_the_memory_plan_is_the_builds_own_also_without_onnx(build_dir, tmp_path, monkeypatch) -> None:
    """from_onnx.memory_plan (what a build and --from-onnx write) gives back the build's memory section from the
    build alone (its copy of config.json), also without onnx (a device's runtime install: the weights the build
    measured); None without config.json."""
    from export import memory as export_memory

    copy = _copy(build_dir("1.5-v"), tmp_path)
    manifest = read(copy)
    assert json.loads(json.dumps(from_onnx.memory_plan(copy, manifest))) == manifest["memory"]  # as the manifest holds it
    real = export_memory.importlib.util.find_spec
    monkeypatch.setattr(export_memory.importlib.util, "find_spec", lambda name: None if name == "onnx" else real(name))
    monkeypatch.setattr(export_memory, "initializer_bytes", lambda path: pytest.fail("onnx is not installed here"))
    assert json.loads(json.dumps(from_onnx.memory_plan(copy, manifest))) == manifest["memory"]  # no onnx here
    monkeypatch.undo()
    older = {**manifest, "tokenizer": {**manifest["tokenizer"],
                                       "files": [f for f in manifest["tokenizer"]["files"] if f["file"] != "config.json"]}}
    assert from_onnx.memory_plan(copy, older) is None
    (copy / "config.json").write_text("{}")
    with pytest.raises(BuildError, match="config.json.*sha256"):
        from_onnx.memory_plan(copy, manifest)


def test_rtx_targets_the_gpu_it_runs_on(monkeypatch) -> None:
    """No --compute-capability: the current GPU where one is visible (recorded as its actual compute capability),
    else RTX's default set, with a note."""
    rtx = Flavour("tensorrt-rtx", SimpleNamespace(ComputeCapability=SimpleNamespace(CURRENT="CURRENT", SM86="SM86")), "1.7.1")
    notes: list[str] = []
    monkeypatch.setattr(from_onnx, "driver", lambda: None)
    assert from_onnx.device_targets(rtx, notes.append) == ("8.6", "8.9", "12.0") and "no GPU visible" in notes[0]
    monkeypatch.setattr(from_onnx, "driver", lambda: Driver(13000, 1, "8.9"))
    assert from_onnx.device_targets(rtx, notes.append) == (CURRENT,)
    assert from_onnx.device_targets(Flavour("tensorrt", None, "10.3.0")) == ()  # standard TensorRT: the local GPU anyway

    import export.engine as engine_module

    monkeypatch.setattr(engine_module, "driver", lambda: Driver(13000, 1, "8.9"))
    calls: list = []
    config = SimpleNamespace(num_compute_capabilities=0, set_compute_capability=lambda cc, i: calls.append((cc, i)) or True)
    spec = EngineSpec("m.onnx", "m.engine", compute_capabilities=(CURRENT,))
    targets = _apply_compute_capabilities(rtx, config, spec, log=notes.append)
    assert targets == ["8.9"] and calls == [("CURRENT", 0)] and config.num_compute_capabilities == 1
    assert "--computeCapabilities=89" in trtexec_command(spec, rtx, targets)
    assert _apply_compute_capabilities(Flavour("tensorrt", None, "10.3.0"), config, EngineSpec("m.onnx", "m.engine"),
                                       log=notes.append) == ["8.9"]  # standard TensorRT records the local GPU
