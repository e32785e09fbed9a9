"""Stable names of every graph and of every graph input and output: the contract between export,
manifest and runtime. One place, like onnxruntime-genai's builder.

Shapes use these symbols: `crops` image crops (1 for LLaVA-1.5, 1 + rows*cols for LLaVA-NeXT), `k`
patch tokens kept per crop, `n` visual tokens in the prompt (crops * k, + one newline per grid row for
NeXT), `D` LLM hidden size, `Hkv` KV heads, `Dh` head size, `V` vocabulary, `q` the tokens of one
call (the prompt's P at prefill, after earlier FiCoCo-L steps at later segments; 1 at decode), `C_s`
the cache capacity of segment s's layers, `Tb` prompt tokens before the image.

The LLM is stored once. It is split at each FiCoCo-L layer L_1 < ... < L_S into S + 1 weighted
segments and S weightless reductions; every segment serves both the prefill and the decode:

    decoder.0   layers 0 .. L_1 - 1, then layer L_1 up to its attention residual
    reduce.1    FiCoCo-L at L_1 (prefill only; decode passes decoder.0's output straight on)
    decoder.1   layer L_1's MLP block, layers L_1 + 1 .. L_2 - 1, layer L_2 up to its attention residual
    ...
    decoder.S   layer L_S's MLP block, layers L_S + 1 .. end, the final norm and the LM head

Without FiCoCo-L there is one segment, decoder.0. Segment s caches the layers whose attention it
runs: decoder.0 layers 0 .. L_1, decoder.s layers L_s + 1 .. L_{s+1} (the last: to the end). The
segments, their layers and cache capacities are the build plan's (`ficoco.BuildPlan.segments`).

vision.onnx
    in   pixel_values        [crops, 3, S, S]   float
    out  image_features      [n, D]             float   projected, CLS dropped, laid out as the prompt's visual tokens
    out  kept_positions      [crops, k]         int64   raster index on the patch grid
embed.onnx (only when the LM head is not tied to the input embeddings)
    in   input_ids           [1, q]             int64
    out  inputs_embeds       [1, q, D]          float
decoder.{s}.onnx
    in   hidden_states       [1, q, D]          float   decoder.0: the prompt's embeddings with the image features
                                                        spliced in (text before, image_features, text after)
    in   position_ids        [1, q]             int64   original prompt numbering (kept through FiCoCo-L)
    in   past_length         [1]                int64   rows of every past buffer of this segment that hold the past
    in   past.{i}.key        [1, Hkv, C_s, Dh]  float   layer i's cache buffer (any capacity C_s >= past_length;
    in   past.{i}.value      [1, Hkv, C_s, Dh]  float   rows from past_length on are ignored; C_s may be 0)
    out  present.{i}.key     [1, Hkv, q, Dh]    float   the q new rows only, for rows past_length .. past_length + q - 1
    out  present.{i}.value   [1, Hkv, q, Dh]    float
    out  attended            [1, q, D]          float   s < S: residual stream after layer L_{s+1}'s attention
    out  attention           [1, q, q]          float   s < S: that attention's map over the q new tokens, head-averaged
    out  logits              [1, V]             float   s = S: last position only
reduce.{s}.onnx (weightless)
    in   attended, attention, position_ids (as decoder.{s-1} took them)
    in   input_ids_before    [1, Tb]            int64   read for its length: the visual span starts at Tb
    out  hidden_states       [1, reduced, D]    float   decoder.{s}'s input (reduced = q - r_s)
    out  reduced_position_ids [1, reduced]      int64   decoder.{s}'s position_ids
    out  kept                [1, kept]          int64   the kept tokens' indices in the step's visual span, ascending

The text embeddings are looked up by the runtime from the table in the build's ONNX external data
(manifest `embedding`: the LM head's weight when it is tied, else embed.onnx's table), so every
weight is stored once: in the graphs, and once in the engines of one compute capability.

The KV cache is one buffer per layer, allocated once by the runtime at its capacity (max_seq_len, less
the tokens FiCoCo-L removed before that layer). A step reads the past from the buffer in place and
returns only the new rows, which the runtime writes into the buffer: nothing else is copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ficoco.plan import BuildPlan

VISION, EMBED = "vision", "embed"

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
KEPT_POSITIONS = "kept_positions"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
INPUT_IDS_BEFORE = "input_ids_before"
INPUT_IDS_AFTER = "input_ids_after"  # the verification's prefill phase (text after the image)
HIDDEN_STATES = "hidden_states"
POSITION_IDS = "position_ids"
PAST_LENGTH = "past_length"
ATTENDED = "attended"
ATTENTION = "attention"
REDUCED_POSITION_IDS = "reduced_position_ids"
KEPT = "kept"
LOGITS = "logits"


def decoder(segment: int) -> str:
    """`decoder.{segment}`."""
    return f"decoder.{segment}"


def reduce(step: int) -> str:
    """`reduce.{step}` (steps count from 1: reduce.s sits between decoder.{s-1} and decoder.{s})."""
    return f"reduce.{step}"


def graph_names(plan: BuildPlan, embed: bool) -> list[str]:
    """Every graph of a build of `plan`, in running order: decoder.s, then reduce.{s+1} where a FiCoCo-L step follows."""
    llm = [g for segment in plan.segments for g in [decoder(segment.index)] + ([reduce(segment.index + 1)] if segment.step else [])]
    return [VISION, *([EMBED] if embed else []), *llm]


def past(layer: int, kind: str) -> str:
    """`past.{layer}.key` / `past.{layer}.value`."""
    assert kind in ("key", "value"), kind
    return f"past.{layer}.{kind}"


def present(layer: int, kind: str) -> str:
    """`present.{layer}.key` / `present.{layer}.value`."""
    assert kind in ("key", "value"), kind
    return f"present.{layer}.{kind}"


def cache_names(prefix, layers) -> list[str]:
    """[prefix(first, key), prefix(first, value), ...] over `layers` (an int n: layers 0 .. n-1)."""
    layers = range(layers) if isinstance(layers, int) else layers
    return [prefix(i, kind) for i in layers for kind in ("key", "value")]


def io_names(graph: str, plan: BuildPlan) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a graph of a build of `plan`, in order."""
    if graph == VISION:
        return [PIXEL_VALUES], [IMAGE_FEATURES, KEPT_POSITIONS]
    if graph == EMBED:
        return [INPUT_IDS], [INPUTS_EMBEDS]
    kind, _, index = graph.partition(".")
    if kind == "reduce" and index.isdigit():
        return [ATTENDED, ATTENTION, POSITION_IDS, INPUT_IDS_BEFORE], [HIDDEN_STATES, REDUCED_POSITION_IDS, KEPT]
    if kind == "decoder" and index.isdigit() and int(index) < len(plan.segments):
        segment = plan.segments[int(index)]
        tail = [LOGITS] if segment.step is None else [ATTENDED, ATTENTION]
        return ([HIDDEN_STATES, POSITION_IDS, PAST_LENGTH, *cache_names(past, segment.layers)],
                [*tail, *cache_names(present, segment.layers)])
    raise ValueError(f"unknown graph {graph!r}; graphs are {graph_names(plan, True)}")
