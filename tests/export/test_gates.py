"""The parity gates: their limits follow the derivation, and deliberately broken exports fail them.

Each broken export is made the way a real defect would arise (a changed forward or weight,
exported with the project's own exporter) and run through `export.trace.verify.verify`, the gate every
build goes through, against the unbroken PyTorch model. An unbroken copy must pass the same gate,
so each failure is the defect's.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
import torch

from export import gates
from export.trace import pipeline, segments, verify
from export.trace.graphs import graph_set
from export.request import BuildRequest
from ficoco.core import language_step
from runtime import names
from runtime.manifest import Build

# --------------------------------------------------------------------------- the limits


def test_limits_follow_the_derivation():
    """sigma = depth * (u_store + sqrt(K) * 2^-24), rtol = sqrt(2 ln n) * sigma; SmolLM2-135M (30 layers + head,
    K = 1536) and Vicuna-7B (32 + head, K = 11008)."""
    smol = gates.limits("fp32", 31, 1536)
    assert smol.sigma == pytest.approx(31 * (2**-24) * (1 + math.sqrt(1536)))
    kv = 3 * 650 * 64  # one SmolLM2 KV output of a 650-token prompt
    assert smol.rtol(kv) == pytest.approx(math.sqrt(2 * math.log(kv)) * smol.sigma)
    assert 2e-4 < smol.rtol(kv) < 5e-4  # 7x above SmolLM2's measured fp32 rounding, 10x below a 1e-3 weight error
    assert gates.limits("fp32", 33, 11008).sigma == pytest.approx(2.08e-4, rel=0.01)
    assert gates.limits("fp16", 31, 1536).sigma == pytest.approx(31 * (2**-11 + math.sqrt(1536) * 2**-24))
    assert gates.limits("fp32", 31, 1536).allowed_rows(0, 300) == 0  # fp32: no slack at all
    assert gates.limits("fp16", 31, 1536).allowed_rows(3, 300) == 2 * 3 + 6
    with pytest.raises(ValueError, match="precision 'int3'"):
        gates.limits("int3", 1, 1)


def test_judge_is_relative_to_the_output_and_counts_rows():
    rng = np.random.default_rng(0)
    limits = gates.limits("fp32", 31, 1536)
    ref = rng.normal(0, 25, (1, 3, 100, 64)).astype(np.float32)  # real keys reach |25|
    noisy = ref * (1 + rng.normal(0, 1e-6, ref.shape).astype(np.float32))
    assert gates.judge(ref, noisy, limits, row_axis=2)["passed"]  # would fail an absolute 1e-4
    assert np.abs(ref - noisy).max() > 1e-4
    two_rows = noisy.copy()
    two_rows[:, :, [5, 50]] += 1.0
    assert gates.judge(two_rows, ref, limits, 2, row_axis=2)["passed"]
    figures = gates.judge(ref, two_rows, limits, 1, row_axis=2)
    assert not figures["passed"] and figures["bad_rows"] == 2
    scaled = gates.judge(ref, ref * np.float32(1 + 1e-3), limits)  # a 1e-3 relative error
    assert not scaled["passed"] and scaled["normalized"] > 2 * scaled["rtol"]
    shorter = gates.judge(ref, ref[:, :, 1:], limits)
    assert not shorter["passed"] and "shape" in shorter["reason"]
    assert not gates.judge(ref, np.full_like(ref, np.nan), limits)["passed"]


def test_kept_overlap_and_common_rows():
    assert gates.kept_overlap(np.array([[1, 2, 3, 4]]), np.array([[1, 2, 3, 9]])) == 0.75
    assert gates.kept_overlap(np.array([[1, 2, 3]]), np.array([[1, 2, 3, 4]])) == 0.0  # a different count
    ref_idx, act_idx = gates.common_rows(np.array([2, 5, 7, 9]), np.array([2, 6, 7, 9]))
    assert ref_idx.tolist() == [0, 2, 3] and act_idx.tolist() == [0, 2, 3]


# --------------------------------------------------------------------------- broken exports


class Reference:
    """The unbroken patched model of a build, its torch graphs, and a copy of its ONNX files to break."""

    def __init__(self, model_dir, variant: str, ratio: float, build, tmp_path):
        self.request = BuildRequest(model=str(model_dir), variant=variant, ratio=ratio)
        self.model, self.processor, _ = pipeline.load_model(self.request)
        self.patch_plan, self.plan = pipeline.patch(self.model, self.processor, self.request)
        self.graphs = graph_set(self.model, self.patch_plan, self.plan)
        self.directory = tmp_path / "broken"
        self.directory.mkdir()
        for path in [*build.glob("*.onnx*"), build / "manifest.json"]:
            shutil.copy(path, self.directory / path.name)

    def export(self, graphs, graph: str) -> None:
        sample = verify.make_sample(self.processor, self.model.config.image_token_id, verify.COMPARE_PROMPTS[0])
        args = pipeline.example_args(graphs, sample)
        pipeline.export_graph(graphs, graph, args[graph], self.directory, self.plan.max_seq_len, False)

    def verify(self) -> dict:
        """export.trace.verify on the copy: the runtime's ONNX Runtime backend over its (maybe broken) graphs."""
        return verify.verify(Build.from_directory(self.directory), self.model, self.processor, self.graphs)


def rope_off_by_one(ref: Reference) -> None:
    """Decoder layer 2 rotates its queries and keys for position p + 1 (cos/sin advanced by one step)."""
    decoder = ref.model.model.language_model
    theta = torch.cat([decoder.rotary_emb.inv_freq] * 2)
    original = segments.buffer_attention

    def shifted(attn, x, cos_sin, *args):
        if attn.layer_idx == 2:
            cos, sin = cos_sin
            c, s = torch.cos(theta).to(cos.dtype), torch.sin(theta).to(cos.dtype)
            cos_sin = (cos * c - sin * s, sin * c + cos * s)
        return original(attn, x, cos_sin, *args)

    segments.buffer_attention = shifted
    try:
        ref.export(ref.graphs, names.decoder(0))
    finally:
        segments.buffer_attention = original


def kv_head_swapped(ref: Reference) -> None:
    """Decoder layer 2's key projection has KV heads 0 and 1 exchanged."""
    proj = ref.model.model.language_model.layers[2].self_attn.k_proj
    dim = ref.model.config.text_config.head_dim
    original = proj.weight.detach().clone()
    with torch.no_grad():
        proj.weight[:dim], proj.weight[dim : 2 * dim] = original[dim : 2 * dim], original[:dim]
    try:
        ref.export(ref.graphs, names.decoder(0))
    finally:
        with torch.no_grad():
            proj.weight.copy_(original)


def keep_count_off_by_one(ref: Reference) -> None:
    """FiCoCo-L keeps one token more than the schedule says (reduce.1 exported from the wrong plan)."""
    kept = ref.plan.language[-1].tokens_out
    wrong = BuildRequest(model=ref.request.model, variant=ref.request.variant, tokens=kept + 1)
    patch_plan, plan = pipeline.patch(ref.model, ref.processor, wrong)
    try:
        ref.export(graph_set(ref.model, patch_plan, plan), names.reduce(1))
    finally:
        pipeline.patch(ref.model, ref.processor, ref.request)  # the reference's own forward again


class ShiftedSpanReduce(segments.ReduceGraph):
    """ReduceGraph.forward with the FiCoCo-L span starting one token late (the defect)."""

    def forward(self, attended, attention, position_ids, input_ids_before):
        start, step = input_ids_before.shape[1] + 1, self.step  # defect: + 1
        h, rows = language_step(attended, attention, start, step.tokens_in, step.r, self.params)
        return h, position_ids.gather(1, rows), rows[:, start:start + step.tokens_out] - start


def span_shifted(ref: Reference) -> None:
    broken = graph_set(ref.model, ref.patch_plan, ref.plan)
    broken.llm[names.reduce(1)] = ShiftedSpanReduce(ref.plan.language[0], ref.patch_plan.language_params).eval()
    ref.export(broken, names.reduce(1))


def weight_perturbed(ref: Reference) -> None:
    """One weight tensor of decoder.0.onnx, a middle decoder layer's MLP down projection, scaled by 1 + 1e-3."""
    path = ref.directory / "decoder.0.onnx"
    model = onnx.load(str(path))  # with its external data
    text = ref.model.config.text_config
    down = [t for t in model.graph.initializer if list(t.dims) == [text.intermediate_size, text.hidden_size]]
    assert len(down) == ref.plan.language[0].layer, [t.name for t in model.graph.initializer]  # layers 0 .. L-1
    tensor = down[len(down) // 2]
    array = onnx.numpy_helper.to_array(tensor)
    tensor.CopyFrom(onnx.numpy_helper.from_array((array * np.float32(1 + 1e-3)).astype(array.dtype), tensor.name))
    (ref.directory / "decoder.0.onnx.data").unlink()
    onnx.save(model, str(path), save_as_external_data=True, location="decoder.0.onnx.data")


DEFECTS = {
    "rope-off-by-one": rope_off_by_one,
    "kv-head-swapped": kv_head_swapped,
    "keep-count-off-by-one": keep_count_off_by_one,
    "weight-perturbed-1e-3": weight_perturbed,
    "ficoco-l-span-shifted": span_shifted,
}


@pytest.fixture(scope="module")
def tiny_reference(build_dir, preset_dirs, tmp_path_factory):
    build = build_dir("1.5-l")
    return lambda: Reference(preset_dirs["tiny-llava-1.5"], "l", 0.5, build, tmp_path_factory.mktemp("gates"))


def test_an_unbroken_copy_passes_the_gate(tiny_reference):
    assert tiny_reference().verify()["passed"]


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_broken_export_fails_the_gate(tiny_reference, defect):
    ref = tiny_reference()
    DEFECTS[defect](ref)
    record = ref.verify()
    assert not record["passed"], defect
    failing = gates.failing_rows(record)
    assert any(row.startswith("prefill.") for row in failing), failing


def test_the_report_prints_every_failing_output_marked_failed():
    limits = gates.limits("fp32", 31, 1536)
    ok = gates.judge(np.ones((1, 3, 4, 8)), np.ones((1, 3, 4, 8)), limits, row_axis=2)
    bad = gates.judge(np.ones((1, 3, 4, 8)), np.full((1, 3, 4, 8), 1.1), limits, row_axis=2)
    record = {
        "graphs": {"prefill": {"outputs": {"logits": ok, "present.0.key": ok, "present.1.key": bad, "present.2.value": bad}}},
        "end_to_end": {"passed": True, "identical": True, "onnx_tokens": [1], "torch_tokens": [1],
                       "teacher_forced": {"agreement": 1.0, "positions": 1, "prompts": 1}},
    }
    lines = gates.report_lines(record)
    failing = [line for line in lines if "FAIL" in line]
    assert [line.split()[0] for line in failing] == ["prefill.present.1.key", "prefill.present.2.value"]
    assert not any(line.startswith("prefill.present.0.key") for line in lines)  # passing caches are summarised
    assert gates.failing_rows(record) == ["prefill.present.1.key", "prefill.present.2.value"]
