"""Every weight is stored once: the initializers across a build's graphs add up to the model's parameters.

The expectation is computed from the Hugging Face model alone: its distinct parameters (a tied LM head
and embedding table are one tensor), less what LLaVA never reads (CLIP's layers after the feature
layer and its post-layernorm). The graphs' side counts initializer bytes, in external data or inline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.memory import initializer_bytes as graph_bytes
from runtime.manifest import read


def initializer_bytes(directory: Path) -> dict[str, int]:
    """{graph: bytes of its initializers} over the build's graphs."""
    return {graph: graph_bytes(directory / entry["file"]) for graph, entry in read(directory)["graphs"].items()}


def used_parameter_bytes(model) -> int:
    """Bytes of the distinct parameters a LLaVA forward reads."""
    vision = model.config.vision_config
    feature = model.config.vision_feature_layer
    read_layers = feature if feature >= 0 else vision.num_hidden_layers + 1 + feature
    unused = tuple(f"vision_tower.{p}encoder.layers.{i}." for i in range(read_layers, vision.num_hidden_layers)
                   for p in ("", "vision_model."))
    total = 0
    for name, parameter in model.named_parameters():  # named_parameters yields a shared tensor once
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith(unused) or "post_layernorm" in name:
            continue
        total += parameter.numel() * parameter.element_size()
    return total


@pytest.mark.parametrize("name", ["1.5-v", "1.5-l", "1.5-vl"])
def test_tiny_builds_store_each_weight_once(build_dir, tiny, name):
    stored = initializer_bytes(build_dir(name))
    expected = used_parameter_bytes(tiny["tiny-llava-1.5"][0])
    assert sum(stored.values()) == pytest.approx(expected, rel=0.01), stored
    assert stored.get("reduce.1", 0) < 1e4  # the FiCoCo-L step holds no weights


def test_real_weights_build_with_a_tied_head_stores_the_table_once(real_build_dir, smol_dir):
    """SmolLM2 ties its LM head to the embedding table: the build has no embed.onnx, the runtime reads the
    table from the LM head's initializer, and the bytes add up with the table counted once."""
    from ficoco.models.presets import load

    directory = real_build_dir("smol-l")
    manifest = read(directory)
    model, _ = load(smol_dir)
    assert "embed" not in manifest["graphs"] and manifest["embedding"]["graph"] == "decoder.1"
    stored = initializer_bytes(directory)
    assert sum(stored.values()) == pytest.approx(used_parameter_bytes(model), rel=0.01), stored
    table = model.model.get_input_embeddings().weight.detach().numpy()
    from runtime.kvcache import Embedding

    rows = Embedding.from_entry(directory, manifest["embedding"])(np.array([0, 7, table.shape[0] - 1]))
    assert np.array_equal(rows, table[[0, 7, -1]])


def test_a_duplicated_weight_is_counted(build_dir, tiny, tmp_path):
    """The check can fail: a graph set that stored the decoder's weights twice is 2x off."""
    stored = initializer_bytes(build_dir("1.5-v"))
    doubled = sum(stored.values()) + stored["decoder.0"]
    assert doubled > 1.2 * used_parameter_bytes(tiny["tiny-llava-1.5"][0])
