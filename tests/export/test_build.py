"""`python -m export.build` end to end on the tiny presets, and its bad inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.build import main
from runtime import names
from ficoco.plan import BuildPlan
from runtime.manifest import Build, check_files, read, sha256_file
from tests.conftest import BUILDS, QUANT_BUILDS, rtx_installed

FORBIDDEN_OPS = {"NonZero", "ScatterND", "Loop", "If", "Unique"}


requires_rtx = pytest.mark.skipif(not rtx_installed(), reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")


@pytest.mark.parametrize("name", [*BUILDS, *QUANT_BUILDS])
def test_the_runtime_reads_back_the_plan_the_export_wrote(build_dir, quant_build_dir, name):
    """Build.plan is the manifest's schedule read back by BuildPlan.from_dict, and its counts are the export's
    (the graphs' I/O, the segments' cache inputs), not a second formula."""
    directory = quant_build_dir(name) if name in QUANT_BUILDS else build_dir(name)
    manifest, build = read(directory), Build.from_directory(directory)
    assert build.plan == BuildPlan.from_dict(manifest["schedule"]) and build.plan.to_dict() == manifest["schedule"]
    features = next(o for o in manifest["graphs"]["vision"]["outputs"] if o["name"] == names.IMAGE_FEATURES)
    assert features["shape"][0] == build.plan.visual_tokens
    for segment in build.plan.segments:
        inputs = {t["name"] for t in manifest["graphs"][names.decoder(segment.index)]["inputs"]}
        assert {n for n in inputs if n.startswith("past.")} == set(names.cache_names(names.past, segment.layers))
    removed = {"1.5-l": 288, "1.5-l-int4": 288, "1.5-vl": 144, "next-vl": 721}.get(name, 0)  # FiCoCo-L at layer 4 of 8
    longest = 4096 if name.startswith("next") else 2048  # the default --max-seq-len: 2882 (576) unreduced visual + 512
    assert build.plan.max_seq_len == longest and build.plan.capacities == (longest,) * 5 + (longest - removed,) * 3


@requires_rtx
@pytest.mark.parametrize("name", list(BUILDS))
def test_build_holds_graphs_engines_and_passing_parity(build_dir, name):
    directory = build_dir(name)
    manifest = read(directory)
    check_files(directory, manifest["graphs"])
    check_files(directory, manifest["engines"])
    steps = len(manifest["schedule"]["language"])
    llm = ["decoder.0", "reduce.1", "decoder.1"] if steps else ["decoder.0"]
    graphs = ["vision", "embed", *llm]  # the tiny presets' LM heads are untied
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
    from export.trace.verify import main as verify_main

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


def test_the_layout_keeps_torch_on_its_side():
    """export/ (but export/trace/), ficoco's algorithm, plan and analysis, and the runtime import with torch,
    transformers and Polygraphy blocked; export/trace/ does not."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(('torch', 'transformers', 'polygraphy')));"
    free = ("export.build", "export.from_onnx", "export.engine", "export.request", "export.report", "export.workspace",
            "export.memory", "export.gates", "export.quantize", "export.reload", "ficoco.plan", "ficoco.geometry",
            "ficoco.analysis.flops", "ficoco.analysis.memory", "runtime.chain", "runtime.backend_ort", "runtime.backend_trt")
    code = blocked + "import importlib; [importlib.import_module(m) for m in sys.argv[1:]]"
    run = subprocess.run([sys.executable, "-c", code, *free], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", code, "export.trace.graphs"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert run.returncode != 0 and "torch" in run.stderr  # the check can fail: the torch side needs torch


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
    """--tflops B keeps the largest per-crop token count whose prefill (ficoco.analysis.flops convention) fits B."""
    from export.request import BuildRequest, resolve_budget
    from ficoco.analysis.flops import prefill_flops, text_of

    model = tiny["tiny-llava-1.5"][0]
    resolved = resolve_budget(BuildRequest(tflops=0.002), model.config.to_dict(), None)
    text = text_of(model.config.text_config.to_dict())
    assert resolved.tflops is None and 1 <= resolved.tokens < 576
    assert prefill_flops(text, 60, resolved.tokens, {}) <= 0.002e12 < prefill_flops(text, 60, resolved.tokens + 1, {})
    with pytest.raises(ValueError, match="exactly one of --ratio, --tokens and --tflops"):
        BuildRequest(tflops=0.002, ratio=0.5)


# ------------------------------------------------------------------ what the build prints (no export)


def checked_plan(preset: str, request):
    """request.ModelCheck of `request` on a preset, from its config.json alone (as check_model resolves it)."""
    from export.request import ModelCheck
    from ficoco import plan
    from ficoco.models.presets import resolve_model_dir

    source = resolve_model_dir(preset)
    config = json.loads((source / "config.json").read_text())
    grid = request.grid if preset == "tiny-llava-next" else None
    return ModelCheck(source, request, None, plan(config, request.ficoco_config(), grid, request.max_seq_len or 2048), tied=False)


@pytest.mark.parametrize("preset, kwargs, engines, stages", [
    ("tiny-llava-1.5", dict(ratio=0.5), False, 6),  # load, patch, export vision, embed, decoder.0, verify
    ("tiny-llava-1.5", dict(variant="l", ratio=0.5), True, 12),  # + reduce.1, decoder.1; an engine for all but embed
    ("tiny-llava-1.5", dict(variant="l", ratio=0.5, weights="int4"), False, 10),  # + quantize, measure
    ("tiny-llava-1.5", dict(variant="l", ratio=0.5, weights="int4", verify=False), False, 8),  # quantize, no measure
    ("tiny-llava-next", dict(variant="none", verify=False), True, 7),
])
def test_every_stage_is_counted_before_the_first(preset, kwargs, engines, stages):
    from export.build import stage_count
    from export.request import BuildRequest

    assert stage_count(checked_plan(preset, BuildRequest(model=preset, **kwargs)), engines) == stages


def test_an_unreduced_build_names_no_ficoco_step():
    """--variant none: no "FiCoCo-NONE" stage and no "(FiCoCo-V)" on tokens FiCoCo-V never touched."""
    from export.build import patch_title
    from export.report import Progress, summary
    from export.request import BuildRequest

    flops = {"tflops": {"prefill": 1.0, "vision": 1.0}, "unreduced_tflops": {"prefill": 1.0}, "prefill_reduction": 1.0}
    lines = {}
    for variant, ratio in (("none", None), ("v", 0.5), ("l", 0.5)):
        plan = checked_plan("tiny-llava-1.5", BuildRequest(variant=variant, ratio=ratio)).plan
        progress = Progress(2, io.StringIO())
        progress.rows.append((patch_title(plan), 1.0))
        body = {"schedule": plan.to_dict(), "graphs": {}, "parity": None, "flops": flops}
        printed = summary(body, progress, Path("b")).splitlines()
        lines[variant] = [line for line in printed if "visual tokens" in line or "stages" in line]
    assert lines["none"] == ["  visual tokens: 1 crop(s), 576 per crop, 576 into the LLM",
                             "  stages: prepare the graphs, unreduced 1.0s"]
    assert lines["v"] == ["  visual tokens: 1 crop(s), 576 -> 288 per crop (FiCoCo-V), 288 into the LLM",
                          "  stages: patch FiCoCo-V 1.0s"]
    assert lines["l"][0] == "  visual tokens: 1 crop(s), 576 per crop, 576 into the LLM, 288 after layer 4 (FiCoCo-L)"


def test_the_longest_prompt_and_the_generated_tokens_must_fit_max_seq_len():
    """check_sequence at its boundary: text + the plan's visual tokens + generated tokens == --max-seq-len fits."""
    from export.request import BuildRequest, SequenceLengthError, check_sequence

    plan = checked_plan("tiny-llava-1.5", BuildRequest(ratio=0.5)).plan  # 288 visual tokens
    prompts = [(5, 6), (5, 18), (9, 3)]  # the longest: 23 text tokens
    check_sequence(23 + 288 + 32, plan, prompts, 32)
    check_sequence(23 + 288, plan, prompts, 0)
    with pytest.raises(SequenceLengthError, match=r"--max-seq-len 342 is shorter than the 343 tokens .* \(23 text \+ 288 "
                                                  r"visual\) \+ 32 tokens the verification generates; give --max-seq-len 343"):
        check_sequence(342, plan, prompts, 32)
    with pytest.raises(SequenceLengthError, match="the model has 300 positions: keep fewer visual tokens"):
        check_sequence(300, plan, prompts, 32, positions=300)
