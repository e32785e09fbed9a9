"""`python -m export.build` end to end on the tiny presets, and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.build import main
from runtime import names
from runtime.manifest import check_files, read, sha256_file
from tests.conftest import BUILDS, rtx_installed

FORBIDDEN_OPS = {"NonZero", "ScatterND", "Loop", "If", "Unique"}


requires_rtx = pytest.mark.skipif(not rtx_installed(), reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")


@requires_rtx
@pytest.mark.parametrize("name", list(BUILDS))
def test_build_holds_graphs_engines_and_passing_parity(build_dir, name):
    directory = build_dir(name)
    manifest = read(directory)
    check_files(directory, manifest["graphs"])
    check_files(directory, manifest["engines"])
    steps = len(manifest["schedule"]["language"])
    graphs = names.graph_names(steps, embed=True)  # the tiny presets' LM heads are untied
    assert list(manifest["graphs"]) == graphs and list(manifest["engines"]) == [g for g in graphs if g != "embed"]
    assert steps == (1 if "l" in BUILDS[name][1] else 0)
    parity = json.loads((directory / "parity.json").read_text())
    assert parity["passed"] and parity == manifest["parity"]
    assert parity["end_to_end"]["onnx_tokens"] == parity["end_to_end"]["torch_tokens"]
    assert parity["graphs"]["prefill"]["outputs"]["logits"]["max_abs"] <= 1e-4
    assert parity["graphs"]["decode"]["outputs"]["logits"]["max_abs"] <= 1e-4
    assert parity["graphs"]["vision"]["outputs"]["image_features"]["cosine"] >= 0.99999
    for engine in manifest["engines"].values():
        assert engine["parser_errors"] == 0 and engine["bytes"] > 0
        assert engine["sha256"] == sha256_file(directory / engine["file"])
    assert manifest["tensorrt"]["flavour"] == "tensorrt-rtx"
    assert list(manifest["tensorrt"]["trtexec"]) == list(manifest["engines"])


@pytest.mark.parametrize("name", list(BUILDS))
def test_graphs_use_only_static_friendly_operators(build_dir, name):
    for graph in read(build_dir(name))["graphs"]:
        model = onnx.load(str(build_dir(name) / f"{graph}.onnx"))
        ops = {node.op_type for node in model.graph.node}
        assert not ops & FORBIDDEN_OPS, (graph, ops & FORBIDDEN_OPS)
        for node in model.graph.node:
            if node.op_type.startswith("Scatter"):
                assert all(a.name != "reduction" or a.s in (b"", b"none") for a in node.attribute), node.name


def test_token_counts_follow_the_schedule(build_dir):
    schedule = read(build_dir("1.5-vl"))["schedule"]
    assert schedule["kept_per_crop"] == 288 and schedule["visual_tokens"] == 288  # sqrt(0.25) * 576
    assert schedule["language"] == [[4, 288, 144]]
    graphs = read(build_dir("1.5-vl"))["graphs"]
    assert graphs["vision"]["outputs"][0]["shape"] == [288, 128]  # [n, D], laid out
    first = {o["name"] for o in graphs["decoder.0"]["outputs"]}
    second = {o["name"] for o in graphs["decoder.1"]["outputs"]}
    assert {"present.4.key", "attended", "attention"} <= first and "present.5.key" not in first
    assert {"present.5.key", "logits"} <= second and "present.4.key" not in second  # split at the FiCoCo-L layer
    next_schedule = read(build_dir("next-v"))["schedule"]
    assert (next_schedule["crops"], next_schedule["grid"]) == (5, [2, 2])
    assert next_schedule["visual_tokens"] == 288 * 5 + 2  # base + 4 crops, one newline per row of crops


def test_verify_reruns_on_an_existing_build(build_dir, preset_dirs, capsys):
    """The manifest names the model without a local path, so a checkpoint directory is given again and
    must be the one the build was made from."""
    from export.verify import main as verify_main

    build = build_dir("1.5-l")
    assert verify_main([str(build)]) == 2 and "pass --model DIR" in capsys.readouterr().err
    assert verify_main([str(build), "--model", str(preset_dirs["tiny-llava-next"])]) == 2
    assert "not the one this build was made from" in capsys.readouterr().err
    assert verify_main([str(build), "--model", str(preset_dirs["tiny-llava-1.5"])]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_bf16_needs_no_verify(tmp_path, capsys):
    """ONNX Runtime's CPU provider has no bf16 kernels: a bf16 build without --no-verify is refused up front."""
    out = tmp_path / "bf16"
    assert main(["--ratio", "0.5", "--precision", "bf16", "--backend", "none", "--out", str(out)]) == 2
    assert "add --no-verify" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_bf16_builds_with_no_verify_and_says_so(tmp_path, capsys):
    """The README's bf16 recipe (about a minute: a whole export, so run with -m slow)."""
    out = tmp_path / "bf16"
    assert main(["--ratio", "0.5", "--precision", "bf16", "--no-verify", "--backend", "none", "--out", str(out)]) == 0
    manifest = read(out)
    assert manifest["parity"] is None and not (out / "parity.json").exists()
    assert "NOT VERIFIED" in capsys.readouterr().out
    graph = onnx.load(str(out / "decoder.0.onnx"), load_external_data=False)
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.graph.initializer)


@requires_rtx
def test_from_onnx_compiles_without_torch(build_dir, tmp_path):
    """The Jetson flow: engines from an existing build's ONNX, with neither torch nor transformers imported."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(build_dir("1.5-v"), copy)
    for engine in copy.glob("*.engine"):
        engine.unlink()
    code = ("import sys; from export.build import main; rc = main(['--from-onnx', sys.argv[1], '--backend', 'tensorrt-rtx']);"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr
    check_files(copy, read(copy)["engines"])


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir", "--ratio", "0.5"], "is neither a preset"),
        (["--ratio", "1.5"], r"ratio must be in \(0, 1\], got ratio=1.5"),
        (["--ratio", "0"], "got ratio=0"),
        (["--tokens", "600"], "tokens=600 is more than the 576"),
        (["--ratio", "0.5", "--backend", "tensorrt"], "ficoco-edge\\[trt\\]"),
        (["--ratio", "0.5", "--grid", "3x3", "--model", "tiny-llava-next"], "--grid 3x3 is not one of"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, capsys, tmp_path):
    out = tmp_path / "build"
    code, err = run_cli([*args, "--out", str(out), "--backend", "none"] if "--backend" not in args else [*args, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=8)).save_pretrained(tmp_path / "llama")
    code, err = run_cli(["--model", str(tmp_path / "llama"), "--ratio", "0.5", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "unsupported architecture LlamaForCausalLM" in err


def test_refuses_to_overwrite_a_directory_that_is_not_a_build(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, err = run_cli(["--ratio", "0.5", "--out", str(tmp_path)], capsys)
    assert code == 2 and "is not an export.build directory" in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@requires_rtx
def test_from_onnx_rejects_missing_or_altered_graphs(build_dir, tmp_path, capsys):
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(build_dir("1.5-v"), altered)
    with open(altered / "decoder.0.onnx", "ab") as handle:
        handle.write(b"\0")
    code, err = run_cli(["--from-onnx", str(altered), "--backend", "tensorrt-rtx"], capsys)
    assert code == 2 and "decoder.0.onnx" in err and "sha256" in err
    (altered / "vision.onnx").unlink()
    code, err = run_cli(["--from-onnx", str(altered), "--backend", "tensorrt-rtx"], capsys)
    assert code == 2 and "vision.onnx" in err and "missing" in err


def test_tflops_budget_resolves_to_the_most_tokens_that_fit(tiny):
    """--tflops B keeps the largest per-crop token count whose prefill (ficoco.flops convention) fits B."""
    from export.pipeline import resolve_budget
    from export.request import BuildRequest
    from ficoco.flops import prefill_flops, text_of

    model = tiny["tiny-llava-1.5"][0]
    resolved = resolve_budget(model, BuildRequest(tflops=0.002))
    text = text_of(model.config.text_config.to_dict())
    assert resolved.tflops is None and 1 <= resolved.tokens < 576
    assert prefill_flops(text, 60, resolved.tokens, {}) <= 0.002e12 < prefill_flops(text, 60, resolved.tokens + 1, {})
    with pytest.raises(ValueError, match="exactly one of --ratio, --tokens and --tflops"):
        BuildRequest(tflops=0.002, ratio=0.5)
