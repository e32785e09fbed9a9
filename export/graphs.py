"""The three exported graphs as torch modules over a FiCoCo-patched LLaVA model, and their ONNX export.

Each wrapper reuses the adapter code of `ficoco.patch` (the same functions the
patched Hugging Face model runs), so the graphs are FiCoCo exactly as PyTorch
runs it, with the schedule baked in as constants. I/O names and shapes:
`runtime.names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ficoco.patch import llama
from ficoco.patch.llava import Plan, encode_crops, layout_crops

from runtime import names


class GraphCache:
    """The cache interface that HF's attention and `ficoco.patch.llama` call, over plain tensors.

    `past`: per layer (key, value) [1, Hkv, past_i, Dh] or None for a prefill;
    `present` collects what each layer's attention returns (past + new).
    """

    def __init__(self, past: list[tuple[Tensor, Tensor]] | None = None):
        self.past = past
        self.present: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.past is not None:
            past_key, past_value = self.past[layer_idx]
            key, value = torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2)
        self.present[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[-2] if self.past is not None else 0

    def flat(self) -> list[Tensor]:
        return [t for index in sorted(self.present) for t in self.present[index]]


@dataclass(frozen=True)
class Layout:
    """How vision.onnx's [crops, k, D] become the prompt's visual tokens (static per build)."""

    grid: tuple[int, int] | None  # LLaVA-NeXT anyres (rows, cols); None for LLaVA-1.5 (one crop)
    crops: int
    kept_per_crop: int

    @property
    def visual_tokens(self) -> int:
        if self.grid is None:
            return self.crops * self.kept_per_crop
        return self.kept_per_crop * self.crops + self.grid[0]  # one image_newline per row of crops


class VisionGraph(nn.Module):
    """pixel_values [crops, 3, S, S] -> image_features [crops, k, D], kept_positions [crops, k]."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        self.inner, self.plan = model.model, plan

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        return encode_crops(self.inner, pixel_values, self.plan)


class PrefillGraph(nn.Module):
    """(ids before [1, Tb], image_features [crops, k, D], ids after [1, Ta]) -> logits [1, V], present KV."""

    def __init__(self, model: nn.Module, plan: Plan, layout: Layout):
        super().__init__()
        self.inner, self.lm_head, self.plan, self.layout = model.model, model.lm_head, plan, layout

    def visual(self, image_features: Tensor) -> Tensor:
        """[crops, k, D] -> [n, D] in the documented layout."""
        if self.layout.grid is None:
            return image_features.flatten(0, 1)
        return layout_crops(image_features, self.layout.grid, self.inner.image_newline)

    def forward(self, input_ids_before: Tensor, image_features: Tensor, input_ids_after: Tensor):
        embed = self.inner.get_input_embeddings()
        visual = self.visual(image_features)[None]  # [1, n, D]
        x = torch.cat([embed(input_ids_before), visual.to(embed.weight.dtype), embed(input_ids_after)], dim=1)
        positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, P]
        steps = self.plan.language_steps(self.layout.visual_tokens)
        span = (input_ids_before.shape[1], self.layout.visual_tokens)
        cache = GraphCache()
        hidden = llama.decoder_forward(self.inner.language_model, x, positions, cache, steps, span, self.plan.language_params)
        return (self.lm_head(hidden[:, -1]), *cache.flat())


class DecodeGraph(nn.Module):
    """(input_ids [1, 1], position_ids [1, 1], past KV) -> logits [1, V], present KV."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        self.inner, self.lm_head, self.plan = model.model, model.lm_head, plan

    def forward(self, input_ids: Tensor, position_ids: Tensor, past: list[Tensor]):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = GraphCache(pairs)
        x = self.inner.get_input_embeddings()(input_ids)
        hidden = llama.decoder_forward(self.inner.language_model, x, position_ids, cache, (), None, self.plan.language_params)
        return (self.lm_head(hidden[:, -1]), *cache.flat())


def export_onnx(module: nn.Module, args: tuple, path: Path, graph: str, layers: int, dynamic_shapes, large: bool,
                metadata: dict[str, str] | None = None) -> Path:
    """torch.onnx.export (dynamo) with the stable names of `runtime.names`; external data when `large`;
    `metadata` goes into the model's metadata_props (the runtime checks the manifest against it)."""
    inputs, outputs = names.io_names(graph, layers)
    program = torch.onnx.export(
        module, args, dynamo=True, input_names=inputs, output_names=outputs,
        dynamic_shapes=dynamic_shapes, opset_version=18, optimize=True, verbose=False,
    )
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=large)
    return path


@dataclass
class GraphSet:
    """The three torch modules of one build and what they share."""

    vision: VisionGraph
    prefill: PrefillGraph
    decode: DecodeGraph
    layout: Layout
    layers: int  # decoder layers


def graph_set(model: nn.Module, plan: Plan, layout: Layout) -> GraphSet:
    layers = model.config.text_config.num_hidden_layers
    graphs = GraphSet(VisionGraph(model, plan), PrefillGraph(model, plan, layout), DecodeGraph(model, plan), layout, layers)
    for module in (graphs.vision, graphs.prefill, graphs.decode):
        module.eval()
    return graphs
