"""The torch modules of a build's graphs over a FiCoCo-patched LLaVA model, and their ONNX export.

Exported (I/O: `runtime.names`): `VisionGraph`, and the LLM stored once as the decoder segments and
weightless reductions of `export.trace.segments` (plus `EmbedGraph` when the LM head is untied). The
references the verification compares them with are `PrefillReference` / `DecodeReference`: the
patched Hugging Face decoder itself (`ficoco.patch.llama.decoder_forward`, HF's own layers and a
concatenating cache), so a segment's buffer attention is checked against code it does not share.
All of them read one `ficoco.BuildPlan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ficoco import BuildPlan
from ficoco.patch import llama
from ficoco.patch.llava import Plan, encode_crops, layout_crops
from runtime import names

from . import segments as seg


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


class VisionGraph(nn.Module):
    """pixel_values [crops, 3, S, S] -> image_features [n, D] (the prompt's layout), kept_positions [crops, k]."""

    def __init__(self, model: nn.Module, patch_plan: Plan, build_plan: BuildPlan):
        super().__init__()
        self.inner, self.patch_plan, self.grid = model.model, patch_plan, build_plan.grid

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        features, positions = encode_crops(self.inner, pixel_values, self.patch_plan)  # [crops, k, D]
        if self.grid is None:
            return features.flatten(0, 1), positions
        return layout_crops(features, self.grid, self.inner.image_newline), positions


class PrefillReference(nn.Module):
    """(ids before [1, Tb], image_features [n, D], ids after [1, Ta]) -> logits [1, V], the whole cache per layer."""

    def __init__(self, model: nn.Module, patch_plan: Plan, build_plan: BuildPlan):
        super().__init__()
        self.inner, self.lm_head, self.patch_plan, self.plan = model.model, model.lm_head, patch_plan, build_plan

    def forward(self, input_ids_before: Tensor, image_features: Tensor, input_ids_after: Tensor):
        embed = self.inner.get_input_embeddings()
        x = torch.cat([embed(input_ids_before), image_features[None].to(embed.weight.dtype), embed(input_ids_after)], dim=1)
        positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, P]
        span = (input_ids_before.shape[1], self.plan.visual_tokens)
        cache = GraphCache()
        hidden = llama.decoder_forward(self.inner.language_model, x, positions, cache, self.plan.language, span,
                                       self.patch_plan.language_params)
        return (self.lm_head(hidden[:, -1]), *cache.flat())


class DecodeReference(nn.Module):
    """(input_ids [1, 1], position_ids [1, 1], past per layer [1, Hkv, len_i, Dh]) -> logits [1, V], past + new."""

    def __init__(self, model: nn.Module, patch_plan: Plan):
        super().__init__()
        self.inner, self.lm_head, self.patch_plan = model.model, model.lm_head, patch_plan

    def forward(self, input_ids: Tensor, position_ids: Tensor, past: list[Tensor]):
        cache = GraphCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        x = self.inner.get_input_embeddings()(input_ids)
        hidden = llama.decoder_forward(self.inner.language_model, x, position_ids, cache, (), None, self.patch_plan.language_params)
        return (self.lm_head(hidden[:, -1]), *cache.flat())


@dataclass
class GraphSet:
    """The torch modules of one build and the plan they share."""

    plan: BuildPlan
    vision: VisionGraph
    prefill: PrefillReference
    decode: DecodeReference
    llm: dict[str, nn.Module]  # decoder.s / reduce.s (/ embed), in running order
    tied: bool  # the LM head is the embedding table

    @property
    def layers(self) -> int:
        """Decoder layers (the plan's)."""
        return self.plan.text.layers

    @property
    def exported(self) -> dict[str, nn.Module]:
        return {names.VISION: self.vision, **self.llm}


def graph_set(model: nn.Module, patch_plan: Plan, build_plan: BuildPlan) -> GraphSet:
    """The graphs of `build_plan` over `model` patched by `ficoco.apply`: the traced FiCoCo-V steps are the build
    plan's (the patch plan gives the step parameters), and so are the segments and FiCoCo-L steps."""
    patch_plan = dataclasses.replace(patch_plan, vision=build_plan.vision)
    tied = seg.tied(model)
    llm: dict[str, nn.Module] = {} if tied else {names.EMBED: seg.EmbedGraph(model)}
    decoders = seg.segments(model, build_plan)
    llm[names.decoder(0)] = decoders[0]
    for index, step in enumerate(build_plan.language, start=1):
        llm[names.reduce(index)] = seg.ReduceGraph(step, patch_plan.language_params)
        llm[names.decoder(index)] = decoders[index]
    graphs = GraphSet(build_plan, VisionGraph(model, patch_plan, build_plan), PrefillReference(model, patch_plan, build_plan),
                      DecodeReference(model, patch_plan), llm, tied)
    for module in (graphs.vision, graphs.prefill, graphs.decode, *llm.values()):
        module.eval()
    return graphs


def export_onnx(module: nn.Module, args: tuple, path: Path, io: tuple[list[str], list[str]], dynamic_shapes,
                external: bool, metadata: dict[str, str] | None = None) -> Path:
    """torch.onnx.export (dynamo) with the stable names of `runtime.names`; weights in `NAME.onnx.data`
    when `external`; `metadata` goes into the model's metadata_props (the runtime checks the manifest against it)."""
    inputs, outputs = io
    program = torch.onnx.export(
        module, args, dynamo=True, input_names=inputs, output_names=outputs,
        dynamic_shapes=dynamic_shapes, opset_version=18, optimize=True, verbose=False,
    )
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=external)
    return path
