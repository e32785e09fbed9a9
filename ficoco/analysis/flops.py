"""Analytic FLOPs of the vision encoder and the LLM prefill under a FiCoCo schedule (no torch).

Convention (the paper's, after LLM-Viewer): 2 FLOPs per multiply-accumulate of
every linear layer, plus the attention products Q K^T and A V over the full
(not causally halved) T x T matrix; norms, softmax, activations and the LM head
are left out, as is FiCoCo's own (small) work. With 576 visual and about 60 text
tokens this gives LLaVA-1.5-7B's prefill as 8.45 TFLOPs (paper: 8.5).

`count` and `tokens_for_budget` work on a whole model from its config dict
(Hugging Face's config.json format); `scripts/flops.py` is their command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import FiCoCoConfig, Schedule
from ..geometry import config_geometry, text_geometry
from ..plan import BuildPlan
from ..plan import plan as build_plan

TEXT_TOKENS = 60  # the paper's "about 60" text tokens of a prompt
ANY_PROMPT = 1 << 20  # FLOPs do not depend on the cache: the plans counted here hold any prompt
VARIANTS = ("v", "l", "vl")


@dataclass(frozen=True)
class Transformer:
    """The widths that set a transformer stack's FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool  # Llama (gate, up, down) vs CLIP (fc1, fc2)

    def __post_init__(self) -> None:
        assert self.heads % self.kv_heads == 0, self

    def layer_flops(self, tokens: int, keys: int | None = None) -> float:
        """One layer on `tokens` queries attending over `keys` (default: the same tokens)."""
        keys = tokens if keys is None else keys
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * self.hidden * q_width + 2 * self.hidden * kv_width  # q, o; k, v
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        attention = 2 * tokens * keys * q_width  # Q K^T and A V
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
    t = text_geometry(config)
    return Transformer(t.hidden, config["intermediate_size"], t.layers, t.heads, t.kv_heads, t.head_dim, gated_mlp=True)


def vision_of(config: dict) -> Transformer:
    """From a Hugging Face CLIP vision config dict."""
    heads = config["num_attention_heads"]
    return Transformer(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                       heads, heads, config["hidden_size"] // heads, gated_mlp=False)


def prefill_flops(text: Transformer, text_tokens: int, visual_tokens: int, language_steps: dict[int, int]) -> float:
    """LLM prefill; `language_steps` {layer: visual tokens after it} (FiCoCo-L)."""
    steps = {layer: text_tokens + kept for layer, kept in language_steps.items()}
    return text.stack_flops(text_tokens + visual_tokens, steps)


def vision_flops(vision: Transformer, crops: int, patches: int, vision_steps: dict[int, int], feature_layer: int) -> float:
    """Encoder up to the feature layer for all crops; `vision_steps` {layer: patch tokens after it}."""
    steps = {layer: kept + 1 for layer, kept in vision_steps.items()}  # + CLS
    return crops * vision.stack_flops(patches + 1, steps, stop=feature_layer + 1)


# --------------------------------------------------------------------------- whole models, from a config dict
# A LLaVA config in Hugging Face's config.json format (text_config / vision_config dicts with
# every width filled in). The visual tokens are the build's (`ficoco.plan`): LLaVA-NeXT counts
# the anyres grid with most crops plus the base crop, `crops x k` tokens, and one image_newline
# token per grid row (2 x 2 grid: 5 x 576 + 2 = 2882 for llava-v1.6), as the manifest does.


@dataclass(frozen=True)
class Count:
    """FLOPs of one setting: `tokens` per crop kept after the last step (P when unreduced)."""

    variant: str  # "none", "v", "l" or "vl"
    tokens: int
    crops: int
    visual_tokens: int  # into the LLM: crops x kept per crop (+ LLaVA-NeXT's newline tokens)
    schedule: Schedule
    vision: float
    prefill: float
    plan: BuildPlan | None = field(default=None, compare=False)  # the build plan counted

    @property
    def total(self) -> float:
        return self.vision + self.prefill


def count(config: dict, variant: str = "none", tokens: int | None = None, text_tokens: int = TEXT_TOKENS,
          grid: tuple[int, int] | None = None) -> Count:
    """Analytic FLOPs of the vision encoder and the prefill for `variant` keeping `tokens` per crop.

    The token counts are `ficoco.plan`'s, the ones a build with that setting runs (and its manifest's
    FLOPs count): FiCoCo-L sees every visual token FiCoCo-V passes on, LLaVA-NeXT's newlines included.
    """
    if variant not in ("none", *VARIANTS):
        raise ValueError(f"variant must be 'none' or one of {VARIANTS}, got {variant!r}")
    geometry = config_geometry(config)
    tokens = geometry.patches if tokens is None else tokens
    ficoco = None if variant == "none" or tokens == geometry.patches else FiCoCoConfig(variant, tokens=tokens)
    p = build_plan(config, ficoco, grid, max_seq_len=ANY_PROMPT)
    vision, prefill = plan_flops(config, p, text_tokens)
    return Count(variant, tokens, p.crops, p.visual_tokens, Schedule(p.vision, p.language), vision, prefill, plan=p)


def plan_flops(config: dict, p: BuildPlan, text_tokens: int = TEXT_TOKENS) -> tuple[float, float]:
    """(vision encoder, prefill) FLOPs of build plan `p` of a LLaVA config dict, with `text_tokens` text tokens."""
    vision = vision_flops(vision_of(config["vision_config"]), p.crops, p.patches_per_crop,
                          {s.layer: s.tokens_out for s in p.vision}, p.geometry.feature_layer)
    prefill = prefill_flops(text_of(config["text_config"]), text_tokens, p.visual_tokens,
                            {s.layer: s.tokens_out for s in p.language})
    return vision, prefill


def tokens_for_budget(model_config: dict, tflops: float, variant: str = "v", text_tokens: int = TEXT_TOKENS,
                      grid: tuple[int, int] | None = None, include_vision: bool = False) -> int:
    """The most visual tokens per crop (FiCoCoConfig `tokens`) whose prefill (+ encoder) fits `tflops`.

    Returns the patch count P when the unreduced model already fits; raises
    ValueError when even one token per crop does not (FiCoCo-L's first layers
    always see every visual token).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    budget = tflops * 1e12
    patches = config_geometry(model_config).patches
    best = None
    for tokens in range(patches, 0, -1):
        c = count(model_config, variant, tokens, text_tokens, grid)
        flops = c.total if include_vision else c.prefill
        if flops <= budget:
            return tokens
        best = flops
    raise ValueError(f"no FiCoCo-{variant.upper()} schedule fits {tflops} TFLOPs: one token per crop "
                     f"still needs {best / 1e12:.3f} TFLOPs")
