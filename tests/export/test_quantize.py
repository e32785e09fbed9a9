"""export.quantize on a small decoder-like graph exported with torch.onnx (dynamo), as export.trace.graphs does.

The toy: a tied embedding / LM head (V=512, D=256) and two pre-norm blocks of four bias-free Linears
(256x256 twice, 256x704, 704x256), weights drawn from N(0, 1/K). Both K (256, 704) are multiples of
the block size 32, so every form quantizes the same eight MatMuls; the LM head reads
Transpose(embedding table), is not an initializer, and stays float.

Error bound for 4-bit RTN (symmetric, ORT's kernels: scale = absmax / 8 per block of 32, levels -8..7):
the absmax of 32 normal draws is about 2.1 sigma, so the step is about 0.26 sigma and the rounding error
(uniform, step^2 / 12) has a variance of about 0.006 sigma^2: a relative weight error e4 of about 8%.
One MatMul's output then keeps a cosine of about 1 / sqrt(1 + e4^2) = 0.997; the residual stream adds
the eight matmuls' errors, partly damped by the norms and the unquantized head, so the logits must keep
a cosine above 0.99 (e4 = 8% on all eight, added in quadrature, would give 0.975 at worst; measured:
0.995, relative error 0.098). int8 (step / 16) has e8 = e4 / 16: its logits' relative error must be
at least 8x smaller (measured: 16x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.quantize import QuantizeError, QuantReport, quantize_graph

V, D, F, LAYERS, BLOCK = 512, 256, 704, 2, 32
MATMULS = 4 * LAYERS  # quantizable MatMuls: the LM head is tied (Transpose of the embedding table)
INT4_COSINE = 0.99  # see the module docstring


def _decoder(half: bool):
    """The toy decoder (torch module) with N(0, 1/K) weights and the LM head tied to the embedding."""
    import torch
    from torch import nn

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.blocks = nn.ModuleList(
                nn.ModuleDict({"norm": nn.LayerNorm(D), "q": nn.Linear(D, D, bias=False), "o": nn.Linear(D, D, bias=False),
                               "up": nn.Linear(D, F, bias=False), "down": nn.Linear(F, D, bias=False)})
                for _ in range(LAYERS)
            )
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.embed.weight  # tied

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            for b in self.blocks:
                h = b["norm"](x)
                x = x + b["o"](torch.tanh(b["q"](h)))
                x = x + b["down"](nn.functional.silu(b["up"](h)))
            return self.lm_head(x)

    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():
        for b in model.blocks:
            for name in ("q", "o", "up", "down"):
                b[name].weight.normal_(0.0, b[name].in_features ** -0.5)
    return model.half() if half else model


def _export(path: Path, half: bool) -> Path:
    """torch.onnx.export (dynamo, opset 18, external data), as export.trace.graphs.export_onnx."""
    import torch

    seq = torch.export.Dim("seq", min=1, max=64)
    program = torch.onnx.export(
        _decoder(half), (torch.zeros(1, 8, dtype=torch.int64),), dynamo=True, input_names=["ids"],
        output_names=["logits"], dynamic_shapes=({1: seq},), opset_version=18, optimize=True, verbose=False,
    )
    program.save(str(path), external_data=True)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"fp32": path, "fp16": path}: the toy decoder, weights as external data."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("decoder")
    return {p: _export(root / f"decoder_{p}.onnx", half=p == "fp16") for p in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def quantized(graphs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """quantized(precision, weights, form="matmulnbits", method="rtn") -> QuantReport, each made once."""
    root, made = tmp_path_factory.mktemp("quantized"), {}

    def make(precision: str, weights: str, form: str = "matmulnbits", method: str = "rtn") -> QuantReport:
        key = (precision, weights, form, method)
        if key not in made:
            made[key] = quantize_graph(graphs[precision], root / f"{'_'.join(key)}.onnx", weights, BLOCK, method, form)
        return made[key]

    return make


IDS = np.random.default_rng(0).integers(0, V, (1, 16)).astype(np.int64)


def _logits(path: Path, **config: str) -> np.ndarray:
    """The toy's logits for IDS on ONNX Runtime's CPU provider; ``config``: session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": IDS})[0].astype(np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nodes(path: Path, op_type: str) -> list:
    import onnx

    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type]


def test_int4_matmulnbits_runs_close_to_fp32(graphs, quantized) -> None:
    report = quantized("fp32", "int4")
    nodes = _nodes(report.dst, "MatMulNBits")
    assert len(report.quantized) == len(nodes) == MATMULS
    assert {(n.domain, *(a.i for a in n.attribute if a.name in ("bits", "block_size"))) for n in nodes} == {("com.microsoft", 4, BLOCK)}
    [(head, why)] = report.skipped.items()
    assert "Transpose of initializer 'lm_head.weight'" in why, (head, why)
    assert report.external_data and report.dst.with_name(report.dst.name + ".data").is_file()
    assert _cosine(_logits(report.dst), _logits(graphs["fp32"])) > INT4_COSINE


def test_int8_closer_than_int4(graphs, quantized) -> None:
    reference = _logits(graphs["fp32"])
    int4, int8 = (_logits(quantized("fp32", w).dst) for w in ("int4", "int8"))
    assert {a.i for n in _nodes(quantized("fp32", "int8").dst, "MatMulNBits") for a in n.attribute if a.name == "bits"} == {8}
    assert _cosine(int8, reference) > _cosine(int4, reference)
    assert _relative(int8, reference) < _relative(int4, reference) / 8


def test_int4_weights_under_three_tenths_of_fp16(quantized) -> None:
    report = quantized("fp16", "int4")
    assert report.weight_bytes_before == 2 * LAYERS * (2 * D * D + 2 * D * F)  # fp16 bytes of the eight weights
    assert report.weight_bytes_after <= 0.3 * report.weight_bytes_before, report.weight_ratio
    assert report.bytes_after < report.bytes_before


def test_qdq_int4_matches_matmulnbits(quantized) -> None:
    """ORT's CPU provider fuses DequantizeLinear(int4 blocks) + MatMul into MatMulNBits with accuracy level 4
    (int8 activations) unless session.qdq_matmulnbits_accuracy_level says otherwise; the MatMulNBits graph
    has no accuracy_level (fp32 compute). With level 1 (fp32) both compute the same dequantized weights."""
    import onnx

    report = quantized("fp32", "int4", "qdq")
    model = onnx.load(str(report.dst))
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    dq = _nodes(report.dst, "DequantizeLinear")
    assert len(report.quantized) == len(dq) == MATMULS and not _nodes(report.dst, "MatMulNBits")
    assert {a.i for n in dq for a in n.attribute if a.name == "block_size"} == {BLOCK}
    nbits = _logits(quantized("fp32", "int4").dst)
    qdq = _logits(report.dst, **{"session.qdq_matmulnbits_accuracy_level": "1"})
    np.testing.assert_allclose(qdq, nbits, rtol=0, atol=1e-5 * np.abs(nbits).max())
    assert _cosine(_logits(report.dst), nbits) > 0.999  # the default fusion: int8 activations


def test_qdq_int8_is_per_channel_and_runs(graphs, quantized) -> None:
    report = quantized("fp32", "int8", "qdq")
    dq = _nodes(report.dst, "DequantizeLinear")
    assert len(report.quantized) == len(dq) == MATMULS
    assert {a.i for n in dq for a in n.attribute if a.name == "axis"} == {1}
    reference = _logits(graphs["fp32"])
    assert _relative(_logits(report.dst), reference) < _relative(_logits(quantized("fp32", "int4").dst), reference) / 8


def test_hqq_int4_runs_close_to_fp32(graphs, quantized) -> None:
    pytest.importorskip("torch")
    report = quantized("fp32", "int4", "matmulnbits", "hqq")
    assert len(report.quantized) == MATMULS and not report.symmetric
    assert _cosine(_logits(report.dst), _logits(graphs["fp32"])) > INT4_COSINE


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_tensorrt_rtx_builds_qdq(quantized, weights: str, tmp_path: Path) -> None:
    """TensorRT-RTX parses the fp16 QDQ graph with no error and builds an engine for compute capability 8.6."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'ficoco-edge[rtx]'")
    from export.engine import EngineSpec, build_engine, load_flavour

    report = quantized("fp16", weights, "qdq")
    spec = EngineSpec(report.dst, tmp_path / "decoder.engine", {"ids": ((1, 1), (1, 8), (1, 64))}, "fp16", ("8.6",))
    built = build_engine(spec, load_flavour("tensorrt-rtx"), log=lambda _: None)
    assert built["parser_errors"] == 0 and built["compute_capabilities"] == ["8.6"] and spec.engine_path.stat().st_size


def test_exclude_by_node_and_initializer_names(graphs, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(graphs["fp32"]), load_external_data=False)
    first, second = [n for n in model.graph.node if n.op_type == "MatMul"][:2]
    exclude = [first.name, second.input[1], "lm_head.weight", "no_such_tensor"]
    report = quantize_graph(graphs["fp32"], tmp_path / "q.onnx", "int4", exclude=exclude)
    assert len(report.quantized) == MATMULS - 2 and report.unmatched_exclude == ["no_such_tensor"]
    assert set(report.skipped.values()) == {"excluded"} and first.name in report.skipped and second.name in report.skipped
    assert {first.name, second.name} <= {n.name for n in _nodes(report.dst, "MatMul")}


def test_whole_blocks_for_tensorrt(graphs, tmp_path: Path) -> None:
    """block_size 128: the 704-row down projections would end in a partial block, which TensorRT cannot parse."""
    report = quantize_graph(graphs["fp16"], tmp_path / "q.onnx", "int4", block_size=128, form="qdq")
    partial = {n: why for n, why in report.skipped.items() if "K=704" in why}
    assert len(partial) == LAYERS and all("whole blocks" in why for why in partial.values())
    assert len(report.quantized) == MATMULS - LAYERS


def test_external_data_follows_input(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "in.onnx")
    report = quantize_graph(tmp_path / "in.onnx", tmp_path / "out.onnx", "int4", form="qdq")
    assert report.quantized == ["mm"] and not report.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def _no_matmul(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu_only", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, ir_version=10), path)
    return path


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"block_size": 48}, "48"),
        ({"block_size": 8}, "8"),
        ({"weights": "int3"}, "'int3'"),
        ({"form": "qdq", "method": "hqq"}, "'qdq'"),
        ({"weights": "int8", "method": "hqq"}, "'int8'"),
        ({"method": "gptq"}, "'gptq'"),
    ],
)
def test_bad_arguments_are_typed_errors(graphs, tmp_path: Path, kwargs: dict, named: str) -> None:
    args = {"weights": "int4", **kwargs}
    with pytest.raises(QuantizeError, match=named):
        quantize_graph(graphs["fp32"], tmp_path / "q.onnx", **args)
    assert not (tmp_path / "q.onnx").exists()


def test_bad_graphs_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="relu_only: the graph has no MatMul node"):
        quantize_graph(_no_matmul(tmp_path / "relu.onnx"), tmp_path / "q.onnx", "int4")
    with pytest.raises(QuantizeError, match="missing.onnx"):
        quantize_graph(tmp_path / "missing.onnx", tmp_path / "q.onnx", "int4")
    with pytest.raises(QuantizeError, match="relu.onnx"):
        quantize_graph(tmp_path / "relu.onnx", tmp_path / "relu.onnx", "int4")
    assert issubclass(QuantizeError, ValueError) and not (tmp_path / "q.onnx").exists()
