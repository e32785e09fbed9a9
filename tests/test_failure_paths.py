"""Bad input to the runtime and to export.build's checks, generated per class (issue 12).

For every input: exit code 2 (0 where the damage is in something the run does not read), exactly one
line on stderr, and an unchanged file tree: the build (the runtime never writes), the model directory,
--out's parent and the temporary area beside it. Signals and the build's temporary directory are in
tests/export/test_interrupts.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from export.build import main as build_main
from runtime import names
from runtime.generate import main as runtime_main
from runtime.manifest import Build, BuildError, read
from tests.conftest import rtx_installed
from tests.failure import assert_one_line, flip_bit, random_bytes, run_main, snapshot, truncate

BUILD = "1.5-v"
UNREAD = ("parity.json", "build.log")  # files of a build the runtime never opens


@pytest.fixture(scope="module")
def image(tmp_path_factory, photo) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    photo.resize((160, 128)).save(path)
    return path


@pytest.fixture
def build_copy(build_dir, tmp_path) -> Path:
    """A private copy of the shared build, to damage."""
    return Path(shutil.copytree(build_dir(BUILD), tmp_path / "build"))


def run_runtime(build: Path, image: Path, *extra: str) -> tuple[int, str]:
    """runtime.generate in-process; asserts that the build is left exactly as it was."""
    before = snapshot(build)
    code, err = run_main(runtime_main, ["--engine-dir", str(build), "--image", str(image), "--prompt", "Hi",
                                        "--max-new-tokens", "1", *extra])
    assert snapshot(build) == before, "the runtime wrote into the build"
    return code, err


def sha_listed(build: Path) -> set[str]:
    """The files whose sha256 the ONNX Runtime path checks: graphs (and external data) and tokenizer files."""
    manifest = read(build)
    graphs = [item["file"] for entry in manifest["graphs"].values() for item in [entry, *entry.get("external_data", [])]]
    return {*graphs, *(item["file"] for item in manifest["tokenizer"]["files"])}


# ------------------------------------------------------------------ damaged files of a build


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_a_bit_flip_in_every_file_of_a_build(build_copy, image, verify):
    rng, checked = random.Random(12 + verify), sha_listed(build_copy)
    for path in sorted(build_copy.iterdir()):
        original = path.read_bytes()
        offset = flip_bit(path, rng)
        code, err = run_runtime(build_copy, image, *([] if verify else ["--no-verify"]))
        what = f"{path.name}: bit flip at byte {offset}"
        if verify and path.name in checked:
            assert_one_line(code, err, (2,), what)
            assert "sha256" in err and path.name in err, what
        elif path.name in UNREAD or path.suffix == ".engine":  # the ONNX Runtime path never reads these
            assert_one_line(code, err, (0,), what)
        else:  # manifest.json, and unverified files: refused, or harmless (a date, a weight)
            assert_one_line(code, err, (0, 2), what)
        if path.suffix == ".engine":
            with pytest.raises(BuildError, match="sha256"):
                Build.from_directory(build_copy).check("engines")
        path.write_bytes(original)


@pytest.mark.parametrize("damage", [truncate, random_bytes])
def test_truncated_or_random_files_of_a_build(build_copy, image, damage):
    rng, checked = random.Random(7), sha_listed(build_copy)
    for path in sorted(build_copy.iterdir()):
        original = path.read_bytes()
        detail = damage(path, rng)
        code, err = run_runtime(build_copy, image)
        refused = path.name in checked or path.name == "manifest.json"
        assert_one_line(code, err, (2,) if refused else (0,), f"{path.name}: {damage.__name__} ({detail})")
        path.write_bytes(original)


# ------------------------------------------------------------------ malformed manifests

DELETE = object()
BROKEN = {"deleted": DELETE, "null": None, "a string": "x", "negative": -1}
GRAPHS = (names.VISION, names.decoder(0))  # graphs every build has
# every manifest value the runtime relies on: any of BROKEN must be refused
RELIED_ON = [
    ("schema",), ("schema_version",), ("source",), ("source", "architecture"), ("source", "text"),
    *[("source", "text", key) for key in ("image_token_id", "eos_token_ids")],
    ("schedule",), *[("schedule", key) for key in ("language", "patches_per_crop", "kept_per_crop", "crops", "visual_tokens",
                                                   "max_seq_len", "segments", "text", "geometry")],
    *[("schedule", "text", key) for key in ("layers", "hidden", "kv_heads", "head_dim", "vocab")],
    ("precision",), ("preprocess",), ("preprocess", "crop_size"), ("preprocess", "size"),
    ("graphs",), *[("graphs", g) for g in GRAPHS], *[("graphs", g, key) for g in GRAPHS for key in ("file", "sha256")],
    ("embedding",), *[("embedding", key) for key in ("file", "offset", "shape", "dtype")],
    ("tokenizer",), ("tokenizer", "files"),
]


def shifted(manifest: dict) -> dict[str, tuple[tuple, object]]:
    """Plausible values that contradict the graphs or the build's other files: each must be refused."""
    text, schedule = manifest["source"]["text"], manifest["schedule"]
    crop = manifest["preprocess"]["crop_size"]
    cases = {f"text.{key}+1": (("schedule", "text", key), schedule["text"][key] + 1) for key in ("layers", "kv_heads", "head_dim", "vocab")}
    cases["image_token_id+vocab"] = (("source", "text", "image_token_id"), text["image_token_id"] + schedule["text"]["vocab"])
    cases |= {f"{key}+1": (("schedule", key), schedule[key] + 1) for key in ("kept_per_crop", "crops", "visual_tokens")}
    cases["a segment's capacity +1"] = (("schedule", "segments"), [[a, b, c + 1] for a, b, c in schedule["segments"]])
    cases |= {
        "another EOS": (("source", "text", "eos_token_ids"), [*text["eos_token_ids"], max(text["eos_token_ids"]) + 1]),
        "max_seq_len x2": (("schedule", "max_seq_len"), schedule["max_seq_len"] * 2),
        "max_seq_len -1": (("schedule", "max_seq_len"), schedule["max_seq_len"] - 1),
        "fp16": (("precision",), "fp16"),
        "crop height -1": (("preprocess", "crop_size"), {**crop, "height": crop["height"] - 1}),
        "LLaVA-NeXT": (("source", "architecture"), "LlavaNextForConditionalGeneration"),
        "sha256 zeros": (("graphs", "decoder.0", "sha256"), "0" * 64),
    }
    for label, name in (("parent", "../vision.onnx"), ("absolute", "/tmp/vision.onnx"), ("subdirectory", "sub/vision.onnx"), ("empty", "")):
        cases[f"{label} file name"] = (("graphs", "vision", "file"), name)
    return cases


def mutate(manifest: dict, path: tuple, value: object) -> dict:
    copy = json.loads(json.dumps(manifest))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


def leaf_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in leaf_paths(value, (*prefix, key))] or [prefix]
    if isinstance(node, list) and node:
        return [p for i, value in enumerate(node) for p in leaf_paths(value, (*prefix, i))]
    return [prefix]


def run_with_manifest(build: Path, image: Path, manifest: dict) -> tuple[int, str]:
    (build / "manifest.json").write_text(json.dumps(manifest))
    return run_runtime(build, image)


def test_malformed_manifests_are_refused(build_copy, image):
    manifest = read(build_copy)
    for path in RELIED_ON:
        for label, value in BROKEN.items():
            code, err = run_with_manifest(build_copy, image, mutate(manifest, path, value))
            assert_one_line(code, err, (2,), f"manifest {'.'.join(path)} {label}")
    for label, (path, value) in shifted(manifest).items():
        code, err = run_with_manifest(build_copy, image, mutate(manifest, path, value))
        assert_one_line(code, err, (2,), f"manifest {label}")


def test_random_manifest_damage_is_refused_or_harmless(build_copy, image):
    manifest, rng = read(build_copy), random.Random(3)
    values = [DELETE, None, "x", -1, 0, 0.5, True, 10**12, [], {}, [1, 2, 3], {"a": 1}]
    for path in rng.sample(leaf_paths(manifest), 20):
        value = rng.choice(values)
        if path == ():
            continue
        code, err = run_with_manifest(build_copy, image, mutate(manifest, path, value))
        assert_one_line(code, err, (0, 2), f"manifest {'.'.join(map(str, path))} = {value!r}")


@pytest.mark.parametrize("path, value", [
    (("graphs",), None), (("graphs", "decoder.0", "file"), "../../other/decoder.0.onnx"), (("schedule",), DELETE),
    (("schedule", "visual_tokens"), "x"), (("graphs", "decoder.0", "inputs"), None), (("schedule", "text", "layers"), 9),
])
def test_from_onnx_refuses_a_mangled_manifest(build_copy, path, value):
    (build_copy / "manifest.json").write_text(json.dumps(mutate(read(build_copy), path, value)))
    before = snapshot(build_copy.parent)
    code, err = run_main(build_main, ["--from-onnx", str(build_copy), "--backend", "tensorrt-rtx"])
    assert_one_line(code, err, (2,), f"--from-onnx with {'.'.join(path)} = {value!r}")
    assert snapshot(build_copy.parent) == before


@pytest.mark.parametrize("flags, named", [
    (["--max-seq-len", "4096"], "--max-seq-len 4096 (the build's is 2048); drop it"),
    (["--precision", "fp16"], "--precision fp16 (the build's is fp32); drop it"),
    (["--max-seq-len", "1024", "--precision", "bf16"], "--max-seq-len 1024 (the build's is 2048), --precision bf16"),
    (["--max-seq-len", "2048", "--precision", "fp32"], "--from-onnx needs a TensorRT backend"),  # the build's: accepted
])
def test_from_onnx_refuses_what_the_export_fixed(build_copy, flags, named):
    """--max-seq-len and --precision were fixed when the ONNX was exported: given otherwise, one line and nothing changes."""
    before = snapshot(build_copy.parent)
    code, err = run_main(build_main, ["--from-onnx", str(build_copy), "--backend", "none", *flags])
    assert_one_line(code, err, (2,), f"--from-onnx {' '.join(flags)}")
    assert named in err and snapshot(build_copy.parent) == before, err


# ------------------------------------------------------------------ export.build: the model directory


def _only_config(model: Path, rng) -> str:
    for path in model.iterdir():
        if path.name != "config.json":
            path.unlink()
    return "config.json only"


def _pickle_only(model: Path, rng) -> str:
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return "pytorch_model.bin only"


def _index(shard: str):
    def damage(model: Path, rng) -> str:
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        (model / "model.safetensors").unlink()
        return f"index -> {shard}"
    return damage


def _removed(name: str):
    def damage(model: Path, rng) -> str:
        (model / name).unlink()
        return f"no {name}"
    return damage


def _damaged(name: str, how):
    def damage(model: Path, rng) -> str:
        return f"{name}: {how.__name__} ({how(model / name, rng)})"
    return damage


def _not_utf8(name: str):
    def damage(model: Path, rng) -> str:
        (model / name).write_bytes(b"\xff\xfe" + rng.randbytes(64))
        return f"{name}: not UTF-8"
    return damage


def _architecture(model: Path, rng) -> str:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    return "LlamaForCausalLM"


JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "processor_config.json")
MODEL_DAMAGE = [
    _only_config, _removed("model.safetensors"), _pickle_only, _index("model-00001-of-00002.safetensors"),
    _index("../model.safetensors"), _removed("tokenizer.json"), _removed("processor_config.json"), _architecture,
    *[_damaged("model.safetensors", truncate) for _ in range(4)], _damaged("model.safetensors", random_bytes),
    *[_damaged(name, how) for name in JSON_FILES for how in (truncate, random_bytes)], _not_utf8("chat_template.jinja"),
]


@pytest.fixture(scope="module")
def preset_source() -> Path:
    from ficoco.models.presets import resolve_model_dir

    return resolve_model_dir("tiny-llava-1.5")


@pytest.mark.parametrize("index", range(len(MODEL_DAMAGE)))
def test_a_damaged_model_directory_is_refused_before_any_work(index, preset_source, tmp_path):
    model = Path(shutil.copytree(preset_source, tmp_path / "model"))
    what = MODEL_DAMAGE[index](model, random.Random(index))
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    code, err = run_main(build_main, ["--model", str(model), "--ratio", "0.5", "--backend", "none", "--out", str(tmp_path / "out" / "b")])
    assert_one_line(code, err, (2,), what)
    assert snapshot(tmp_path) == before, what


# ------------------------------------------------------------------ export.build: --out and the flags


def out_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-build").mkdir()
    (tmp_path / "not-a-build" / "precious.txt").write_text("keep")
    (tmp_path / "b.failed").mkdir()
    (tmp_path / "b.failed" / "notes.txt").write_text("mine")
    cases = {
        "an ancestor is a file": (["--out", str(tmp_path / "a-file" / "sub" / "b")], "is not a directory"),
        "--out is a file": (["--out", str(tmp_path / "a-file")], "is not a directory"),
        "--out is not a build": (["--out", str(tmp_path / "not-a-build")], "is not an export.build directory"),
        "NAME.failed is not ours": (["--out", str(tmp_path / "b")], "is not the evidence of a failed build"),
        "name too long": (["--out", str(tmp_path / ("x" * 250))], "too long"),
        "--tokens above the patches": (["--tokens", "577", "--out", str(tmp_path / "c")], "tokens=577 is more than the 576"),
        "--max-seq-len above the positions": (["--max-seq-len", "5000", "--out", str(tmp_path / "c")], "max_position_embeddings"),
        "--grid on LLaVA-1.5": (["--grid", "1x2", "--out", str(tmp_path / "c")], "LLaVA-NeXT only"),
        "--grid 2x2 on LLaVA-1.5": (["--grid", "2x2", "--out", str(tmp_path / "c")], "2x2 applies to LLaVA-NeXT only"),
    }
    if Path("/proc/self").is_dir():  # a place where nothing can be created
        cases["--out under /proc"] = (["--out", "/proc/ficoco-test/b"], "cannot write beside it")
    return cases


def test_bad_out_and_flags_are_refused_before_any_work(tmp_path):
    for what, (args, message) in out_cases(tmp_path).items():
        before = snapshot(tmp_path)
        argv = ["--ratio", "0.5", "--backend", "none", *args] if "--tokens" not in args else ["--backend", "none", *args]
        code, err = run_main(build_main, argv)
        assert_one_line(code, err, (2,), what)
        assert message in err and snapshot(tmp_path) == before, (what, err)


@pytest.mark.parametrize("args, given, visual, generated", [
    (["--model", "tiny-llava-1.5", "--ratio", "0.5", "--max-seq-len", "64"], 64, 288, True),
    (["--model", "tiny-llava-next", "--variant", "l", "--ratio", "0.5", "--max-seq-len", "2048"], 2048, 2882, True),
    (["--model", "tiny-llava-next", "--variant", "l", "--ratio", "0.5", "--no-verify", "--max-seq-len", "2048"], 2048, 2882,
     False),
], ids=["1.5-short", "next-2048", "next-no-verify"])
def test_a_max_seq_len_the_prompts_overflow_is_refused_before_any_export(args, given, visual, generated, tmp_path):
    """The unreduced prompt at layer 0 (its text + the plan's visual tokens), and with the verification the
    tokens it generates, must fit --max-seq-len: else one line naming both, exit 2, nothing written."""
    before = snapshot(tmp_path)
    code, err = run_main(build_main, [*args, "--backend", "none", "--out", str(tmp_path / "b")])
    assert_one_line(code, err, (2,), " ".join(args))
    need = re.search(r"--max-seq-len (\d+) is shorter than the (\d+) tokens this build needs", err)
    assert need and int(need[1]) == given < int(need[2]), err
    assert f" + {visual} visual)" in err and ("tokens the verification generates" in err) == generated, err
    assert f"give --max-seq-len {need[2]} or more" in err and snapshot(tmp_path) == before


@pytest.mark.skipif(not rtx_installed(), reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")
def test_a_compute_capability_rtx_lacks_is_refused_before_the_export(tmp_path):
    code, err = run_main(build_main, ["--ratio", "0.5", "--backend", "tensorrt-rtx", "--compute-capability", "8.7",
                                      "--out", str(tmp_path / "b")])
    assert_one_line(code, err, (2,), "--compute-capability 8.7")
    assert "8.7" in err and "8.6" in err and "--from-onnx" in err and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ runtime: prompt and image


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and holds no pixels): tiny on disk, huge when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_prompt_that_is_not_utf8_is_one_line(build_dir, image):
    prompt = os.fsdecode(b"caf\xe9 \xff")  # how Python hands over argv bytes that are not UTF-8
    code, err = run_main(runtime_main, ["--engine-dir", str(build_dir(BUILD)), "--image", str(image), "--prompt", prompt])
    assert_one_line(code, err, (2,), "non-UTF-8 prompt")
    assert "not UTF-8" in err and "xe9" in err


def damaged_images(image: Path, root: Path) -> dict[str, Path]:
    rng, data, files = random.Random(5), image.read_bytes(), {}
    for i in range(3):
        files[f"truncated {i}"] = root / f"truncated-{i}.png"
        files[f"truncated {i}"].write_bytes(data[: rng.randrange(len(data) - 1)])
    files["random bytes"] = root / "random.png"
    files["random bytes"].write_bytes(rng.randbytes(len(data)))
    for megapixels in (30, 100, 200):  # above the cap; Pillow warns from 89 MP and refuses from 179 MP
        files[f"{megapixels} MP header"] = root / f"big-{megapixels}.png"
        files[f"{megapixels} MP header"].write_bytes(png_header(10_000, megapixels * 100))
    return files


def test_damaged_and_oversized_images_are_one_line(build_dir, image, tmp_path):
    for what, path in damaged_images(image, tmp_path).items():
        code, err = run_runtime(build_dir(BUILD), path)
        assert_one_line(code, err, (2,), what)
        assert "MP" not in what or "megapixels" in err or "exceeds limit" in err, (what, err)


def test_the_pixel_cap_is_configurable(build_dir, tmp_path, monkeypatch):
    from PIL import Image

    small = tmp_path / "16x16.png"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(small)
    for setting, codes in (("256", (0,)), ("255", (2,)), ("lots", (2,)), ("0", (2,))):
        monkeypatch.setenv("FICOCO_MAX_IMAGE_PIXELS", setting)
        code, err = run_runtime(build_dir(BUILD), small)
        assert_one_line(code, err, codes, f"FICOCO_MAX_IMAGE_PIXELS={setting}")
        assert code == 0 or "FICOCO_MAX_IMAGE_PIXELS" in err
