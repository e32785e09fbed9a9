"""Weight-only quantization of an exported ONNX graph with ONNX Runtime's own quantization tools.

``quantize_graph`` reads an fp32/fp16/bf16 ONNX graph (external data included) and writes a copy whose
MatMul weights are 4-bit or 8-bit. Nothing here does quantization math itself:

* ``form="matmulnbits"``: ``MatMulNBitsQuantizer`` writes com.microsoft ``MatMulNBits`` nodes (what
  ONNX Runtime runs fastest; TensorRT cannot parse them). int4 and int8 are block-wise over K
  (``block_size`` rows of B share a scale). ``method="rtn"`` is ``DefaultWeightOnlyQuantConfig`` (round
  to nearest in ORT's C++ kernels); ``method="hqq"`` is ``HQQWeightOnlyQuantConfig`` (Half-Quadratic
  Quantization: calibration-free, optimizes scales and float zero points, needs torch, always
  asymmetric, needs K to be a multiple of ``block_size``). GPTQ (``GPTQWeightOnlyQuantConfig``) needs a
  calibration data reader over real decoder inputs and is not offered.
* ``form="qdq"``, int4: the same quantizer with ``QuantFormat.QDQ``: a block-wise int4
  ``DequantizeLinear`` (axis 0, ``block_size``) feeding a plain MatMul, opset 21 (the quantizer bumps
  the default domain to 21 and the IR to 10 without converting ops; it warns about this). This is the
  form TensorRT's INT4 weight-only path consumes; it wants ``symmetric=True`` (no zero points).
* ``form="qdq"``, int8: ORT's quantizer refuses 8-bit QDQ for MatMul, so the weights go through ORT's
  per-channel helpers (``quant_utils.compute_data_quant_params`` per output column,
  ``quant_utils.quantize_onnx_initializer(axis=1)``, what ORT's own QDQ quantizer calls for
  per-channel weights) and a ``DequantizeLinear(axis=1)`` + MatMul pair is written with onnx.helper.

Only top-level MatMul nodes whose B is a 2-D float initializer are quantized (a tied LM head reads
``Transpose(embedding table)``, so it is skipped as "B is not an initializer"); ``exclude`` names
node names or initializer names (B, or the initializer a Transpose feeding B reads) to keep in float.
The output keeps external data (one ``<dst name>.data`` beside ``dst``) when the input had it or when
it is larger than ``EXTERNAL_DATA_BYTES``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS = ("int4", "int8")
METHODS = ("rtn", "hqq")
FORMS = ("matmulnbits", "qdq")
EXTERNAL_DATA_BYTES = 1_800_000_000  # as export.trace.pipeline: past this, ONNX external data (protobuf limit 2 GB)
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}


class QuantizeError(ValueError):
    """A bad argument or a graph that cannot be quantized; the message names the offending value."""


@dataclass
class QuantReport:
    """What ``quantize_graph`` did. Bytes are initializer payloads (int4 counted as half a byte)."""

    src: Path
    dst: Path
    weights: str
    form: str
    method: str
    block_size: int
    symmetric: bool
    quantized: list[str] = field(default_factory=list)  # names of the MatMul nodes quantized
    skipped: dict[str, str] = field(default_factory=dict)  # MatMul node name -> why it stayed float
    unmatched_exclude: list[str] = field(default_factory=list)  # exclude entries that named nothing
    bytes_before: int = 0  # all initializers of src
    bytes_after: int = 0  # all initializers of dst
    weight_bytes_before: int = 0  # the float weights that were quantized
    weight_bytes_after: int = 0  # their replacements: quantized data, scales, zero points
    external_data: bool = False
    seconds: float = 0.0

    @property
    def weight_ratio(self) -> float:
        """Bytes of the quantized weights after / before."""
        return self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else 1.0


def _tensor_bytes(tensor: TensorProto) -> int:
    """Payload bytes of an initializer from its dims and type (works for external data too)."""
    count = 1
    for d in tensor.dims:
        count *= d
    bits = _BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _check_args(weights: str, form: str, method: str, block_size: int) -> None:
    """QuantizeError naming the first bad argument or unsupported combination."""
    for name, value, allowed in (("weights", weights, WEIGHTS), ("form", form, FORMS), ("method", method, METHODS)):
        if value not in allowed:
            raise QuantizeError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if method == "hqq" and (form != "matmulnbits" or weights != "int4"):
        raise QuantizeError(
            f"method 'hqq' only writes int4 'matmulnbits' (ORT's HQQ has no QDQ output, and ORT's CPU MatMulNBits "
            f"cannot run 8-bit weights with HQQ's float zero points), got weights {weights!r}, form {form!r}"
        )


def _whole_blocks(weights: str, form: str, method: str, block_size: int) -> tuple:
    """(block_size, why) where K must be a multiple of block_size, else (): RTN's MatMulNBits pads K itself."""
    if method == "hqq":
        return block_size, "ORT's HQQ does not pad K"
    if form == "qdq" and weights == "int4":
        return block_size, "TensorRT parses a block-wise DequantizeLinear only in whole blocks"
    return ()


def _load(src: Path) -> tuple[onnx.ModelProto, bool]:
    """The model with its external data loaded, and whether it had external data."""
    if not src.is_file():
        raise QuantizeError(f"no ONNX file at {src}")
    model = onnx.load(str(src), load_external_data=False)
    external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(src.parent))
    return model, external


def _materialize_transposed(model: onnx.ModelProto) -> int:
    """MatMul(x, Transpose(W)) with W a 2-D float initializer read by that Transpose alone (how the exporter
    writes an untied LM head): store W^T as the initializer and drop the Transpose, so the weight can be
    quantized. Returns how many were rewritten. (Never for a tied head: its W is the embedding table.)"""
    graph, done = model.graph, _gemm_to_matmul(model)
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in list(graph.node):
        w = node.input[0] if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if w not in inits or len(inits[w].dims) != 2 or perm != [1, 0] or inits[w].data_type not in _FLOATS:
            continue
        users = readers.get(node.output[0], [])
        if len(readers.get(w, [])) != 1 or not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        array = numpy_helper.to_array(inits[w]).T.copy()
        inits[w].CopyFrom(numpy_helper.from_array(array, w))
        for user in users:
            user.input[1] = w
        graph.node.remove(node)
        done += 1
    return done


def _gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Gemm(A, W, transB=1) with alpha 1, no C and W a 2-D float initializer read by it alone (the
    exporter's LM head on the last position) -> MatMul(A, W^T), W^T stored. Returns how many."""
    graph, done = model.graph, 0
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for index, node in enumerate(list(graph.node)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = node.input[1] if node.op_type == "Gemm" and len(node.input) == 2 else None
        if (w not in inits or uses.get(w) != 1 or attrs.get("transA", 0) or not attrs.get("transB", 0)
                or attrs.get("alpha", 1.0) != 1.0 or len(inits[w].dims) != 2 or inits[w].data_type not in _FLOATS):
            continue
        inits[w].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), w))
        matmul = helper.make_node("MatMul", [node.input[0], w], list(node.output), name=node.name or f"gemm_{index}")
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, matmul)
        done += 1
    return done


def _b_sources(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> dict[str, str]:
    """Tensor name -> initializer name, for the outputs of Transposes that read an initializer."""
    return {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}


def _why_not(node: onnx.NodeProto, inits: dict, transposed: dict, excluded: set, owner: dict, blocks: tuple) -> str | None:
    """Why this MatMul stays float (None: quantize it). ``owner``: B initializer -> first node quantizing it;
    ``blocks``: (block_size, why) when K must be a whole number of blocks, else ()."""
    b = node.input[1]
    if node.name in excluded or b in excluded or transposed.get(b) in excluded:
        return "excluded"
    if b not in inits:
        via = f" (Transpose of initializer {transposed[b]!r})" if b in transposed else ""
        return f"B {b!r} is not an initializer{via}"
    tensor = inits[b]
    if len(tensor.dims) != 2:
        return f"B {b!r} has shape {list(tensor.dims)}, not 2-D"
    if tensor.data_type not in _FLOATS:
        return f"B {b!r} is {helper.tensor_dtype_to_string(tensor.data_type)}, not a float type"
    if blocks and tensor.dims[0] % blocks[0]:
        return f"K={tensor.dims[0]} of B {b!r} is not a multiple of block_size {blocks[0]} ({blocks[1]})"
    if b in owner:
        return f"B {b!r} is shared with {owner[b]!r}, which quantizes it"
    owner[b] = node.name
    return None


def _select(model: onnx.ModelProto, exclude: Collection[str], blocks: tuple) -> tuple[list[str], dict[str, str], list[str]]:
    """(MatMul nodes to quantize, skipped node -> reason, exclude entries that matched nothing); names unnamed nodes."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    transposed = _b_sources(graph, inits)
    excluded, matched, owner = set(exclude), set(), {}
    chosen, skipped, names = [], {}, {n.name for n in graph.node}
    for index, node in enumerate(n for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")):
        if not node.name or node.name in chosen or node.name in skipped:  # ORT's nodes_to_exclude works by name
            node.name = next(f"MatMul_q{index}_{i}" for i in range(len(names) + 1) if f"MatMul_q{index}_{i}" not in names)
        matched |= {node.name, node.input[1], transposed.get(node.input[1])} & excluded
        why = _why_not(node, inits, transposed, excluded, owner, blocks)
        if why is None:
            chosen.append(node.name)
        else:
            skipped[node.name] = why
    if not chosen:
        detail = "; ".join(f"{n}: {w}" for n, w in skipped.items()) or "the graph has no MatMul node"
        raise QuantizeError(f"nothing to quantize in {graph.name or 'the graph'}: {detail}")
    return chosen, skipped, sorted(excluded - matched)


def _import_quantizer() -> Any:
    """onnxruntime's matmul_nbits_quantizer module, imported without its side effect on logging: its import
    runs ``logging.basicConfig(level=INFO)`` on the root logger; that is undone, and its own logger set to
    WARNING (it logs every node at INFO)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:], root.level = handlers, level
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _ort_config(weights: str, form: str, method: str, block_size: int, symmetric: bool, accuracy_level: int | None) -> Any:
    """The ORT weight-only config for the int4 forms and int8 MatMulNBits."""
    from onnxruntime.quantization import QuantFormat

    ort = _import_quantizer()
    bits = 4 if weights == "int4" else 8
    if method == "hqq":
        return ort.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    return ort.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",), bits=bits,
    )


def _all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and, depth first, those of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            yield from (n for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs) for n in _all_nodes(g))


def _run_ort_quantizer(model: onnx.ModelProto, chosen: list[str], config: Any) -> onnx.ModelProto:
    """MatMulNBitsQuantizer over ``model``, every MatMul but ``chosen`` excluded by name (ORT also walks
    subgraphs: their MatMuls are excluded too, unnamed ones there excepted)."""
    keep = set(chosen)
    others = [n.name for n in _all_nodes(model.graph) if n.op_type == "MatMul" and n.name not in keep]
    quantizer = _import_quantizer().MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _int8_qdq_node(node: onnx.NodeProto, weight: TensorProto, symmetric: bool) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """DequantizeLinear(axis=1) + MatMul replacing ``node``, with per-output-column int8 weights from ORT's helpers."""
    import numpy as np
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer

    array = onnx.numpy_helper.to_array(weight)
    qtype = TensorProto.INT8 if symmetric else TensorProto.UINT8
    data = array.astype(np.float32)
    params = [compute_data_quant_params(data[:, j], qtype, symmetric) for j in range(data.shape[1])]
    zero_point = np.array([p[0] for p in params])
    scale = np.array([p[1] for p in params], dtype=np.float32)
    fp32 = onnx.numpy_helper.from_array(data, weight.name)
    q = quantize_onnx_initializer(fp32, qtype, zero_point, scale, axis=1, quant_weight_name=weight.name + "_DQ_Q8")
    scales = onnx.numpy_helper.from_array(scale.astype(array.dtype), weight.name + "_DQ_scales")
    zp = onnx.numpy_helper.from_array(zero_point, weight.name + "_DQ_zero_points")
    dq = helper.make_node("DequantizeLinear", [q.name, scales.name, zp.name], [q.name + "_output"],
                          name=node.name + "_DQ_Q8", axis=1)
    matmul = helper.make_node("MatMul", [node.input[0], dq.output[0]], list(node.output), name=node.name + "_matmul_Q8")
    return [dq, matmul], [q, scales, zp]


def _int8_qdq(model: onnx.ModelProto, chosen: list[str], symmetric: bool) -> onnx.ModelProto:
    """Per-channel int8 QDQ for the chosen MatMuls (ORT's MatMulNBitsQuantizer has no 8-bit QDQ), opset >= 21
    as the int4 QDQ form (fp16/bf16 scales need DequantizeLinear-19 at least)."""
    graph, keep = model.graph, set(chosen)
    inits = {t.name: t for t in graph.initializer}
    nodes, added, weights = [], [], set()
    for node in graph.node:
        if node.name in keep:
            new_nodes, tensors = _int8_qdq_node(node, inits[node.input[1]], symmetric)
            nodes += new_nodes
            added += tensors
            weights.add(node.input[1])
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name not in weights - used]  # others stay (subgraphs may read them)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + added)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    model.ir_version = max(model.ir_version, 10)
    return model


def _quantized_nodes(model: onnx.ModelProto, chosen: list[str]) -> list[str]:
    """The chosen nodes that no longer appear under their own name (ORT renames what it replaces)."""
    left = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    return [name for name in chosen if name not in left]


def _save(model: onnx.ModelProto, dst: Path, external: bool) -> None:
    """Write ``model`` to ``dst``; with external data, all tensors in ``<dst name>.data`` beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def quantize_graph(src: Path, dst: Path, weights: str, block_size: int = 32, method: str = "rtn",
                   form: str = "matmulnbits", exclude: Collection[str] = (), *, symmetric: bool = True,
                   accuracy_level: int | None = None, untranspose: bool = False) -> QuantReport:
    """Write ``dst``: ``src`` with its qualifying MatMul weights quantized to ``weights`` ("int4"/"int8").

    ``symmetric`` (RTN only; HQQ is always asymmetric): no zero points, what TensorRT's Q/DQ path needs.
    ``accuracy_level``: MatMulNBits' attribute (ORT's minimum compute type; None leaves it unset).
    ``untranspose``: first store transposed weights (an untied LM head) as W^T so they are quantized too.
    Raises QuantizeError for bad arguments, a missing file, or a graph with nothing to quantize.
    """
    src, dst = Path(src), Path(dst)
    _check_args(weights, form, method, block_size)
    if src.resolve() == dst.resolve():
        raise QuantizeError(f"dst must differ from src, got {dst}")
    start = time.perf_counter()
    model, external = _load(src)
    before = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    if untranspose:
        _materialize_transposed(model)
    chosen, skipped, unmatched = _select(model, exclude, _whole_blocks(weights, form, method, block_size))
    weight_names = {n.input[1] for n in model.graph.node if n.name in set(chosen)}
    if weights == "int8" and form == "qdq":
        model = _int8_qdq(model, chosen, symmetric)
    else:
        model = _run_ort_quantizer(model, chosen, _ort_config(weights, form, method, block_size, symmetric, accuracy_level))
    done = _quantized_nodes(model, chosen)
    skipped.update({n: "onnxruntime's quantizer left it unquantized" for n in chosen if n not in done})
    after = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    external = external or sum(after.values()) > EXTERNAL_DATA_BYTES
    _save(model, dst, external)
    return QuantReport(
        src=src, dst=dst, weights=weights, form=form, method=method, block_size=block_size,
        symmetric=symmetric if method == "rtn" else False, quantized=done, skipped=skipped,
        unmatched_exclude=unmatched, bytes_before=sum(before.values()), bytes_after=sum(after.values()),
        weight_bytes_before=sum(before[n] for n in weight_names if n not in after),
        weight_bytes_after=sum(b for n, b in after.items() if n not in before),
        external_data=external, seconds=round(time.perf_counter() - start, 3),
    )


def quantize_build(directory: Path, graphs: Collection[str], request: Any, tied: bool, log: Any = print) -> dict:
    """Quantize a build's decoder segments (and vision.onnx with `quantize_vision`) in place, weight-only:
    one form per graph, the QDQ one (block-wise / per-channel DequantizeLinear + MatMul), which TensorRT
    consumes and ONNX Runtime fuses into MatMulNBits when it loads the graph; so no weight is stored twice.
    hqq keeps float zero points that only MatMulNBits takes: its graphs are ONNX Runtime's form.
    A tied LM head stays float (its weight is the embedding table the runtime looks rows up in); an untied
    one is quantized like the layers.
    Returns {graph: report dict}."""
    import shutil
    import tempfile

    form = "matmulnbits" if request.quant_method == "hqq" else "qdq"
    targets = [g for g in graphs if g.startswith("decoder.")] + (["vision"] if request.quantize_vision else [])
    reports = {}
    for graph in targets:
        src = directory / f"{graph}.onnx"
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            dst = Path(scratch) / src.name
            report = quantize_graph(src, dst, request.weights, request.block_size, request.quant_method, form=form,
                                    untranspose=not tied and graph.startswith("decoder."))
            for old in [src, src.with_name(src.name + ".data")]:
                old.unlink(missing_ok=True)
            for new in Path(scratch).iterdir():
                shutil.move(str(new), directory / new.name)
        reports[graph] = {"quantized": len(report.quantized), "skipped": report.skipped, "form": form,
                          "weight_bytes_before": report.weight_bytes_before, "weight_bytes_after": report.weight_bytes_after}
        log(f"{graph}: {len(report.quantized)} MatMul quantized, {len(report.skipped)} kept float")
    return reports
