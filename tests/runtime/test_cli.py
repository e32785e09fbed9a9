"""`python -m runtime.generate` and the Pipeline API: output, streaming, sampling, bad input, no writes, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from runtime import backend as backend_module
from runtime import names
from runtime.backend import has_module
from runtime.generate import main
from runtime.manifest import sha256_file
from runtime.pipeline import Pipeline
from runtime.prompt import PromptError

from .conftest import tree_digest

REPO = Path(__file__).resolve().parents[2]
BUILD = "1.5-vl"  # FiCoCo-V and -L: visual tokens change at both stages


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "runtime.generate", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)


def test_json_fields_are_present_and_consistent(build_dir, photo_files) -> None:
    build = build_dir(BUILD)
    before = tree_digest(build)
    run = cli("--engine-dir", str(build), "--image", str(photo_files["astronaut"]), "--prompt", "Describe the image.",
              "--max-new-tokens", "12", "--json")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert tree_digest(build) == before, "the runtime wrote into the build directory"
    tokens, timings = record["tokens"], record["timings"]
    assert set(tokens) == {"patches_per_crop", "kept_per_crop", "crops", "into_llm", "after_ficoco_l", "text_before",
                           "text_after", "prompt", "generated"}
    assert tokens["patches_per_crop"] == 576 and tokens["kept_per_crop"] == 288 and tokens["crops"] == 1
    assert tokens["into_llm"] == 288 and tokens["after_ficoco_l"] == 144
    assert tokens["prompt"] == tokens["text_before"] + tokens["into_llm"] + tokens["text_after"]
    assert tokens["generated"] == len(record["token_ids"]) <= 12
    # The stop reason against the model's own EOS ids (the build's copy of generation_config.json, not the manifest):
    # generation stops right after the first EOS, else at 12 tokens.
    eos = json.loads((build / "generation_config.json").read_text())["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = record["token_ids"]
    assert 1 <= len(ids) and not eos & set(ids[:-1])
    assert record["stop_reason"] == ("eos" if ids[-1] in eos else "length")
    assert record["stop_reason"] == "eos" or len(ids) == 12
    assert len(record["cache_lengths"]) == 8 and max(record["cache_lengths"]) == tokens["prompt"]
    assert min(record["cache_lengths"]) == tokens["prompt"] - 144
    for key in ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "time_to_first_token_ms", "total_ms", "peak_rss_mb"):
        assert timings[key] >= 0, key
    assert timings["time_to_first_token_ms"] <= timings["total_ms"]
    assert timings["preprocess_ms"] + timings["vision_ms"] + timings["prefill_ms"] <= timings["time_to_first_token_ms"] + 1e-6
    if tokens["generated"] > 1:
        expected = (tokens["generated"] - 1) / timings["decode_ms"] * 1e3
        assert timings["decode_tokens_per_s"] == pytest.approx(expected)
    assert record["backend"].startswith("onnxruntime") and record["text"] == record["text"].strip("\n")


def test_stream_prints_the_same_answer(build_dir, photo_files) -> None:
    build = build_dir(BUILD)
    args = ("--engine-dir", str(build), "--image", str(photo_files["coffee"]), "--prompt", "What is this?", "--max-new-tokens", "10")
    plain, streamed, both = cli(*args), cli(*args, "--stream"), cli(*args, "--stream", "--json")
    assert plain.returncode == streamed.returncode == both.returncode == 0, plain.stderr + streamed.stderr + both.stderr
    assert streamed.stdout == plain.stdout
    record = json.loads(both.stdout)  # stdout stays one JSON object; the stream went to stderr
    assert both.stderr == record["text"] + "\n" == plain.stdout


def test_pipeline_reuse_sampling_seed_and_stream(build_dir, photo_files) -> None:
    with Pipeline.from_build(build_dir(BUILD), backend="onnxruntime") as pipe:
        first = pipe(photo_files["astronaut"], "Describe the image.", max_new_tokens=10)
        other = pipe(Image.open(photo_files["coffee"]), "Describe the image.", max_new_tokens=10)
        again = pipe(photo_files["astronaut"], "Describe the image.", max_new_tokens=10)
        assert again.token_ids == first.token_ids and again.cache_lengths == first.cache_lengths
        assert other.tokens == first.tokens
        sampled = [pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=16, temperature=1.5, top_k=100,
                        top_p=0.95, seed=seed).token_ids for seed in (11, 11, 12)]
        assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
        pieces: list[str] = []
        result = pipe(photo_files["coffee"], "Describe the image.", max_new_tokens=16, temperature=1.5, seed=3,
                      on_text=pieces.append)
        assert "".join(pieces) == result.text and len(pieces) > 1


def bad_manifest(build: Path, tmp_path: Path, change: str) -> Path:
    copy = tmp_path / "build"
    shutil.copytree(build, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if change == "missing":
        (copy / "manifest.json").unlink()
    elif change == "schema":
        manifest["schema_version"] = 99
    elif change == "sha256":
        data = (copy / "decoder.0.onnx").read_bytes()
        (copy / "decoder.0.onnx").write_bytes(data[: len(data) // 2])
    elif change == "no-engines":  # what `export.build --backend none` writes
        for engine in copy.glob("*.engine"):
            engine.unlink()
        manifest["engines"], manifest["tensorrt"] = {}, None
    elif change in ("tensorrt", "tensorrt-rtx"):  # engines present, so the flavour's module is needed
        graphs = [g for g in manifest["graphs"] if g != names.EMBED]  # vision, decoder.0, reduce.1, decoder.1, ...
        for graph in graphs:
            (copy / f"{graph}.engine").write_bytes(b"not an engine")
        manifest["engines"] = {g: {"file": f"{g}.engine", "sha256": sha256_file(copy / f"{g}.engine")} for g in graphs}
        manifest["tensorrt"] = {"flavour": change, "version": "0"}
    if change != "missing":
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def one_line_error(capsys: pytest.CaptureFixture, args: list[str], *expected: str) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "thin"])
def test_bad_image_is_one_line_exit_2(case: str, build_dir, tmp_path: Path, capsys, photo_files) -> None:
    path = tmp_path / f"{case}.png"
    if case == "truncated":
        data = photo_files["coffee"].read_bytes()
        path = tmp_path / "truncated.jpg"
        path.write_bytes(data[: len(data) // 3])
    elif case == "text":
        path.write_text("not an image\n")
    elif case == "thin":  # resizing its short side to 336 px would need a 134400000x336 image
        Image.new("RGB", (400000, 1)).save(path)
    expected = "400000x1" if case == "thin" else path.name
    one_line_error(capsys, ["--engine-dir", str(build_dir(BUILD)), "--image", str(path), "--prompt", "Hi"], expected)


@pytest.mark.parametrize("prompt, max_new, expected", [
    ("", "8", "prompt is empty"), ("   \n", "8", "prompt is empty"), ("look: <image>", "8", "must not contain the image token"),
    ("Describe the image.", "2000", "max_seq_len 2048"), ("Describe the image.", "0", "max_new_tokens must be"),
])
def test_bad_prompt_is_one_line_exit_2(prompt: str, max_new: str, expected: str, build_dir, capsys, photo_files) -> None:
    image = str(photo_files["coffee"])
    args = ["--engine-dir", str(build_dir(BUILD)), "--image", image, "--prompt", prompt, "--max-new-tokens", max_new]
    one_line_error(capsys, args, expected)


def test_too_long_prompt_names_the_numbers(build_dir) -> None:
    with Pipeline.from_build(build_dir(BUILD), backend="onnxruntime") as pipe:
        with pytest.raises(PromptError, match=r"\+ 288 visual \+ .* = \d+ > max_seq_len 2048"):
            pipe.prepare(Image.new("RGB", (64, 64)), "word " * 1500, 8)


@pytest.mark.parametrize("change, expected", [
    ("missing", "has no manifest.json"), ("schema", "schema version 99"), ("sha256", "fails its sha256"),
])
def test_bad_build_is_one_line_exit_2(change: str, expected: str, build_dir, tmp_path: Path, capsys, photo_files) -> None:
    build = bad_manifest(build_dir(BUILD), tmp_path, change)
    one_line_error(capsys, ["--engine-dir", str(build), "--image", str(photo_files["coffee"]), "--prompt", "Hi"], expected)


def test_missing_build_dir_and_no_engines(build_dir, tmp_path: Path, capsys, photo_files) -> None:
    image = str(photo_files["coffee"])
    one_line_error(capsys, ["--engine-dir", str(tmp_path / "nope"), "--image", image, "--prompt", "Hi"], "does not exist")
    plain = bad_manifest(build_dir(BUILD), tmp_path, "no-engines")
    args = ["--engine-dir", str(plain), "--image", image, "--prompt", "Hi", "--backend", "tensorrt"]
    one_line_error(capsys, args, "has no TensorRT engines", "--from-onnx")


@pytest.mark.skipif(has_module("tensorrt"), reason="standard TensorRT is installed here")
def test_tensorrt_not_installed_names_the_extra(build_dir, tmp_path: Path, capsys, photo_files) -> None:
    build = bad_manifest(build_dir(BUILD), tmp_path, "tensorrt")
    args = ["--engine-dir", str(build), "--image", str(photo_files["coffee"]), "--prompt", "Hi", "--backend", "tensorrt"]
    one_line_error(capsys, args, "ficoco-edge[trt]")
    assert main([*args[:-2], "--backend", "auto", "--max-new-tokens", "2"]) == 0  # auto falls back to ONNX Runtime


@pytest.mark.skipif(backend_module.cuda_devices() > 0, reason="a CUDA device is present")
def test_tensorrt_without_a_gpu_is_one_line(build_dir, tmp_path: Path, capsys, photo_files) -> None:
    build = bad_manifest(build_dir(BUILD), tmp_path, "tensorrt-rtx")
    args = ["--engine-dir", str(build), "--image", str(photo_files["coffee"]), "--prompt", "Hi", "--backend", "tensorrt"]
    one_line_error(capsys, args, "ficoco-edge[rtx]" if not has_module("tensorrt_rtx_bindings") else "no CUDA device")


def test_onnxruntime_not_installed_names_the_extra(build_dir, capsys, monkeypatch, photo_files) -> None:
    monkeypatch.setattr(backend_module, "has_module", lambda name: name != "onnxruntime")
    image = str(photo_files["coffee"])
    args = ["--engine-dir", str(build_dir(BUILD)), "--image", image, "--prompt", "Hi", "--backend", "onnxruntime"]
    one_line_error(capsys, args, "ficoco-edge[gpu]")


def test_runtime_imports_neither_torch_nor_transformers(build_dir, photo_files) -> None:
    """Importing, and running a whole generation, loads no torch / transformers."""
    script = (
        "import sys, runtime, runtime.generate, runtime.pipeline, runtime.bench\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'import'\n"
        f"code = runtime.generate.main(['--engine-dir', {str(build_dir(BUILD))!r}, '--image', {str(photo_files['coffee'])!r},"
        " '--prompt', 'Hi', '--max-new-tokens', '3'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'torchvision')))\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
