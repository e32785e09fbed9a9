"""FiCoCo-L in Hugging Face's Llama decoder (transformers 5.23, `models/llama/modeling_llama.py`).

`decoder_forward` replaces `LlamaModel.forward` when FiCoCo-L is on. It is the
upstream layer loop with three changes, each marked `# FiCoCo:`:

1. At a scheduled layer the attention is computed with its probabilities
   exposed (`attention_with_probs`) and the FiCoCo-L step runs between the
   attention residual and the MLP block. That layer's KV cache holds the whole
   prompt; every later layer only sees, and caches, the preserved tokens.
2. Preserved tokens keep their original RoPE positions: the position ids are
   gathered with the kept rows, never renumbered. The next decoded token's
   position is the unreduced prompt length (layer 0's cache length), so the
   positions of a FiCoCo-L run and an unreduced run are the same numbers.
3. The causal mask is built per layer from that layer's own cache length
   (an additive [1, 1, q, kv] mask; none for a single decoded token, which sees
   its whole cache). Padded batches are refused upstream (`ficoco.patch.llava`).

Each step is reported to whoever observes (`ficoco.patch.observe`).

Not supported on this path: `output_hidden_states` / `output_attentions`
capture, and padding inside a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama

from ..config import Step
from ..core import LanguageStepParams, language_step
from . import observe


def causal_mask(queries: int, keys: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Additive mask [1, 1, q, kv] for the last `queries` of `keys` positions; None for one query."""
    if queries == 1:
        return None
    mask = torch.full((queries, keys), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(keys - queries + 1)[None, None]


def attention_with_probs(attn: nn.Module, x: Tensor, position_embeddings, cache, mask) -> tuple[Tensor, Tensor]:
    """LlamaAttention.forward with eager attention, also returning the head-averaged map.

    Mirrors `LlamaAttention.forward` (transformers 5.23) with
    `eager_attention_forward`; the only change is that the post-softmax
    probabilities are returned. x: [B, L, C]. Returns ([B, L, C], A [B, L, kv]).
    """
    batch, length, _ = x.shape
    shape = (batch, length, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, L, D]
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # [B, Hkv, L, D]
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    out, probs = modeling_llama.eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling, dropout=0.0)
    return attn.o_proj(out.reshape(batch, length, -1)), probs.mean(dim=1)


def reducing_layer(layer, h, position_embeddings, mask, cache, span, r, params, index: int | None = None):
    """LlamaDecoderLayer.forward with a FiCoCo-L step before the MLP block.

    h: [B, L, C]. Returns h [B, L-r, C] and the kept rows [B, L-r] of the input.
    `index` (the decoder layer's number) is what observers (`ficoco.patch.observe`) are told.
    """
    attn_out, attn_map = attention_with_probs(layer.self_attn, layer.input_layernorm(h), position_embeddings, cache, mask)
    h = h + attn_out
    out, rows = language_step(h, attn_map, span[0], span[1], r, params)  # FiCoCo-L
    if observe.active():
        observe.report(observe.LanguageEvent(index, span[0], span[1], r, params, h, attn_map, out, rows))
    return out + layer.mlp(layer.post_attention_layernorm(out)), rows


def decoder_forward(
    decoder: nn.Module,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    cache,
    steps: tuple[Step, ...],
    span: tuple[int, int] | None,
    params: LanguageStepParams,
) -> Tensor:
    """`LlamaModel.forward` with FiCoCo-L steps; returns the normed last hidden state [B, L', C].

    inputs_embeds: [B, L, C]; position_ids: [B, L]; span: (start, length) of
    the visual tokens in this chunk, required when `steps` is not empty.
    """
    # ---- adapted from transformers 5.23 LlamaModel.forward (the layer loop) ----
    h = inputs_embeds
    position_embeddings = decoder.rotary_emb(h, position_ids=position_ids)
    by_layer = {step.layer: step for step in steps}
    for index, layer in enumerate(decoder.layers[: decoder.config.num_hidden_layers]):
        past = cache.get_seq_length(index) if cache is not None else 0
        mask = causal_mask(h.shape[1], past + h.shape[1], h.dtype, h.device)  # FiCoCo: per-layer lengths
        step = by_layer.get(index)
        if step is None:
            h = layer(
                h,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
            continue
        # ---- FiCoCo: reduce the visual span, keep the preserved tokens' positions ----
        assert span is not None and past == 0 and step.tokens_in == span[1], (step, span, past)
        h, kept = reducing_layer(layer, h, position_embeddings, mask, cache, span, step.r, params, index)
        position_ids = position_ids.gather(1, kept)  # [B, L-r] original positions
        position_embeddings = decoder.rotary_emb(h, position_ids=position_ids)
        span = (span[0], step.tokens_out)
        # ---- end FiCoCo ----
    return decoder.norm(h)
