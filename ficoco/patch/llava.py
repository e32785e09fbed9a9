"""FiCoCo on Hugging Face LLaVA-1.5 and LLaVA-NeXT (transformers 5.23).

`apply` replaces the `forward` of the inner `LlavaModel` / `LlavaNextModel`
(instance attribute; the class is untouched) with `forward` below, bound to an
immutable `Plan`. `LlavaForConditionalGeneration.forward` and `generate` are
unchanged and drive it as usual.

Prompt handling. Each batch row holds one image, as one run of `<image>` tokens
of any length (the processor's expansion, the reduced count, or a single
`<image>`): the run is replaced by the image's features, so the LLM sees
exactly as many visual tokens as FiCoCo-V passes on. Positions are numbered on
that spliced sequence (0..L-1); decoding continues from layer 0's cache length.
Batches must be unpadded (an all-ones `attention_mask`) with the image at the
same position in every row.

LLaVA-NeXT layout with FiCoCo-V. HF's `pack_image_features` unpads a full
crop grid and ends each row of patches with `image_newline`; reduced crops no
longer form a grid. With FiCoCo-V on, an image's tokens are laid out as: the
base (resized whole-image) crop's k tokens, then the high-resolution crops row
by row of the anyres grid, each crop's k tokens in raster order, and one
`image_newline` after each row of crops: `k * (1 + rows * cols) + rows` tokens.
Padding crops are not unpadded (FiCoCo tends to discard uniform padding
anyway). Without FiCoCo-V (variant `l`, or ratio 1) HF's own layout is used,
unless `crop_layout="crops"` asks for the crop layout always (its token count
depends only on the anyres grid, not on the image's aspect: the export uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MethodType

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava import modeling_llava
from transformers.models.llava_next import modeling_llava_next

from ..config import FiCoCoConfig, ModelGeometry, Step, build_schedule, language_schedule
from ..core import LanguageStepParams, VisionStepParams
from ..geometry import config_geometry
from . import clip, llama

VISION_TOWERS = {"CLIPVisionModel": clip.encode}
DECODERS = {"LlamaModel": llama.decoder_forward}


@dataclass(frozen=True)
class Plan:
    """Everything a patched forward needs, fixed at `apply` time."""

    config: FiCoCoConfig
    geometry: ModelGeometry
    vision: tuple[Step, ...]
    vision_params: VisionStepParams
    language_params: LanguageStepParams
    own_decoder: bool  # FiCoCo-L is on: every text forward goes through llama.decoder_forward

    def language_steps(self, visual_tokens: int) -> tuple[Step, ...]:
        return _language_steps(self.config, self.geometry, visual_tokens)

    @property
    def vision_tokens(self) -> int:
        """Patch tokens per crop that leave the encoder."""
        return self.vision[-1].tokens_out if self.vision else self.geometry.patches


@lru_cache(maxsize=64)
def _language_steps(config: FiCoCoConfig, geometry: ModelGeometry, visual_tokens: int) -> tuple[Step, ...]:
    return language_schedule(config, geometry, visual_tokens)


# --------------------------------------------------------------------------- image features


def encode_crops(model, pixel_values: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    """pixel_values [crops, 3, S, S] -> projected features of the kept tokens [crops, k(+1), D]
    and their grid positions [crops, k]. `model` is the inner LlavaModel / LlavaNextModel."""
    encode = VISION_TOWERS[type(model.vision_tower).__name__]
    hidden, positions = encode(model.vision_tower, pixel_values, plan.vision, plan.geometry.feature_layer, plan.vision_params)
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]  # drop CLS
    return model.multi_modal_projector(hidden), positions


def llava_features(model, pixel_values: Tensor, image_sizes, plan: Plan) -> list[Tensor]:
    """LLaVA-1.5: one crop per image -> list of [k, D]."""
    if not plan.vision:
        return list(type(model).get_image_features(model, pixel_values=pixel_values, return_dict=True).pooler_output)
    return list(encode_crops(model, pixel_values, plan)[0])


def layout_crops(features: Tensor, grid: tuple[int, int], newline: Tensor) -> Tensor:
    """Reduced LLaVA-NeXT layout (module docstring). features: [1 + rows*cols, k, D] -> [n, D]."""
    base, crops = features[0], features[1:]
    rows, cols = grid if len(crops) else (1, 0)
    lines = crops.reshape(rows, cols * crops.shape[1], -1)  # [rows, cols*k, D]
    ends = newline.to(features.dtype)[None, None].expand(rows, 1, -1)
    return torch.cat([base, torch.cat([lines, ends], dim=1).flatten(0, 1)], dim=0)


def llava_next_features(model, pixel_values: Tensor, image_sizes, plan: Plan) -> list[Tensor]:
    """LLaVA-NeXT: anyres crops per image -> list of [n_i, D]."""
    if not plan.vision and plan.config.crop_layout == "auto":
        out = type(model).get_image_features(model, pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True)
        return list(out.pooler_output)
    config = model.config
    counts = [
        modeling_llava_next.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in image_sizes
    ]
    crops = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, counts)]) if pixel_values.dim() == 5 else pixel_values
    per_image = torch.split(encode_crops(model, crops, plan)[0], counts)
    grids = [
        modeling_llava_next.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in image_sizes
    ]
    return [layout_crops(f, g, model.image_newline) for f, g in zip(per_image, grids)]


# --------------------------------------------------------------------------- prompt


def splice(input_ids: Tensor, embeds: Tensor, features: list[Tensor], image_token_id: int) -> tuple[Tensor, tuple[int, int]]:
    """Replace each row's run of `<image>` tokens by that row's image features.

    input_ids: [B, L]; embeds: [B, L, C]; features: B tensors [n, C].
    Returns ([B, L - run + n, C], (start, n)). Runs in Python on the prompt
    (not in the reduction path; the export takes the split prompt instead).
    """
    if len(features) != input_ids.shape[0]:
        raise ValueError(f"got {len(features)} image(s) for {input_ids.shape[0]} prompt row(s); FiCoCo needs one image per row")
    rows, spans = [], set()
    for row_ids, row_embeds, feats in zip(input_ids, embeds, features):
        where = (row_ids == image_token_id).nonzero().flatten().tolist()
        if not where:
            raise ValueError(f"the prompt holds no image placeholder (token id {image_token_id}) but an image was given")
        start, end = where[0], where[-1] + 1
        if end - start != len(where):
            raise ValueError(f"the prompt holds several <image> runs (token id {image_token_id}); FiCoCo supports one image per prompt")
        rows.append(torch.cat([row_embeds[:start], feats.to(row_embeds.dtype), row_embeds[end:]]))
        spans.add((start, feats.shape[0], len(row_ids) - end))
    if len(spans) > 1:
        raise ValueError(f"batch rows place the image differently {sorted(spans)}; FiCoCo needs the same layout in every row")
    start, length, _ = spans.pop()
    return torch.stack(rows), (start, length)


def _check_inputs(input_ids, inputs_embeds, attention_mask) -> None:
    if input_ids is None or inputs_embeds is not None:
        raise ValueError("a FiCoCo-patched LLaVA model takes input_ids (not inputs_embeds): the image span is found from them")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention_mask has padding; FiCoCo supports unpadded batches only (batch size 1 or equal-length rows)")


# --------------------------------------------------------------------------- forward


def get_image_features(self, pixel_values, image_sizes=None, *, plan: Plan, adapter: "Adapter", **kwargs):
    """Replacement for `get_image_features` (what `generate` calls before prefill): pooler_output is a list of [n_i, D]."""
    return BaseModelOutputWithPooling(pooler_output=adapter.features(self, pixel_values, image_sizes, plan))



def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
            inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
            mm_encoder_outputs=None, use_cache=None, *, plan: Plan, adapter: "Adapter", **kwargs):
    """Replacement for `LlavaModel.forward` / `LlavaNextModel.forward` (same arguments; see module docstring)."""
    _check_inputs(input_ids, inputs_embeds, attention_mask)
    use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=self.config.text_config)
    cache = past_key_values if use_cache else None
    past = cache.get_seq_length() if cache is not None else 0
    embeds = self.get_input_embeddings()(input_ids)  # [B, L, C]
    features, span = None, None
    image = (mm_encoder_outputs or {}).get("image")
    if image is None and pixel_values is not None:
        image = self.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    if image is not None:
        features = list(image.pooler_output)
        embeds, span = splice(input_ids, embeds, features, self.config.image_token_id)
    positions = (torch.arange(embeds.shape[1], device=embeds.device) + past).expand(embeds.shape[0], -1)
    if plan.own_decoder:
        steps = plan.language_steps(span[1]) if span is not None else ()
        hidden = llama.decoder_forward(self.language_model, embeds, positions, cache, steps, span, plan.language_params)
    else:
        if attention_mask is not None and attention_mask.shape[-1] != past + embeds.shape[1]:
            attention_mask = None  # the image run changed length; all ones (checked above), so causal alone is right
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
            past_key_values=cache, use_cache=use_cache, **kwargs,
        ).last_hidden_state
    return adapter.output(
        last_hidden_state=hidden,
        past_key_values=cache,
        image_hidden_states=torch.cat(features) if features is not None else None,
    )


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Adapter:
    """What differs between LLaVA families: how image features are made, and the output class."""

    features: callable
    output: type


ADAPTERS: dict[str, Adapter] = {
    "LlavaForConditionalGeneration": Adapter(llava_features, modeling_llava.LlavaModelOutputWithPast),
    "LlavaNextForConditionalGeneration": Adapter(llava_next_features, modeling_llava_next.LlavaNextModelOutputWithPast),
}


def geometry_of(model) -> ModelGeometry:
    """The schedule-relevant shapes of a loaded model (`ficoco.geometry.config_geometry` of its config)."""
    return config_geometry(model.config.to_dict())


def make_plan(model, config: FiCoCoConfig) -> Plan:
    """Check that `model` can run `config` and fix the schedule."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"unsupported architecture {name}; FiCoCo supports {sorted(ADAPTERS)}")
    inner = model.model
    geometry = geometry_of(model)
    schedule = build_schedule(config, geometry)  # validates tokens and layers against the model
    tower, decoder = type(inner.vision_tower).__name__, type(inner.language_model).__name__
    if schedule.vision and tower not in VISION_TOWERS:
        raise ValueError(f"unsupported vision tower {tower} for FiCoCo-V; supported: {sorted(VISION_TOWERS)}")
    if config.reduces_language and decoder not in DECODERS:
        raise ValueError(f"unsupported language model {decoder} for FiCoCo-L; supported: {sorted(DECODERS)}")
    vision_params = VisionStepParams(
        geometry.grid, config.lam, config.epsilon, tuple(config.window), config.penalty_scale, config.local_penalty
    )
    return Plan(
        config, geometry, schedule.vision, vision_params,
        LanguageStepParams(config.beta, config.gamma, config.epsilon),
        own_decoder=bool(schedule.language),
    )


def apply(model, config: FiCoCoConfig):
    """Patch a loaded LLaVA / LLaVA-NeXT model in place with FiCoCo and return it (re-applying replaces)."""
    plan = make_plan(model, config)
    adapter = ADAPTERS[type(model).__name__]
    inner = model.model

    def patched_forward(self, *args, **kwargs):
        return forward(self, *args, plan=plan, adapter=adapter, **kwargs)

    def patched_features(self, *args, **kwargs):
        return get_image_features(self, *args, plan=plan, adapter=adapter, **kwargs)

    inner.forward = MethodType(patched_forward, inner)
    inner.get_image_features = MethodType(patched_features, inner)
    model.ficoco_plan = plan
    return model


def remove(model):
    """Undo `apply`: the model runs Hugging Face's own forward again."""
    model.model.__dict__.pop("forward", None)
    model.model.__dict__.pop("get_image_features", None)
    model.__dict__.pop("ficoco_plan", None)
    return model
