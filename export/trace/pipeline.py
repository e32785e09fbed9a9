"""The torch side of `export.build`: load, patch, export the graphs, describe them for the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import torch

from ficoco import BuildPlan, FiCoCoConfig, apply
from ficoco import plan as build_plan
from ficoco.plan import default_max_seq_len
from ficoco.analysis import flops as flops_model
from ficoco.patch.llava import Plan
from runtime.manifest import MAX_SEQ_LEN_KEY, file_entry

from runtime import names
from .graphs import GraphSet, export_onnx
from ..request import BuildRequest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTERNAL_DATA_BYTES = 1_800_000_000  # graphs whose weights pass this use ONNX external data (protobuf limit 2 GB)


def load_model(request: BuildRequest):
    """(model, processor, source dir) through the same loader as any checkpoint."""
    import json

    from ficoco.patch.llava import ADAPTERS
    from ficoco.models.presets import load, resolve_model_dir

    source = resolve_model_dir(request.model)
    architectures = json.loads((source / "config.json").read_text()).get("architectures") or ["(none listed)"]
    if architectures[0] not in ADAPTERS:
        raise ValueError(f"unsupported architecture {architectures[0]} in {source}; export.build supports {sorted(ADAPTERS)}")
    model, processor = load(source, dtype=DTYPES[request.precision])
    return model, processor, source


class Fp32LayerNorm(torch.nn.LayerNorm):
    """LayerNorm computed in fp32 inside a half-precision graph (TensorRT-RTX takes types from the ONNX)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def keep_norms_fp32(model) -> int:
    """Make every LayerNorm of a half-precision model compute in fp32 (Llama's RMSNorm and the
    attention softmax already do); returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.LayerNorm and module.weight is not None and module.weight.dtype != torch.float32:
            module.__class__ = Fp32LayerNorm
            changed += 1
    return changed


def fix_grid(model, processor, grid: tuple[int, int]) -> None:
    """LLaVA-NeXT: pin the anyres grid (one the plan accepted) so every FiCoCo size is static (model and processor agree)."""
    side = model.config.vision_config.image_size
    pinpoint = [grid[0] * side, grid[1] * side]
    model.config.image_grid_pinpoints = [pinpoint]
    processor.image_processor.image_grid_pinpoints = [pinpoint]


def patch(model, processor, request: BuildRequest, plan: BuildPlan | None = None) -> tuple[Plan, BuildPlan]:
    """Apply FiCoCo (crop layout, static) for `request` (--tokens, not --tflops: `request.resolve_budget`);
    `plan` is the build's (`request.check_model`), else it is resolved here from the model's config, once."""
    next_model = type(model).__name__ == "LlavaNextForConditionalGeneration"
    config: FiCoCoConfig = request.ficoco_config()
    if plan is None:  # ValueError naming --grid where the model has no such grid (or none: LLaVA-1.5)
        grid = request.grid if next_model or request.grid_given else None
        settings = model.config.to_dict()
        plan = build_plan(settings, config, grid, max_seq_len=request.max_seq_len or default_max_seq_len(settings, grid))
    if next_model:
        fix_grid(model, processor, plan.grid)
    if request.precision != "fp32":
        keep_norms_fp32(model)
    apply(model, config)
    return model.ficoco_plan, plan


def prompt_lengths(source: Path, image_token_id: int, verifying: bool) -> tuple[list[tuple[int, int]], int]:
    """(text tokens before, after the image) of each prompt the build runs through its graphs: the trace's,
    and the verification's when it verifies; and the tokens the verification generates after them."""
    from transformers import AutoProcessor

    from . import verify

    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    texts = verify.TEACHER_FORCED_PROMPTS if verifying else verify.COMPARE_PROMPTS[:1]  # [0]: the trace's
    samples = [verify.make_sample(processor, image_token_id, text) for text in texts]
    return [(s.before.shape[1], s.after.shape[1]) for s in samples], verify.NEW_TOKENS if verifying else 0


def is_large(model) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES


def describe(path: Path) -> dict:
    """Manifest entry of one ONNX graph: file, sha256, external data, inputs/outputs."""
    graph = onnx.load(str(path), load_external_data=False)
    locations = sorted({
        entry.value for tensor in graph.graph.initializer for entry in tensor.external_data if entry.key == "location"
    })

    def io(values):
        return [{
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        } for v in values]

    entry = file_entry(path.parent, path.name)
    entry["external_data"] = [file_entry(path.parent, name) for name in locations]
    return {**entry, "inputs": io(graph.graph.input), "outputs": io(graph.graph.output)}


def dynamic_shapes(graphs: GraphSet, graph: str, max_seq_len: int):
    """torch.export dims of one graph: the prompt-bounded token count of each segment, text before the
    image, and the cache buffers' capacity (named per segment; 0 is allowed at run time)."""
    dim, plan = torch.export.Dim, graphs.plan
    if graph == names.VISION:
        return None
    if graph == names.EMBED:
        return ({1: dim("tokens", min=1, max=max_seq_len)},)
    kind, _, index = graph.partition(".")
    segment = int(index) - (kind == "reduce")  # reduce.s takes what decoder.{s-1} returns
    tokens = dim("tokens", min=1, max=plan.segment_tokens(segment, max_seq_len))
    if kind == "reduce":
        return ({1: tokens}, {1: tokens, 2: tokens}, {1: tokens}, {1: dim("text_before", min=1, max=max_seq_len)})
    capacity = dim("capacity", min=1, max=max_seq_len)
    past = [{2: capacity} for _ in graphs.llm[graph].cached for _ in (0, 1)]
    return ({1: tokens}, {1: tokens}, None, past)


def export_graph(graphs: GraphSet, graph: str, args: tuple, directory: Path, max_seq_len: int, large: bool) -> dict:
    """Export one graph with its dynamic dims and describe it (LLM graphs keep weights in external data)."""
    path = directory / f"{graph}.onnx"
    external = graph != names.VISION and not graph.startswith("reduce") or large
    io = names.io_names(graph, graphs.plan)
    with torch.no_grad():
        export_onnx(graphs.exported[graph], args, path, io, dynamic_shapes(graphs, graph, max_seq_len), external,
                    {MAX_SEQ_LEN_KEY: str(max_seq_len)})
    if graph.startswith("reduce"):
        name_output_dims(path, {names.HIDDEN_STATES: "reduced", names.REDUCED_POSITION_IDS: "reduced", names.KEPT: "kept"})
    return describe(path)


def name_output_dims(path: Path, dims: dict[str, str]) -> None:
    """Give the exporter's symbolic output dims (expressions of the input dims) the documented names."""
    model = onnx.load(str(path), load_external_data=False)
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if output.name in dims and dim.dim_param:
                dim.dim_param = dims[output.name]
    onnx.save(model, str(path))


def empty_past(graphs: GraphSet, graph: str, capacity: int, dtype) -> list[torch.Tensor]:
    """Zero buffers [1, Hkv, capacity, Dh] for every cached layer of a segment."""
    attn = graphs.llm[graph].decoder.layers[0].self_attn
    kv_heads = attn.config.num_key_value_heads
    return [torch.zeros(1, kv_heads, capacity, attn.head_dim, dtype=dtype) for _ in graphs.llm[graph].cached for _ in (0, 1)]


def example_args(graphs: GraphSet, sample) -> dict[str, tuple]:
    """Trace inputs of every graph, from one verification sample run through the torch modules in order."""
    args = {}
    with torch.no_grad():
        dtype = next(graphs.vision.parameters()).dtype
        pixels = torch.from_numpy(sample.pixel_values).to(dtype)
        args[names.VISION] = (pixels,)
        features, _ = graphs.vision(pixels)  # [n, D]
        before, after = torch.from_numpy(sample.before), torch.from_numpy(sample.after)
        embed = graphs.prefill.inner.get_input_embeddings()
        hidden = torch.cat([embed(before), features[None].to(embed.weight.dtype), embed(after)], dim=1)  # [1, P, D]
        if names.EMBED in graphs.llm:
            args[names.EMBED] = (torch.cat([before, after], dim=1),)
        positions, out = torch.arange(hidden.shape[1])[None], None
        for graph, module in graphs.llm.items():
            if graph == names.EMBED:
                continue
            if graph.startswith("reduce"):
                args[graph] = (out[0], out[1], positions, before)
                hidden, positions, _ = module(*args[graph])
                continue
            args[graph] = (hidden, positions, torch.zeros(1, dtype=torch.int64), empty_past(graphs, graph, 3, hidden.dtype))
            out = module(*args[graph])
    return args


def flops_estimate(model, plan: BuildPlan, text_tokens: int = 60) -> dict:
    """Analytic TFLOPs of this build vs. unreduced, at `text_tokens` text tokens (ficoco.analysis.flops convention)."""
    config = model.config.to_dict()
    reduced = dict(zip(("vision", "prefill"), flops_model.plan_flops(config, plan, text_tokens)))
    full = dict(zip(("vision", "prefill"), flops_model.plan_flops(config, plan.unreduced(), text_tokens)))
    return {
        "convention": "2 FLOPs/MAC over linear layers + full QK^T and AV; text tokens = %d" % text_tokens,
        "tflops": {k: v / 1e12 for k, v in reduced.items()},
        "unreduced_tflops": {k: v / 1e12 for k, v in full.items()},
        "prefill_reduction": full["prefill"] / reduced["prefill"],
    }


def copy_tokenizer(source: Path, directory: Path) -> dict:
    """Copy tokenizer, chat template, processor settings and the model's config.json into the build."""
    wanted = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "processor_config.json", "preprocessor_config.json", "generation_config.json",
              "config.json"]  # config.json: the memory plan, refreshed by --from-onnx without the model
    copied = [name for name in wanted if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, directory / name)
    return {"files": [file_entry(directory, name) for name in copied]}


def embedding_entry(graphs: GraphSet, directory: Path, entries: dict) -> dict:
    """Where the runtime looks text embeddings up: the initializer holding the table [V, D] (or [D, V] when
    the exporter stored the tied LM head transposed) in a graph's external data, found by its bytes."""
    graph = names.decoder(len(graphs.plan.language)) if graphs.tied else names.EMBED
    table = graphs.prefill.inner.get_input_embeddings().weight.detach()  # [V, D]
    model = onnx.load(str(directory / entries[graph]["file"]), load_external_data=False)
    for init in model.graph.initializer:
        dims = tuple(init.dims)
        if dims not in (tuple(table.shape), tuple(table.shape)[::-1]) or init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        offset, length = int(where.get("offset", 0)), int(where["length"])
        stored = np.fromfile(directory / where["location"], dtype=np.uint8, count=length, offset=offset)
        expected = table if dims == tuple(table.shape) else table.T
        if stored.tobytes() == expected.contiguous().view(torch.uint8).numpy().tobytes():
            return {"graph": graph, "file": where["location"], "offset": offset, "shape": list(dims),
                    "dtype": "bfloat16" if table.dtype == torch.bfloat16 else np.dtype(dtype).name,
                    "transposed": dims != tuple(table.shape)}
    raise RuntimeError(f"{graph}.onnx holds no initializer equal to the embedding table {list(table.shape)}")
