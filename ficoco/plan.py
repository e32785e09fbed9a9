"""The build plan: every count a FiCoCo build runs on, resolved once from the model's config.

    from ficoco import plan
    p = plan(model.config.to_dict(), FiCoCoConfig("vl", ratio=0.25), grid=None, max_seq_len=2048)

`BuildPlan` is one frozen value. The export traces its graphs from it, writes it to the manifest as
`schedule` (`to_dict`), and the runtime reads it back (`BuildPlan.from_dict`, as `Build.plan`); the
FLOPs count, the memory plan, the engine profiles and the benches read it too. Nothing re-derives a
count. Pure Python: no torch (the runtime imports this module on the device).

    geometry         the vision side (patch grid per crop, encoder layers, feature layer, decoder layers)
    text             the decoder's widths (layers, hidden, heads, kv_heads, head_dim, vocab)
    crops            1 (LLaVA-1.5) or 1 + rows * cols (LLaVA-NeXT, the anyres grid fixed by the build)
    kept_per_crop    patch tokens per crop after FiCoCo-V (all of them without it)
    newline_rows     LLaVA-NeXT: one image_newline token after each row of crops
    visual_tokens    crops * kept_per_crop + newline_rows: the prompt's visual tokens
    language         FiCoCo-L steps over those visual tokens
    max_seq_len      the longest sequence (prompt + answer) at layer 0
    segments         the decoder split at each FiCoCo-L layer: decoder.s holds the caches of its layers,
                     each at the segment's capacity (max_seq_len less what earlier steps removed)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import FiCoCoConfig, ModelGeometry, Step, build_schedule, language_schedule
from .geometry import TextGeometry, anyres_grid, config_geometry, text_geometry

DEFAULT_MAX_SEQ_LEN = 2048  # the least --max-seq-len a build gets by default (`default_max_seq_len`)
ANSWER_ROOM = 512  # tokens a default --max-seq-len leaves beside an unreduced image: the prompt's text and the answer


@dataclass(frozen=True)
class Segment:
    """decoder.{index}: the decoder layers [first, stop) whose caches it holds, all at `capacity` rows;
    `step` is the FiCoCo-L step run after it (reduce.{index + 1}), None for the last segment (the logits)."""

    index: int
    first: int
    stop: int
    capacity: int
    step: Step | None

    @property
    def layers(self) -> range:
        return range(self.first, self.stop)


@dataclass(frozen=True)
class BuildPlan:
    variant: str  # "none", "v", "l" or "vl"
    geometry: ModelGeometry
    text: TextGeometry
    grid: tuple[int, int] | None
    crops: int
    vision: tuple[Step, ...]
    kept_per_crop: int
    newline_rows: int
    visual_tokens: int
    language: tuple[Step, ...]
    max_seq_len: int
    segments: tuple[Segment, ...]

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

    @property
    def capacities(self) -> tuple[int, ...]:
        """Each decoder layer's cache capacity (its segment's)."""
        return tuple(s.capacity for s in self.segments for _ in s.layers)

    def unreduced(self) -> BuildPlan:
        """The same model, grid and max_seq_len without FiCoCo (what a reduction is measured against)."""
        return assemble("none", self.geometry, self.text, self.grid, (), (), self.max_seq_len)

    def prompt_length(self, before: int, after: int) -> int:
        """Tokens of a prompt with `before` and `after` text tokens around the image, at layer 0."""
        return before + self.visual_tokens + after

    def segment_tokens(self, segment: int, prompt_length: int) -> int:
        """Tokens the prefill feeds decoder.{segment} (after `segment` FiCoCo-L steps)."""
        return prompt_length - (self.max_seq_len - self.segments[segment].capacity)

    def cache_lengths(self, prompt_length: int) -> tuple[int, ...]:
        """Layer i's cache length after the prefill of a `prompt_length` prompt (layer 0's count)."""
        return tuple(self.segment_tokens(s.index, prompt_length) for s in self.segments for _ in s.layers)

    def to_dict(self) -> dict:
        """The manifest's `schedule` (lists for tuples; steps as [layer, in, out]; segments as [first, stop, capacity])."""
        return {
            "variant": self.variant, "geometry": {**asdict(self.geometry), "grid": list(self.geometry.grid)},
            "text": asdict(self.text),
            "grid": list(self.grid) if self.grid else None, "crops": self.crops,
            "vision": [[s.layer, s.tokens_in, s.tokens_out] for s in self.vision],
            "patches_per_crop": self.patches_per_crop, "kept_per_crop": self.kept_per_crop,
            "newline_rows": self.newline_rows, "visual_tokens": self.visual_tokens,
            "language": [[s.layer, s.tokens_in, s.tokens_out] for s in self.language],
            "max_seq_len": self.max_seq_len,
            "segments": [[s.first, s.stop, s.capacity] for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict) -> BuildPlan:
        """The inverse of `to_dict`: the plan is assembled again from its choices (geometry, grid, steps,
        max_seq_len) and every count stored beside them must agree; ValueError naming the first that does not."""
        try:
            geometry = ModelGeometry(tuple(d["geometry"]["grid"]), d["geometry"]["vision_layers"],
                                     d["geometry"]["feature_layer"], d["geometry"]["text_layers"])
            plan = assemble(d["variant"], geometry, TextGeometry(**d["text"]),
                            tuple(d["grid"]) if d["grid"] else None,
                            tuple(Step(*s) for s in d["vision"]), tuple(Step(*s) for s in d["language"]), d["max_seq_len"])
        except (KeyError, TypeError, AssertionError) as error:
            raise ValueError(f"schedule lacks or mangles {error!s:.120}") from None
        for key, value in plan.to_dict().items():
            if d.get(key) != value:
                raise ValueError(f"schedule.{key} is {d.get(key)!r:.80}, but its grid, steps and max_seq_len give {value!r:.80}")
        return plan


def segments_of(text_layers: int, language: tuple[Step, ...], max_seq_len: int) -> tuple[Segment, ...]:
    """The decoder split after each FiCoCo-L layer; a segment's capacity is max_seq_len less every token the
    steps before it removed (ValueError when that leaves no room)."""
    bounds, out, removed = [0, *(step.layer + 1 for step in language), text_layers], [], 0
    for index in range(len(language) + 1):
        if max_seq_len - removed < 1:
            raise ValueError(f"max_seq_len={max_seq_len} is not more than the {removed} tokens FiCoCo-L removes")
        step = language[index] if index < len(language) else None
        out.append(Segment(index, bounds[index], bounds[index + 1], max_seq_len - removed, step))
        removed += step.r if step else 0
    return tuple(out)


def assemble(variant: str, geometry: ModelGeometry, text: TextGeometry, grid: tuple[int, int] | None,
             vision: tuple[Step, ...], language: tuple[Step, ...], max_seq_len: int) -> BuildPlan:
    """A plan from its choices; every count follows from them here, and only here."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if text.layers != geometry.text_layers:
        raise ValueError(f"text.layers {text.layers} differs from geometry.text_layers {geometry.text_layers}")
    kept = vision[-1].tokens_out if vision else geometry.patches
    crops = 1 + grid[0] * grid[1] if grid else 1
    newline_rows = grid[0] if grid else 0
    visual = crops * kept + newline_rows
    for step in language:
        if not (0 <= step.layer < text.layers and step.tokens_in <= visual):
            raise ValueError(f"FiCoCo-L step {step} is outside {text.layers} layers / {visual} visual tokens")
    return BuildPlan(variant, geometry, text, grid, crops, vision, kept, newline_rows, visual, language, max_seq_len,
                     segments_of(text.layers, language, max_seq_len))


def default_max_seq_len(model_config: dict, grid: tuple[int, int] | None = None) -> int:
    """export.build's --max-seq-len when none is given: the visual tokens of an unreduced image at the build's
    anyres grid (`grid`, default the one of most crops) plus ANSWER_ROOM, rounded up to a multiple of 1024, at
    least DEFAULT_MAX_SEQ_LEN: 2048 for LLaVA-1.5 (576 visual tokens), 4096 for LLaVA-NeXT at 2 x 2 (2882)."""
    visual = plan(model_config, None, grid).visual_tokens
    return max(DEFAULT_MAX_SEQ_LEN, -(-(visual + ANSWER_ROOM) // 1024) * 1024)


def plan(model_config: dict, config: FiCoCoConfig | None, grid: tuple[int, int] | None = None,
         max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> BuildPlan:
    """The plan of `config` (None: unreduced) on a LLaVA / LLaVA-NeXT config dict (`model.config.to_dict()`).

    `grid`: LLaVA-NeXT's anyres grid (rows, cols) the build serves (default: the one of most crops);
    must be None for LLaVA-1.5.
    """
    geometry, text = config_geometry(model_config), text_geometry(model_config)
    grid = anyres_grid(model_config, grid)
    vision = build_schedule(config, geometry).vision if config is not None else ()  # validates tokens and layers
    visual = assemble("v", geometry, text, grid, vision, (), max_seq_len).visual_tokens  # what FiCoCo-L sees
    language = language_schedule(config, geometry, visual) if config is not None else ()
    variant = config.variant if config is not None and (vision or language) else "none"
    return assemble(variant, geometry, text, grid, vision, language, max_seq_len)
