"""A memory plan of a FiCoCo LLaVA build from its shape-only config (no weights read, no torch).

What a build holds on the device, per graph of the export layout: `vision` (CLIP
tower + projector, LLaVA-NeXT's image_newline too), `embed` (the token table; 0
when the LM head is tied to it: the table then lives once, with the LM head),
and the decoder split at each FiCoCo-L reduction layer into `decoder.0`,
`decoder.1`, ... (the last segment holds the final norm and the LM head; the
`reduce.N` graphs are weightless). Plus one KV-cache buffer per decoder layer,
allocated once at the build plan's capacities (`BuildPlan.capacities`), and an activation / workspace estimate.
Caches are sized for `max_seq_len`: FiCoCo-L shortens those after its layers,
FiCoCo-V only the prompt (so the prefill's activations, through `prompt_len`).
The token table is counted as device memory although the runtime looks text
embeddings up on the host (the same DRAM on a Jetson). Left out: the host copy
of an engine while it loads.

Units: bytes everywhere (ints); GiB = 2**30 bytes in what is printed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import FiCoCoConfig, Step
from ..geometry import text_config, text_geometry
from ..plan import BuildPlan, plan

GiB = 2**30
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
WEIGHTS = (*FLOAT_BYTES, "int8", "int4")
KV_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
ACTIVATION_FACTOR = 4  # live [T, hidden + intermediate]-sized tensors of one layer, with slack (see activation_estimate)


# --------------------------------------------------------------------------- parameters, as Hugging Face counts them


@dataclass(frozen=True)
class Linear:
    """nn.Linear(fan_in, fan_out, bias): weight [fan_out, fan_in]."""

    fan_in: int
    fan_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)

    def nbytes(self, weights: str, block_size: int) -> int:
        """Float formats: every parameter at its width. int8: 1 byte per weight + an fp16 scale per output
        row. int4: 4 bits per weight + per block of `block_size` inputs of a row an fp16 scale and a
        4-bit zero point. The bias stays fp16 in both."""
        if weights in FLOAT_BYTES:
            return self.params * FLOAT_BYTES[weights]
        bias = 2 * self.fan_out if self.bias else 0
        if weights == "int8":
            return self.fan_in * self.fan_out + 2 * self.fan_out + bias
        blocks = self.fan_out * math.ceil(self.fan_in / block_size)
        nibbles = self.fan_in * self.fan_out + blocks  # weights + zero points, 4 bits each
        return math.ceil(nibbles / 2) + 2 * blocks + bias


@dataclass(frozen=True)
class Block:
    """A piece of a graph: its quantizable linears and `other` parameters that stay in float
    (embeddings, norms, the patch conv, position / class embeddings, image_newline, the LM head)."""

    linears: tuple[Linear, ...] = ()
    other: int = 0

    def __add__(self, more: Block) -> Block:
        return Block(self.linears + more.linears, self.other + more.other)

    @property
    def params(self) -> int:
        return sum(x.params for x in self.linears) + self.other

    def nbytes(self, weights: str, block_size: int = 32) -> int:
        other = FLOAT_BYTES.get(weights, 2)  # int8 / int4 keep the rest in fp16
        return sum(x.nbytes(weights, block_size) for x in self.linears) + self.other * other


def tied_embeddings(config: dict) -> bool:
    """Whether the LM head shares the token table, as transformers 5 decides: the top-level
    `tie_word_embeddings`; LlavaConfig (not LlavaNextConfig) also takes text_config's."""
    from_text = config.get("model_type") != "llava_next" and text_config(config).get("tie_word_embeddings", False)
    return bool(config.get("tie_word_embeddings") or from_text)


def attention_block(config: dict) -> Block:
    """input_layernorm + q, k, v, o (biases with `attention_bias`); rotary has no parameters."""
    text = text_config(config)
    t = text_geometry(config)
    hidden, heads, kv_heads, head_dim = t.hidden, t.heads, t.kv_heads, t.head_dim
    bias = bool(text.get("attention_bias", False))
    q, kv = Linear(hidden, heads * head_dim, bias), Linear(hidden, kv_heads * head_dim, bias)
    return Block((q, kv, kv, Linear(heads * head_dim, hidden, bias)), other=hidden)


def mlp_block(config: dict) -> Block:
    """post_attention_layernorm + gate, up, down (biases with `mlp_bias`)."""
    text = text_config(config)
    hidden, inter, bias = text["hidden_size"], text["intermediate_size"], bool(text.get("mlp_bias", False))
    return Block((Linear(hidden, inter, bias), Linear(hidden, inter, bias), Linear(inter, hidden, bias)), other=hidden)


def vision_block(config: dict) -> Block:
    """CLIPVisionModel (embeddings, pre_layrnorm, every encoder layer, post_layernorm), the projector and,
    for LLaVA-NeXT, image_newline. HF builds all layers, also those after `vision_feature_layer` that LLaVA
    never reads, so this is an upper bound for a graph that drops them (one CLIP-L layer: 12.6M)."""
    vision, hidden = config["vision_config"], text_config(config)["hidden_size"]
    width, inter, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1  # patches + CLS
    embeddings = width + vision.get("num_channels", 3) * width * patch * patch + positions * width  # class, conv, pos
    layer = Block((*[Linear(width, width, True)] * 4, Linear(width, inter, True), Linear(inter, width, True)),
                  other=2 * 2 * width)  # q, k, v, out_proj, fc1, fc2; layer_norm1/2 (weight + bias)
    tower = Block(other=embeddings + 2 * 2 * width)  # + pre_layrnorm, post_layernorm
    for _ in range(vision["num_hidden_layers"]):
        tower = tower + layer
    feature = config.get("vision_feature_layer", -2)
    fan_in = width * (1 if isinstance(feature, int) else len(feature))
    bias = bool(config.get("multimodal_projector_bias", True))
    projector = Block((Linear(fan_in, hidden, bias), Linear(hidden, hidden, bias)))
    return tower + projector + Block(other=hidden if config.get("model_type") == "llava_next" else 0)


def segment_blocks(config: dict, reduction_layers: Sequence[int] = ()) -> list[Block]:
    """The decoder split at each FiCoCo-L layer L. FiCoCo-L runs between L's attention and its MLP
    (`ficoco.patch.llama.reducing_layer`), so L's attention (with input_layernorm) ends segment s and its
    MLP (with post_attention_layernorm) starts segment s + 1. The last segment adds the final norm and the
    LM head (which holds the token table when tied)."""
    text = text_config(config)
    layers, cuts = text["num_hidden_layers"], list(reduction_layers)
    if cuts != sorted(set(cuts)) or (cuts and not 0 <= cuts[0] <= cuts[-1] < layers):
        raise ValueError(f"reduction layers must be distinct ascending decoder layers in [0, {layers}), got {cuts}")
    attention, mlp = attention_block(config), mlp_block(config)
    segments = [Block()]
    for layer in range(layers):
        segments[-1] = segments[-1] + attention
        if layer in cuts:
            segments.append(Block())
        segments[-1] = segments[-1] + mlp
    head = text["vocab_size"] * text["hidden_size"]  # lm_head [vocab, hidden], no bias
    segments[-1] = segments[-1] + Block(other=text["hidden_size"] + head)  # final norm + lm_head
    return segments


def graph_blocks(config: dict, reduction_layers: Sequence[int] = ()) -> dict[str, Block]:
    """{graph name: Block} of the build layout: vision, embed (empty when tied), decoder.0 .. decoder.n."""
    text = text_config(config)
    embed = Block() if tied_embeddings(config) else Block(other=text["vocab_size"] * text["hidden_size"])
    segments = segment_blocks(config, reduction_layers)
    return {"vision": vision_block(config), "embed": embed, **{f"decoder.{s}": b for s, b in enumerate(segments)}}


def _check_weights(weights: str, block_size: int) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def parameter_counts(config: dict, reduction_layers: Sequence[int] | None = None) -> dict[str, int]:
    """Parameters per graph, like weight_bytes; vision + embed + decoder = HF's sum(p.numel())."""
    blocks = graph_blocks(config, reduction_layers or ())
    counts = {name: block.params for name, block in blocks.items()}
    return _decoder_total(counts, reduction_layers is not None)


def _decoder_total(per_graph: dict[str, int], segments: bool) -> dict[str, int]:
    decoder = {k: v for k, v in per_graph.items() if k.startswith("decoder.")}
    rest = {k: v for k, v in per_graph.items() if k not in decoder}
    return {**rest, "decoder": sum(decoder.values()), **(decoder if segments else {})}


def weight_bytes(config: dict, weights: str = "fp16", vision_weights: str | None = None,
                 reduction_layers: Sequence[int] | None = None, block_size: int = 32) -> dict[str, int]:
    """Parameter bytes per graph: "vision", "embed" (0 when tied), "decoder" (all segments) and, when
    `reduction_layers` is given (the FiCoCo-L layers, () for none), "decoder.0" .. "decoder.n".

    `weights` (and `vision_weights`, default: the same) is fp32, fp16, bf16, int8 or int4. int8 / int4
    quantize the weight matrices of the decoder's linear layers (q, k, v, o, gate, up, down), and for the
    vision graph those of CLIP's encoder layers and of the projector: int8 one byte per weight plus an fp16
    scale per output channel; int4 half a byte per weight plus, per block of `block_size` input elements of
    each output row, an fp16 scale and a uint4 zero point. The token embeddings, the LM head, the norms,
    biases, the patch conv and CLIP's position / class embeddings stay fp16 under int8 / int4.
    """
    vision_weights = weights if vision_weights is None else vision_weights
    _check_weights(weights, block_size)
    _check_weights(vision_weights, block_size)
    blocks = graph_blocks(config, reduction_layers or ())
    nbytes = {name: block.nbytes(vision_weights if name == "vision" else weights, block_size)
              for name, block in blocks.items()}
    return _decoder_total(nbytes, reduction_layers is not None)


# --------------------------------------------------------------------------- KV cache


def kv_bytes(p: BuildPlan, kv_dtype_bytes: int = 2) -> int:
    """Sum over layers of 2 (K, V) * kv_heads * head_dim * capacity * kv_dtype_bytes (the plan's capacities)."""
    return sum(2 * p.text.kv_heads * p.text.head_dim * c * kv_dtype_bytes for c in p.capacities)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """Device memory of one build: weights per graph, the KV cache, an activation / workspace estimate."""

    model: str
    setting: str  # "none" or e.g. "FiCoCo-V ratio 0.25"
    weight_format: str  # the decoder's; vision_format the vision graph's
    vision_format: str
    kv_dtype: str
    max_seq_len: int  # tokens the KV cache holds (prompt + answer)
    prompt_len: int  # the longest prefill the activation estimate is sized for
    crops: int
    visual_tokens: int  # into the LLM, unreduced by FiCoCo-L
    language_steps: tuple[Step, ...]
    weights: dict[str, int]  # {graph: bytes}: vision, embed (0 when tied), decoder.0 .. decoder.n
    kv_capacities: tuple[int, ...]  # tokens per decoder layer
    kv_bytes: int
    activation_bytes: int  # activation_estimate, or what TensorRT reported (activation_source)
    activation_source: str = "estimate"

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


def activation_estimate(config: dict, prompt_len: int, crops: int, act_bytes: int, ficoco_l: bool) -> int:
    """Bytes of the largest live activations of one graph run (graphs run one at a time), an estimate.

    prefill of P = prompt_len tokens: P * (hidden + intermediate) * act_bytes * ACTIVATION_FACTOR (4: the
    residual, normed input, q / k / v, gate, up and their product of one layer, with slack), plus one
    layer's attention as the decoder segments run it (export/segments.buffer_attention: unfused, the past
    empty at a prefill): scores [heads, P, P] in fp32 and the probabilities [heads, P, P] in act_bytes;
    plus, with FiCoCo-L, the head-mean map [P, P] fp32 that reduce.N reads. vision: the same for CLIP on
    crops x (patches + 1) tokens (eager attention, as FiCoCo-V exposes it). The answer is the larger.
    A real build replaces this by TensorRT's device memory per engine (ICudaEngine.device_memory_size),
    which is sized for the optimization profile's largest shapes (plan_memory's engine_memory).
    """
    text, vision = text_config(config), config["vision_config"]
    heads = text_geometry(config).heads
    prefill = prompt_len * (text["hidden_size"] + text["intermediate_size"]) * act_bytes * ACTIVATION_FACTOR
    prefill += heads * prompt_len**2 * (4 + act_bytes) + (prompt_len**2 * 4 if ficoco_l else 0)
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # per crop
    encoder = crops * tokens * (vision["hidden_size"] + vision["intermediate_size"]) * act_bytes * ACTIVATION_FACTOR
    encoder += crops * vision["num_attention_heads"] * tokens**2 * (4 + act_bytes)
    return max(prefill, encoder)


def describe(ficoco: FiCoCoConfig | None) -> str:
    if ficoco is None:
        return "none"
    amount = f"ratio {ficoco.ratio}" if ficoco.ratio is not None else f"tokens {ficoco.tokens}"
    return f"FiCoCo-{ficoco.variant.upper()} {amount}"


def plan_memory(config: dict, ficoco: FiCoCoConfig | None, max_seq_len: int, weights: str = "fp16",
                grid: tuple[int, int] | None = None, **options) -> MemoryPlan:
    """The memory plan of a build of `config` under `ficoco` (None: unreduced) for a prompt plus answer of
    up to `max_seq_len` tokens: `memory_of` the build plan (`ficoco.plan`) with LLaVA-NeXT's anyres `grid`
    (default: the grid of most crops)."""
    p = plan(config, ficoco, grid, max_seq_len)  # ValueError when FiCoCo-L leaves max_seq_len no room
    return memory_of(config, p, weights, setting=describe(ficoco), **options)


def memory_of(config: dict, p: BuildPlan, weights: str = "fp16", *, setting: str = "", vision_weights: str | None = None,
              kv_dtype: str | None = None, block_size: int = 32, prompt_len: int | None = None,
              engine_memory: int | None = None) -> MemoryPlan:
    """The memory plan of a build of `config` with plan `p` (see weight_bytes, kv_bytes, activation_estimate).
    `kv_dtype` defaults to fp32 for fp32 weights, else fp16. `prompt_len` (default max_seq_len: a prompt may
    fill the cache) sizes the prefill's activations. `engine_memory`: TensorRT's device memory (the largest
    over the build's engines, which run one at a time) replaces the activation estimate."""
    kv_dtype = kv_dtype or ("fp32" if weights == "fp32" else "fp16")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, got {kv_dtype!r}")
    max_seq_len, visual = p.max_seq_len, p.visual_tokens
    if max_seq_len <= visual:
        raise ValueError(f"max_seq_len={max_seq_len} cannot hold the {visual} visual tokens and a text token")
    prompt_len = max_seq_len if prompt_len is None else prompt_len
    if not (isinstance(prompt_len, int) and visual < prompt_len <= max_seq_len):
        raise ValueError(f"prompt_len must be more than the {visual} visual tokens and at most max_seq_len "
                         f"{max_seq_len}, got {prompt_len!r}")
    graphs = weight_bytes(config, weights, vision_weights, list(p.reduction_layers), block_size)
    act = activation_estimate(config, prompt_len, p.crops, 4 if weights == "fp32" else 2, bool(p.language))
    return MemoryPlan(
        model=str(config.get("_name_or_path") or config.get("model_type", "?")), setting=setting or describe(None),
        weight_format=weights, vision_format=vision_weights or weights, kv_dtype=kv_dtype,
        max_seq_len=max_seq_len, prompt_len=prompt_len, crops=p.crops, visual_tokens=visual,
        language_steps=p.language,
        weights={k: v for k, v in graphs.items() if k != "decoder"},
        kv_capacities=p.capacities, kv_bytes=kv_bytes(p, KV_DTYPES[kv_dtype]),
        activation_bytes=act if engine_memory is None else engine_memory,
        activation_source="estimate" if engine_memory is None else "TensorRT",
    )


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """A target: `memory` bytes in all, `system_reserve` of them not available to the build."""

    name: str
    memory: int
    system_reserve: int
    shared: bool  # CPU and GPU share the memory (Jetson)

    @property
    def available(self) -> int:
        return self.memory - self.system_reserve


DEVICES: tuple[Device, ...] = (
    Device("Jetson Orin Nano 8 GB", 8 * GiB, int(2.5 * GiB), True),
    Device("Jetson Orin NX 16 GB", 16 * GiB, 3 * GiB, True),
    Device("Jetson AGX Orin 32 GB", 32 * GiB, 4 * GiB, True),
    Device("Jetson AGX Orin 64 GB", 64 * GiB, 4 * GiB, True),
    Device("Jetson Thor 128 GB", 128 * GiB, 8 * GiB, True),
    Device("RTX 4090 24 GB", 24 * GiB, 1 * GiB, False),
)
"""System reserves (judgement, not measurements). A Jetson's DRAM is shared by the OS, the runtime's CPU
side and the GPU; the reserve is what is gone before the build loads: firmware carve-outs (about 0.5 GiB
on Orin: an 8 GB Orin Nano's kernel sees about 7.4 GiB), the JetPack (L4T Ubuntu) desktop and services
(1 to 1.5 GiB, less headless), the CUDA context with TensorRT's / cuBLAS's kernels and the host runtime
process (0.5 to 1 GiB): 2.5 GiB on the Orin Nano 8 GB, 3 GiB on the Orin NX 16 GB, 4 GiB on the AGX
Orins (larger carve-outs and page tables, some page cache), 8 GiB on Thor (JetPack 7's larger firmware
and driver footprint, headroom for other processes on a 128 GB machine). The RTX 4090's 24 GiB are its
own; 1 GiB goes to the CUDA context and a display, if one is attached."""


def fits(plan: MemoryPlan, devices: Sequence[Device] = DEVICES) -> list[tuple[Device, int, bool]]:
    """(device, bytes left after the plan, whether it fits) for each device."""
    return [(d, d.available - plan.total, d.available >= plan.total) for d in devices]


# --------------------------------------------------------------------------- printing


def gib(nbytes: int) -> str:  # bytes -> "x.xx" GiB
    return f"{nbytes / GiB:.2f}"


def _runs(capacities: Sequence[int]) -> str:
    """[2048, 2048, 1760] -> '2 x 2048, 1 x 1760'."""
    return ", ".join(f"{len(list(group))} x {c}" for c, group in itertools.groupby(capacities))


def format_plan(plan: MemoryPlan, devices: Sequence[Device] = DEVICES) -> list[str]:
    """Markdown lines: the plan, then (unless `devices` is empty) whether it fits each device."""
    steps = ", ".join(f"layer {s.layer}: {s.tokens_in} -> {s.tokens_out}" for s in plan.language_steps) or "none"
    lines = [f"memory plan: {plan.model}, {plan.setting}, weights {plan.weight_format} (vision {plan.vision_format}), "
             f"KV {plan.kv_dtype}, max_seq_len {plan.max_seq_len}, prompt_len {plan.prompt_len}",
             f"visual tokens into the LLM: {plan.visual_tokens} ({plan.crops} crop(s)); FiCoCo-L steps: {steps}", "",
             "| part | bytes | GiB |", "|---|---:|---:|"]
    last = max(k for k in plan.weights if k.startswith("decoder."))
    for name, nbytes in plan.weights.items():
        tied = f" (tied: the table is the LM head's, in {last})" if name == "embed" and not nbytes else ""
        lines.append(f"| {name}{tied} | {nbytes:,} | {gib(nbytes)} |")
    lines += [f"| weights | {plan.weight_bytes:,} | {gib(plan.weight_bytes)} |",
              f"| KV cache ({_runs(plan.kv_capacities)} tokens) | {plan.kv_bytes:,} | {gib(plan.kv_bytes)} |",
              f"| activations / workspace ({plan.activation_source}) | {plan.activation_bytes:,} | {gib(plan.activation_bytes)} |",
              f"| **total** | {plan.total:,} | {gib(plan.total)} |"]
    if devices:
        lines += ["", "| device | memory GiB | system reserve GiB | free after GiB | fits |", "|---|---:|---:|---:|---|"]
        lines += [f"| {d.name} | {gib(d.memory)} | {gib(d.system_reserve)} | {gib(free)} | {'yes' if ok else 'no'} |"
                  for d, free, ok in fits(plan, devices)]
    return lines


def plan_dict(plan: MemoryPlan, devices: Sequence[Device] = DEVICES) -> dict:
    """A JSON-ready dict of the plan (bytes; language steps as {layer, tokens_in, tokens_out}) and its devices."""
    return {**dataclasses.asdict(plan), "weight_bytes": plan.weight_bytes, "total": plan.total,
            "devices": [{**dataclasses.asdict(d), "free_after": free, "fits": ok} for d, free, ok in fits(plan, devices)]}
