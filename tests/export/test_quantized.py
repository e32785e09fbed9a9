"""--weights int4: a quantized build verifies, holds its weights once in QDQ form, builds TensorRT-RTX
engines, and the runtime generates from it on ONNX Runtime (which fuses the QDQ pairs into MatMulNBits)."""

from __future__ import annotations

import onnx
import pytest

from export.build import main
from export.memory import initializer_bytes
from runtime.manifest import check_files, read
from tests.conftest import rtx_installed


def decoder_bytes(directory) -> int:
    return sum(initializer_bytes(directory / e["file"]) for g, e in read(directory)["graphs"].items() if g.startswith("decoder."))


def test_int4_build_verifies_and_quantizes_every_decoder_matmul(quant_build_dir, build_dir):
    directory = quant_build_dir("1.5-l-int4")
    manifest = read(directory)
    check_files(directory, manifest["graphs"])
    assert manifest["parity"]["passed"]  # the float graphs passed the exact gates before quantization
    q = manifest["quantization"]
    assert q["weights"] == "int4" and q["quality"]["passed"] and q["quality"]["prompts"] == 6
    assert q["quality"]["agreement"] >= q["quality"]["gate"]["agreement"]
    for graph in ("decoder.0", "decoder.1"):
        model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
        dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        int4 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
        assert len(dequantized) == q["graphs"][graph]["quantized"] > 0 and int4
        assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in {
            t.name for t in model.graph.initializer if len(t.dims) == 2}]  # no float weight left beside them
    # against the same fp32 build: the layers' linear weights at 4.5 bits of 32; the LM head ([749, 128],
    # a transposed initializer, a quarter of this tiny decoder) stays float
    assert decoder_bytes(directory) <= 0.3 * decoder_bytes(build_dir("1.5-l"))
    if rtx_installed():
        assert all(e["parser_errors"] == 0 for e in manifest["engines"].values())
        check_files(directory, manifest["engines"])


def test_runtime_generates_from_the_int4_build(quant_build_dir):
    """The torch-free runtime's greedy tokens on the verification picture equal the export's chain's."""
    from PIL import Image

    from runtime.pipeline import Pipeline

    directory = quant_build_dir("1.5-l-int4")
    expected = read(directory)["quantization"]["quality"]["greedy_tokens"]
    image = Image.linear_gradient("L").resize((500, 400)).convert("RGB")
    with Pipeline.from_build(directory, backend="onnxruntime") as pipe:
        result = pipe(image, "Describe the image.", max_new_tokens=len(expected))
    assert list(result.token_ids) == expected


@pytest.mark.parametrize("args, message", [
    (["--weights", "int3"], "invalid choice: 'int3'"),
    (["--weights", "fp16", "--precision", "fp32"], "use --precision fp16"),
    (["--weights", "int4", "--block-size", "24"], "power of two >= 16, got 24"),
    (["--weights", "int8", "--quant-method", "hqq"], "hqq applies to --weights int4"),
    (["--quantize-vision"], "apply to --weights int8 / int4"),
])
def test_bad_weight_flags_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "build"
    with pytest.raises(SystemExit) if "int3" in args else _no_raise():
        code = main(["--ratio", "0.5", "--backend", "none", "--out", str(out), *args])
        assert code == 2
    assert message in capsys.readouterr().err and not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
