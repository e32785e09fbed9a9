"""Analytic FLOPs of the vision encoder and the LLM prefill under a FiCoCo schedule (no torch).

Convention (the paper's, after LLM-Viewer): 2 FLOPs per multiply-accumulate of
every linear layer, plus the attention products Q K^T and A V over the full
(not causally halved) T x T matrix; norms, softmax, activations and the LM head
are left out, as is FiCoCo's own (small) work. With 576 visual and about 60 text
tokens this gives LLaVA-1.5-7B's prefill as 8.45 TFLOPs (paper: 8.5).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Transformer:
    """The widths that set a transformer stack's FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    gated_mlp: bool  # Llama (gate, up, down) vs CLIP (fc1, fc2)

    def __post_init__(self) -> None:
        assert self.hidden % self.heads == 0 and self.heads % self.kv_heads == 0, self

    def layer_flops(self, tokens: int, keys: int | None = None) -> float:
        """One layer on `tokens` queries attending over `keys` (default: the same tokens)."""
        keys = tokens if keys is None else keys
        kv_width = self.hidden // self.heads * self.kv_heads
        projections = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_width  # q, o; k, v
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        attention = 2 * tokens * keys * self.hidden  # Q K^T and A V
        return 2.0 * tokens * (projections + mlp) + 2.0 * attention

    def stack_flops(self, tokens_in: int, steps: dict[int, int], stop: int | None = None) -> float:
        """Layers 0..stop-1 with token counts dropping after each step {layer: tokens_out}."""
        total, tokens = 0.0, tokens_in
        for layer in range(self.layers if stop is None else stop):
            total += self.layer_flops(tokens)
            tokens = steps.get(layer, tokens)
        return total


def text_of(config: dict) -> Transformer:
    """From a Hugging Face text config dict (Llama)."""
    heads = config["num_attention_heads"]
    return Transformer(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                       heads, config.get("num_key_value_heads") or heads, gated_mlp=True)


def vision_of(config: dict) -> Transformer:
    """From a Hugging Face CLIP vision config dict."""
    heads = config["num_attention_heads"]
    return Transformer(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                       heads, heads, gated_mlp=False)


def prefill_flops(text: Transformer, text_tokens: int, visual_tokens: int, language_steps: dict[int, int]) -> float:
    """LLM prefill; `language_steps` {layer: visual tokens after it} (FiCoCo-L)."""
    steps = {layer: text_tokens + kept for layer, kept in language_steps.items()}
    return text.stack_flops(text_tokens + visual_tokens, steps)


def vision_flops(vision: Transformer, crops: int, patches: int, vision_steps: dict[int, int], feature_layer: int) -> float:
    """Encoder up to the feature layer for all crops; `vision_steps` {layer: patch tokens after it}."""
    steps = {layer: kept + 1 for layer, kept in vision_steps.items()}  # + CLS
    return crops * vision.stack_flops(patches + 1, steps, stop=feature_layer + 1)
