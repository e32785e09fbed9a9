"""Builds of the real-weights preset (SmolLM2-135M inside a LLaVA-1.5 directory) pass the default gates.

With random tiny weights every activation is small, so an absolute limit looked fine; real keys reach
|25| and logits |32|. These builds run `export.build` with default flags (only `--backend none`, to keep
CI short) and must publish a passing build, for the right reasons.
"""

from __future__ import annotations

import json

import pytest

from runtime.manifest import read
from tests.conftest import REAL_BUILDS


@pytest.mark.parametrize("name", list(REAL_BUILDS))
def test_default_flags_pass_on_real_weights(real_build_dir, name):
    directory = real_build_dir(name)
    manifest = read(directory)
    parity = json.loads((directory / "parity.json").read_text())
    assert parity["passed"] and manifest["parity"] == parity
    prefill = parity["graphs"]["prefill"]["outputs"]
    scale = prefill["logits"]["scale"]
    assert scale > 10  # real logits: this is what an absolute limit got wrong
    for output, figures in prefill.items():  # every numeric output, relative to its own magnitude
        if figures.get("norm") == "max":  # fp32: the largest error
            assert figures["normalized"] <= figures["rtol"], (output, figures)
        elif figures.get("norm") == "rms":  # half precision: the relative RMS error
            assert figures["relative_rms"] <= figures["rms_limit"], (output, figures)
    assert prefill["language_kept.4"]["overlap"] >= parity["limits"]["text"]["kept"]
    e2e = parity["end_to_end"]
    assert e2e["teacher_forced"]["agreement"] >= parity["limits"]["text"]["tokens"]
    assert e2e["teacher_forced"]["prompts"] == 3
    if manifest["precision"] == "fp32":
        assert e2e["onnx_tokens"] == e2e["torch_tokens"] and e2e["teacher_forced"]["agreement"] == 1.0
        worst = max(f["normalized"] for o, f in prefill.items() if o.startswith("present."))
        assert worst < 1e-4 < max(f["max_abs"] for o, f in prefill.items() if o.startswith("present."))


def test_manifest_identifies_the_model_without_local_paths(real_build_dir, smol_dir):
    directory = real_build_dir("smol-l")
    text = (directory / "manifest.json").read_text()
    source = read(directory)["source"]
    assert source["model"] == "smol-llava-1.5" and source["preset"] is True and len(source["fingerprint"]) == 64
    assert "path" not in source
    assert str(smol_dir) not in text and str(smol_dir.parent) not in text


def test_runtime_decodes_the_verified_tokens(real_build_dir):
    """The torch-free runtime on ONNX Runtime gives the patched model's own greedy tokens (parity.json's
    reference) for the verification prompt and picture."""
    from PIL import Image

    from runtime.pipeline import Pipeline

    directory = real_build_dir("smol-l")
    reference = json.loads((directory / "parity.json").read_text())["end_to_end"]["torch_tokens"]
    image = Image.linear_gradient("L").resize((500, 400)).convert("RGB")  # export.trace.verify's picture
    with Pipeline.from_build(directory, backend="onnxruntime") as pipe:
        result = pipe(image, "Describe the image.", max_new_tokens=len(reference))
    assert list(result.token_ids) == reference
