"""The build plan: every count a FiCoCo build runs on, resolved once from the model's config.

    from ficoco import plan
    p = plan(model.config.to_dict(), FiCoCoConfig("vl", ratio=0.25), grid=None)

`BuildPlan` is one frozen value. The export's graphs, the manifest (`schedule`, written as-is), the
FLOPs count, the memory plan and the runtime read it; nothing re-derives a count. Pure Python: no
torch.

    crops            1 (LLaVA-1.5) or 1 + rows * cols (LLaVA-NeXT, the anyres grid fixed by the build)
    kept_per_crop    patch tokens per crop after FiCoCo-V (all of them without it)
    newline_rows     LLaVA-NeXT: one image_newline token after each row of crops
    visual_tokens    crops * kept_per_crop + newline_rows: the prompt's visual tokens
    language         FiCoCo-L steps over those visual tokens
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import FiCoCoConfig, ModelGeometry, Step, build_schedule, language_schedule


@dataclass(frozen=True)
class BuildPlan:
    variant: str  # "none", "v", "l" or "vl"
    geometry: ModelGeometry
    grid: tuple[int, int] | None
    crops: int
    vision: tuple[Step, ...]
    kept_per_crop: int
    newline_rows: int
    visual_tokens: int
    language: tuple[Step, ...]

    @property
    def patches_per_crop(self) -> int:
        return self.geometry.patches

    @property
    def reduction_layers(self) -> tuple[int, ...]:
        """The decoder layers holding a FiCoCo-L step (where the decoder is split)."""
        return tuple(step.layer for step in self.language)

    @property
    def visual_after_language(self) -> int:
        """Visual tokens left after the last FiCoCo-L step (visual_tokens without one)."""
        return self.language[-1].tokens_out if self.language else self.visual_tokens

    def prompt_length(self, before: int, after: int) -> int:
        """Tokens of a prompt with `before` and `after` text tokens around the image, at layer 0."""
        return before + self.visual_tokens + after

    def removed_before(self, layer: int) -> int:
        """Tokens FiCoCo-L has removed from the sequence that layer `layer` caches."""
        return sum(step.r for step in self.language if step.layer < layer)

    def capacities(self, max_seq_len: int) -> tuple[int, ...]:
        """Each decoder layer's cache capacity for sequences of at most `max_seq_len` tokens."""
        return tuple(max_seq_len - self.removed_before(layer) for layer in range(self.geometry.text_layers))

    def segment_tokens(self, segment: int, prompt_length: int) -> int:
        """Tokens the prefill feeds decoder.{segment} (after `segment` FiCoCo-L steps)."""
        return prompt_length - sum(step.r for step in self.language[:segment])

    def to_dict(self) -> dict:
        """The manifest's `schedule` (lists for tuples; `language`/`vision` as [layer, in, out])."""
        return {
            "variant": self.variant, "geometry": asdict(self.geometry),
            "grid": list(self.grid) if self.grid else None, "crops": self.crops,
            "vision": [[s.layer, s.tokens_in, s.tokens_out] for s in self.vision],
            "patches_per_crop": self.patches_per_crop, "kept_per_crop": self.kept_per_crop,
            "newline_rows": self.newline_rows, "visual_tokens": self.visual_tokens,
            "language": [[s.layer, s.tokens_in, s.tokens_out] for s in self.language],
        }


def plan(model_config: dict, config: FiCoCoConfig | None, grid: tuple[int, int] | None = None) -> BuildPlan:
    """The plan of `config` (None: unreduced) on a LLaVA / LLaVA-NeXT config dict (`model.config.to_dict()`).

    `grid`: LLaVA-NeXT's anyres grid (rows, cols), fixed by the build; None for LLaVA-1.5.
    """
    from .flops import config_geometry

    geometry = config_geometry(model_config)
    if config is not None:
        vision = build_schedule(config, geometry).vision  # validates tokens and layers against the model
    else:
        vision = ()
    kept = vision[-1].tokens_out if vision else geometry.patches
    crops = 1 + grid[0] * grid[1] if grid else 1
    newline_rows = grid[0] if grid else 0
    visual = crops * kept + newline_rows
    language = language_schedule(config, geometry, visual) if config is not None else ()
    variant = config.variant if config is not None and (vision or language) else "none"
    return BuildPlan(variant, geometry, tuple(grid) if grid else None, crops, vision, kept, newline_rows, visual, language)
