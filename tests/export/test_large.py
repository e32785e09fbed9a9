"""The large-model path: graphs over 2 GB go through ONNX external data, and the engines hold the
weights once (slow; not in CI).

A LLaVA-1.5 whose language model has Vicuna-7B's width (hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) cut to two decoder layers: 2.67 GB of fp32 text weights, over protobuf's 2 GB
limit. TensorRT-RTX engines for one compute capability (8.6) must hold at most 1.15x the graphs'
weight bytes. Run with `python -m pytest -m slow tests/export/test_large.py -s`.
"""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import onnx
import pytest

from export.build import main
from runtime.manifest import check_files, read
from tests.conftest import rtx_installed


def make_wide_model(tiny_dir: Path, out: Path) -> Path:
    """Tiny preset's vision tower, tokenizer and processor; Vicuna-7B-width text model with 2 layers."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from scripts.bench_models import empty_model

    config = LlavaConfig.from_pretrained(tiny_dir)
    config.text_config.update(dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                   num_key_value_heads=32, num_hidden_layers=2, vocab_size=32000))
    tiny = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    model = empty_model(config, seed=0)  # norms 1, biases 0, weights N(0, 0.02); buffers computed as usual
    model.model.vision_tower.load_state_dict(tiny.model.vision_tower.state_dict())  # the preset's CLIP tower
    model.save_pretrained(out)
    for name in tiny_dir.iterdir():
        if name.name not in ("config.json", "model.safetensors") and name.is_file():
            shutil.copy2(name, out / name.name)
    return out


@pytest.mark.slow
def test_vicuna_width_two_layers_exports_with_external_data(preset_dirs, tmp_path):
    source = make_wide_model(preset_dirs["tiny-llava-1.5"], tmp_path / "wide")
    assert sum(f.stat().st_size for f in source.glob("*.safetensors")) > 2e9
    out = tmp_path / "build"
    backend = ["--backend", "tensorrt-rtx", "--compute-capability", "8.6"] if rtx_installed() else ["--backend", "none"]
    assert main(["--model", str(source), "--variant", "v", "--ratio", "0.25", "--out", str(out), *backend]) == 0
    manifest = read(out)
    check_files(out, manifest["graphs"])
    llm = 0
    for graph in ("embed", "decoder.0"):  # the whole LLM: the table, and one segment without FiCoCo-L
        external = manifest["graphs"][graph]["external_data"]
        assert external
        llm += sum(e["bytes"] for e in external)
        onnx.checker.check_model(str(out / f"{graph}.onnx"))  # by path: external data allowed
    assert llm > 2e9
    assert manifest["parity"]["passed"]
    weights = manifest["memory"]["weight_bytes"]
    if rtx_installed():
        engines = sum(e["bytes"] for e in manifest["engines"].values())
        print(f"weights {weights / 1e9:.3f} GB, engines for sm_86 {engines / 1e9:.3f} GB: {engines / weights:.3f}x")
        assert engines <= 1.15 * weights
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak resident memory of the test process: {peak_gb:.1f} GB")
