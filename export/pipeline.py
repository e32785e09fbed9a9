"""The torch side of `export.build`: load, patch, export the graphs, describe them for the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import torch

from ficoco import FiCoCoConfig, apply
from ficoco import flops as flops_model
from ficoco.patch.llava import Plan
from runtime.manifest import MAX_SEQ_LEN_KEY, file_entry

from runtime import names
from .graphs import GraphSet, Layout, export_onnx
from .request import BuildRequest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTERNAL_DATA_BYTES = 1_800_000_000  # graphs whose weights pass this use ONNX external data (protobuf limit 2 GB)


def load_model(request: BuildRequest):
    """(model, processor, source dir) through the same loader as any checkpoint."""
    import json

    from ficoco.patch.llava import ADAPTERS
    from ficoco.presets import load, resolve_model_dir

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
    """LLaVA-NeXT: pin the anyres grid so every FiCoCo size is static (model and processor agree)."""
    side = model.config.vision_config.image_size
    allowed = [tuple(p) for p in model.config.image_grid_pinpoints]
    pinpoint = (grid[0] * side, grid[1] * side)
    if pinpoint not in allowed:
        options = ", ".join(f"{h // side}x{w // side}" for h, w in allowed)
        raise ValueError(f"--grid {grid[0]}x{grid[1]} is not one of this model's anyres grids ({options})")
    model.config.image_grid_pinpoints = [list(pinpoint)]
    processor.image_processor.image_grid_pinpoints = [list(pinpoint)]


def resolve_budget(model, request: BuildRequest) -> BuildRequest:
    """--tflops B -> the most visual tokens per crop whose prefill fits B (ficoco.flops convention)."""
    from dataclasses import replace

    from ficoco.flops import tokens_for_budget

    if request.tflops is None:
        return request
    grid = request.grid if type(model).__name__ == "LlavaNextForConditionalGeneration" else None
    tokens = tokens_for_budget(model.config.to_dict(), request.tflops, request.variant, grid=grid)
    print(f"--tflops {request.tflops:g}: {tokens} visual tokens per crop", flush=True)
    return replace(request, tokens=tokens, tflops=None)


def patch(model, processor, request: BuildRequest) -> tuple[Plan, Layout]:
    """Apply FiCoCo (crop layout, static) and work out the visual-token layout."""
    next_model = type(model).__name__ == "LlavaNextForConditionalGeneration"
    if next_model:
        fix_grid(model, processor, request.grid)
    elif request.grid != (2, 2) and request.grid_given:
        raise ValueError(f"--grid applies to LLaVA-NeXT only; {type(model).__name__} has one crop per image")
    request = resolve_budget(model, request)
    if request.precision != "fp32":
        keep_norms_fp32(model)
    config: FiCoCoConfig = request.ficoco_config()
    apply(model, config)
    plan = model.ficoco_plan
    grid = request.grid if next_model else None
    crops = 1 + grid[0] * grid[1] if grid else 1
    return plan, Layout(grid, crops, plan.vision_tokens)


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


def export_graph(graphs: GraphSet, graph: str, args: tuple, directory: Path, max_seq_len: int, large: bool) -> dict:
    """Export one graph with its dynamic text dims and describe it."""
    dim = torch.export.Dim
    if graph == names.VISION:
        module, dynamic = graphs.vision, None
    elif graph == names.PREFILL:
        module = graphs.prefill
        dynamic = ({1: dim("text_before", min=1, max=max_seq_len)}, None, {1: dim("text_after", min=1, max=max_seq_len)})
    else:
        module = graphs.decode
        past = [{2: dim(f"past_{i // 2}", min=1, max=max_seq_len)} for i in range(2 * graphs.layers)]
        dynamic = (None, None, past)
    path = directory / f"{graph}.onnx"
    with torch.no_grad():
        export_onnx(module, args, path, graph, graphs.layers, dynamic, large, {MAX_SEQ_LEN_KEY: str(max_seq_len)})
    return describe(path)


def example_args(graphs: GraphSet, sample) -> dict[str, tuple]:
    """Trace inputs of the three graphs from one verification sample."""
    with torch.no_grad():
        pixels = torch.from_numpy(sample.pixel_values).to(next(graphs.vision.parameters()).dtype)
        features, _ = graphs.vision(pixels)
        before, after = torch.from_numpy(sample.before), torch.from_numpy(sample.after)
        out = graphs.prefill(before, features, after)
        length = before.shape[1] + graphs.layout.visual_tokens + after.shape[1]
    decode = (out[0].argmax(-1, keepdim=True), torch.tensor([[length]]), list(out[1:]))
    return {names.VISION: (pixels,), names.PREFILL: (before, features, after), names.DECODE: decode}


def flops_estimate(model, plan: Plan, layout: Layout, text_tokens: int = 60) -> dict:
    """Analytic TFLOPs of this build vs. unreduced, at `text_tokens` text tokens (ficoco.flops convention)."""
    text = flops_model.text_of(model.config.text_config.to_dict())
    vision = flops_model.vision_of(model.config.vision_config.to_dict())
    geometry, visual = plan.geometry, layout.visual_tokens
    unreduced_visual = layout.crops * geometry.patches + (layout.grid[0] if layout.grid else 0)
    language = {s.layer: s.tokens_out for s in plan.language_steps(visual)}
    reduced = {
        "vision": flops_model.vision_flops(vision, layout.crops, geometry.patches, {s.layer: s.tokens_out for s in plan.vision}, geometry.feature_layer),
        "prefill": flops_model.prefill_flops(text, text_tokens, visual, language),
    }
    full = {
        "vision": flops_model.vision_flops(vision, layout.crops, geometry.patches, {}, geometry.feature_layer),
        "prefill": flops_model.prefill_flops(text, text_tokens, unreduced_visual, {}),
    }
    return {
        "convention": "2 FLOPs/MAC over linear layers + full QK^T and AV; text tokens = %d" % text_tokens,
        "tflops": {k: v / 1e12 for k, v in reduced.items()},
        "unreduced_tflops": {k: v / 1e12 for k, v in full.items()},
        "prefill_reduction": full["prefill"] / reduced["prefill"],
    }


def copy_tokenizer(source: Path, directory: Path) -> dict:
    """Copy tokenizer, chat template and processor settings into the build."""
    wanted = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "processor_config.json", "preprocessor_config.json", "generation_config.json"]
    copied = [name for name in wanted if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, directory / name)
    return {"files": [file_entry(directory, name) for name in copied]}
