"""Stable names of every graph input and output: the contract between export, manifest and runtime.

One place, like onnxruntime-genai's builder. Shapes use these symbols:
`crops` image crops (1 for LLaVA-1.5, 1 + rows*cols for LLaVA-NeXT), `k` patch
tokens kept per crop, `D` LLM hidden size, `Hkv` KV heads, `Dh` head size,
`V` vocabulary, `Tb` / `Ta` prompt tokens before / after the image, `n` visual
tokens in the prompt, `P` the prompt length `Tb + n + Ta`, `len_i` layer i's
cache length (P for layers up to a FiCoCo-L step, P - r after it).

vision.onnx
    in   pixel_values        [crops, 3, 336, 336] float
    out  image_features      [crops, k, D]        float   projected, CLS dropped
    out  kept_positions      [crops, k]           int64   raster index on the 24x24 patch grid
prefill.onnx
    in   input_ids_before    [1, Tb]              int64   text before the image (BOS, system, "USER: ")
    in   image_features      [crops, k, D]        float   vision.onnx's output, laid out inside the graph
    in   input_ids_after     [1, Ta]              int64   text after the image (instruction, "ASSISTANT:")
    out  logits              [1, V]               float   last position only
    out  present.{i}.key     [1, Hkv, len_i, Dh]  float   for every decoder layer i
    out  present.{i}.value   [1, Hkv, len_i, Dh]  float
decode.onnx
    in   input_ids           [1, 1]               int64
    in   position_ids        [1, 1]               int64   P + t for the t-th generated token (original numbering)
    in   past.{i}.key        [1, Hkv, past_i, Dh] float   the previous step's present.{i}.key
    in   past.{i}.value      [1, Hkv, past_i, Dh] float
    out  logits              [1, V]               float
    out  present.{i}.key     [1, Hkv, past_i + 1, Dh]
    out  present.{i}.value   [1, Hkv, past_i + 1, Dh]

The decode graph returns the whole cache (past and the new token's K/V
concatenated), the convention of Hugging Face's and Optimum's ONNX decoders: a
step reads and writes `2 * layers * Hkv * len_i * Dh` values per layer, which
grows linearly with the sequence.
"""

from __future__ import annotations

VISION, PREFILL, DECODE = "vision", "prefill", "decode"
GRAPHS = (VISION, PREFILL, DECODE)

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
KEPT_POSITIONS = "kept_positions"
INPUT_IDS_BEFORE = "input_ids_before"
INPUT_IDS_AFTER = "input_ids_after"
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past(layer: int, kind: str) -> str:
    """`past.{layer}.key` / `past.{layer}.value`."""
    assert kind in ("key", "value"), kind
    return f"past.{layer}.{kind}"


def present(layer: int, kind: str) -> str:
    """`present.{layer}.key` / `present.{layer}.value`."""
    assert kind in ("key", "value"), kind
    return f"present.{layer}.{kind}"


def cache_names(prefix, layers: int) -> list[str]:
    """[prefix(0, key), prefix(0, value), prefix(1, key), ...]."""
    return [prefix(i, kind) for i in range(layers) for kind in ("key", "value")]


def io_names(graph: str, layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a graph, in order."""
    if graph == VISION:
        return [PIXEL_VALUES], [IMAGE_FEATURES, KEPT_POSITIONS]
    if graph == PREFILL:
        return [INPUT_IDS_BEFORE, IMAGE_FEATURES, INPUT_IDS_AFTER], [LOGITS, *cache_names(present, layers)]
    if graph == DECODE:
        return [INPUT_IDS, POSITION_IDS, *cache_names(past, layers)], [LOGITS, *cache_names(present, layers)]
    raise ValueError(f"unknown graph {graph!r}; graphs are {GRAPHS}")
