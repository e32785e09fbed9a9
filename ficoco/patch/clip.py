"""FiCoCo-V in Hugging Face's CLIP vision encoder (transformers 5.23, `models/clip/modeling_clip.py`).

The encoder is run layer by layer up to the layer LLaVA reads (the layers after
it are skipped: their output is never used). At a scheduled layer the
attention is computed with its probabilities exposed and the FiCoCo-V step runs
between the attention residual and the MLP block. Each patch token carries its
original grid position through the layers for the local penalty; the positions
are a local variable of the forward, never module state. Each step is reported to
whoever observes (`ficoco.patch.observe`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.clip import modeling_clip

from ..config import Step
from ..core import VisionStepParams, vision_step
from . import observe


def attention_with_probs(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """CLIPAttention.forward with eager attention, also returning the head-averaged map.

    Mirrors `CLIPAttention.forward` (transformers 5.23) with
    `eager_attention_forward`, the only change being that the post-softmax
    probabilities are returned. x: [B, N, C]. Returns ([B, N, C], A [B, N, N]).
    """
    batch, tokens, _ = x.shape
    shape = (batch, tokens, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, N, D]
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    out, probs = modeling_clip.eager_attention_forward(attn, q, k, v, None, scaling=attn.scale, dropout=0.0)
    out = attn.out_proj(out.reshape(batch, tokens, -1))  # [B, N, C]
    return out, probs.mean(dim=1)


def reducing_layer(
    layer: nn.Module, h: Tensor, positions: Tensor, r: int, params: VisionStepParams, index: int | None = None
):
    """CLIPEncoderLayer.forward with a FiCoCo-V step before the MLP block.

    h: [B, N, C]; positions: [B, N-1]. Returns h [B, N-r, C], positions [B, N-1-r].
    `index` (the encoder layer's number) is what observers (`ficoco.patch.observe`) are told.
    """
    attn_out, attn_map = attention_with_probs(layer.self_attn, layer.layer_norm1(h))
    h = h + attn_out
    out, kept = vision_step(h, attn_map, positions, r, params)  # FiCoCo-V
    if observe.active():
        observe.report(observe.VisionEvent(index, r, params, h, attn_map, positions, out, kept))
    return out + layer.mlp(layer.layer_norm2(out)), kept


def encode(
    vision_tower: nn.Module, pixel_values: Tensor, steps: tuple[Step, ...], feature_layer: int, params: VisionStepParams
) -> tuple[Tensor, Tensor]:
    """Run the CLIP vision tower with FiCoCo-V up to `feature_layer`.

    pixel_values: [crops, 3, S, S]. Returns the output of encoder layer
    `feature_layer` (LLaVA's `hidden_states[feature_layer + 1]`), [crops, 1+k, C]
    with CLS first, and the kept patches' grid positions [crops, k] (raster
    order), k = steps[-1].tokens_out or all patches without steps.
    """
    vision = vision_tower  # transformers 5: CLIPVisionModel holds embeddings, pre_layrnorm, encoder itself
    embeddings = vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype))
    h = vision.pre_layrnorm(embeddings)  # [crops, 1+P, C]
    positions = torch.arange(h.shape[1] - 1, device=h.device).expand(h.shape[0], -1)  # [crops, P]
    by_layer = {step.layer: step.r for step in steps}
    for index, layer in enumerate(vision.encoder.layers[: feature_layer + 1]):
        if index in by_layer:
            h, positions = reducing_layer(layer, h, positions, by_layer[index], params, index)
        else:
            h = layer(h, None)
    return h, positions
