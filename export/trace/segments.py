"""The LLM's exported graphs: decoder segments over in-place KV buffers, and the weightless FiCoCo-L step.

Each segment serves both phases (`runtime.names`: I/O and the split at the FiCoCo-L layers). Its
layers are Hugging Face's Llama layers (transformers 5.23, `models/llama/modeling_llama.py`) with
one change, marked `# buffer:` below: the attention reads the past from a cache buffer of any
capacity, in place, and returns the new rows only. Scores over the buffer's rows at or after
`past_length` are masked out; the new rows attend causally among themselves; one softmax spans both,
in fp32 as Hugging Face's eager attention does. The past is never concatenated with the new rows,
so a decode step reads each buffer once and writes nothing but the new token's key and value.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama

from ficoco.config import Step
from ficoco.core import LanguageStepParams, language_step
from ficoco.plan import BuildPlan


def buffer_attention(attn: nn.Module, x: Tensor, cos_sin, past_k: Tensor, past_v: Tensor, past_length: Tensor):
    """LlamaAttention.forward (eager) over a cache buffer.

    x: [1, q, C]; past_k / past_v: [1, Hkv, Cap, Dh], rows < past_length valid; past_length: [1].
    Returns (out [1, q, C], new key [1, Hkv, q, Dh], new value, head-mean map over the new keys [1, q, q]).
    """
    _, q_len, _ = x.shape
    shape = (1, q_len, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # [1, H, q, Dh]
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, Hkv, q, Dh]
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, *cos_sin)
    # ---- buffer: grouped queries against the buffer in place, no repeat_kv, no concatenation ----
    kv_heads, groups = k.shape[1], q.shape[1] // k.shape[1]
    qg = q.reshape(1, kv_heads, groups * q_len, attn.head_dim)  # [1, Hkv, G*q, Dh]: head h uses kv head h // G
    capacity = past_k.shape[2]
    past_scores = (qg @ past_k.transpose(2, 3)).float() * attn.scaling  # [1, Hkv, G*q, Cap]
    stale = torch.arange(capacity, device=x.device) >= past_length  # [Cap]
    past_scores = past_scores.masked_fill(stale, torch.finfo(torch.float32).min)
    new_scores = (qg @ k.transpose(2, 3)).float() * attn.scaling  # [1, Hkv, G*q, q]
    later = torch.ones(q_len, q_len, dtype=torch.bool, device=x.device).triu(1)  # [q, q] future keys
    new_scores = new_scores.masked_fill(later.repeat(groups, 1), torch.finfo(torch.float32).min)
    probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1).to(q.dtype)  # [1, Hkv, G*q, Cap+q]
    out = probs[..., :capacity] @ past_v + probs[..., capacity:] @ v  # [1, Hkv, G*q, Dh]
    out = out.reshape(1, kv_heads * groups, q_len, attn.head_dim).transpose(1, 2).reshape(1, q_len, -1)
    new_map = probs[..., capacity:].reshape(1, kv_heads * groups, q_len, q_len).mean(dim=1)  # [1, q, q]
    # ---- end buffer ----
    return attn.o_proj(out), k, v, new_map


def mlp_block(layer: nn.Module, h: Tensor) -> Tensor:
    """The second half of LlamaDecoderLayer.forward: h + MLP(post_attention_layernorm(h))."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


class DecoderSegment(nn.Module):
    """decoder.{s}: (hidden [1, q, D], positions [1, q], past_length [1], past buffers) -> tail outputs, new K/V.

    Enters after layer `enter`'s attention (its MLP block first) unless `enter` is None; runs the
    cached layers; leaves after the attention of its last cached layer when it is a reduction layer
    (`exit_mid`), else ends with the final norm and the LM head (last position).
    """

    def __init__(self, model: nn.Module, enter: int | None, cached: range, exit_mid: bool):
        super().__init__()
        self.decoder, self.lm_head = model.model.language_model, model.lm_head
        self.enter, self.cached, self.exit_mid = enter, cached, exit_mid

    def forward(self, hidden: Tensor, position_ids: Tensor, past_length: Tensor, past: list[Tensor]):
        layers = self.decoder.layers
        h = mlp_block(layers[self.enter], hidden) if self.enter is not None else hidden
        cos_sin = self.decoder.rotary_emb(h, position_ids=position_ids)
        present, attention = [], None
        for slot, index in enumerate(self.cached):
            layer = layers[index]
            out, k, v, attention = buffer_attention(layer.self_attn, layer.input_layernorm(h), cos_sin,
                                                    past[2 * slot], past[2 * slot + 1], past_length)
            h = h + out
            present += [k, v]
            if not (self.exit_mid and slot == len(self.cached) - 1):
                h = mlp_block(layer, h)
        if self.exit_mid:
            return (h, attention.to(torch.float32), *present)
        return (self.lm_head(self.decoder.norm(h)[:, -1]), *present)


class ReduceGraph(nn.Module):
    """reduce.{s}: FiCoCo-L's step, weightless (ficoco.core.language_step, as the patched model runs it)."""

    def __init__(self, step: Step, params: LanguageStepParams):
        super().__init__()
        self.step, self.params = step, params

    def forward(self, attended: Tensor, attention: Tensor, position_ids: Tensor, input_ids_before: Tensor):
        start, step = input_ids_before.shape[1], self.step
        h, rows = language_step(attended, attention, start, step.tokens_in, step.r, self.params)  # rows [1, q - r]
        return h, position_ids.gather(1, rows), rows[:, start:start + step.tokens_out] - start


class EmbedGraph(nn.Module):
    """embed: input_ids [1, q] -> inputs_embeds [1, q, D] (the table the runtime looks rows up in)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed = model.model.get_input_embeddings()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)


def segments(model: nn.Module, plan: BuildPlan) -> list[DecoderSegment]:
    """decoder.0 .. decoder.S: the plan's segments (`BuildPlan.segments`)."""
    out, enter = [], None
    for segment in plan.segments:
        out.append(DecoderSegment(model, enter, segment.layers, segment.step is not None))
        enter = segment.step.layer if segment.step else None
    return out


def tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding table (one tensor)."""
    return model.lm_head.weight is model.model.get_input_embeddings().weight
