"""FiCoCo settings and the static reduction schedule.

`FiCoCoConfig` is what a user chooses (variant, how much to keep, the paper's
hyperparameters). `Schedule` is what the model runs: per-layer token counts as
Python ints, computed once from the config and the model's geometry before any
forward or trace. The export bakes the same `Schedule` into its graphs.

How much is kept:

- `ratio` is the fraction of the visual tokens left after the last reduction
  step. With `tokens=T` instead, the ratio is `T / P`, P the patch tokens of one
  image (576 for a 336 px CLIP-L/14 crop).
- Variant `v` reduces each crop's P patch tokens to `round(ratio * P)` inside
  the vision encoder. Variant `l` reduces the n visual tokens of the prompt to
  `round(ratio * n)` at the first FiCoCo-L layer of the decoder. Variant `vl`
  splits the reduction geometrically: the encoder keeps `round(sqrt(ratio) * P)`
  per crop and the decoder brings the prompt's visual tokens to the overall
  ratio (for LLaVA-1.5: exactly `round(ratio * 576)` reach the later layers).
- Within a stage the discards are spread evenly over the stage's layers (the
  first layers take the remainder). Layers with nothing to discard are left out,
  so `ratio=1.0` gives an empty schedule.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

VARIANTS = ("v", "l", "vl")


@dataclass(frozen=True)
class FiCoCoConfig:
    """What to reduce and how; defaults are the paper's hyperparameters."""

    variant: str
    ratio: float | None = None  # fraction of visual tokens kept after the last step, in (0, 1]
    tokens: int | None = None  # or: visual tokens kept per image (converted with the model's P)
    lam: float = 0.35  # Eq. 1 (FiCoCo-V filter)
    beta: float = 0.6  # Eq. 3 (FiCoCo-L filter)
    gamma: float = 0.6  # Eq. 4 (FiCoCo-L correlation)
    epsilon: float = 0.998  # quantile of the token-adaptive threshold
    window: tuple[int, int] = (2, 2)  # local-penalty window (FiCoCo-V)
    penalty_scale: float = 2.0
    local_penalty: bool = True
    vision_start_layer: int = 12  # first encoder layer that reduces (0-based)
    language_layers: tuple[int, ...] = field(default=(4,))  # decoder layers that reduce (0-based)
    # LLaVA-NeXT: "auto" = HF's unpadded grid without FiCoCo-V, the crop layout with it;
    # "crops" = always the crop layout (static token count; what the export uses)
    crop_layout: str = "auto"

    def __post_init__(self) -> None:
        # lists (a JSON manifest, a caller's [4, 8]) become tuples: the config stays hashable, as the patch needs
        object.__setattr__(self, "window", _int_tuple("window", self.window))
        object.__setattr__(self, "language_layers", _int_tuple("language_layers", self.language_layers))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError(f"give exactly one of ratio and tokens, got ratio={self.ratio}, tokens={self.tokens}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got ratio={self.ratio}")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"tokens must be a positive integer, got tokens={self.tokens!r}")
        for name in ("lam", "beta", "gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {name}={getattr(self, name)}")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got epsilon={self.epsilon}")
        if len(self.window) != 2 or min(self.window) < 1:
            raise ValueError(f"window must be two positive ints, got window={self.window}")
        if self.penalty_scale <= 0:
            raise ValueError(f"penalty_scale must be > 0, got penalty_scale={self.penalty_scale}")
        if self.vision_start_layer < 0:
            raise ValueError(f"vision_start_layer must be >= 0, got {self.vision_start_layer}")
        if self.crop_layout not in ("auto", "crops"):
            raise ValueError(f"crop_layout must be 'auto' or 'crops', got {self.crop_layout!r}")
        layers = self.language_layers
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"language_layers must be distinct ascending layer indices >= 0, got {layers}")

    @classmethod
    def from_dict(cls, d: dict) -> FiCoCoConfig:
        """The inverse of `dataclasses.asdict` (what a manifest's `ficoco` holds; other keys are ignored)."""
        fields = {f for f in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})

    @property
    def reduces_vision(self) -> bool:
        return "v" in self.variant

    @property
    def reduces_language(self) -> bool:
        return "l" in self.variant

    def kept_fraction(self, patches: int) -> float:
        """The overall fraction of visual tokens kept, for a model with `patches` tokens per image."""
        if self.tokens is None:
            return float(self.ratio)
        if self.tokens > patches:
            raise ValueError(f"tokens={self.tokens} is more than the {patches} visual tokens per image of this model")
        return self.tokens / patches


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    """`value` (a list, tuple or range of ints) as a tuple of ints; ValueError naming it otherwise."""
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(i, bool) for i in value):
            raise TypeError
        return tuple(operator.index(i) for i in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {name}={value!r}") from None


@dataclass(frozen=True)
class Step:
    """One reduction step: at `layer`, `tokens_in` reducible tokens become `tokens_out`."""

    layer: int
    tokens_in: int
    tokens_out: int

    def __post_init__(self) -> None:
        assert 1 <= self.tokens_out < self.tokens_in, self

    @property
    def r(self) -> int:
        return self.tokens_in - self.tokens_out


def even_steps(layers: list[int], tokens_in: int, tokens_out: int) -> tuple[Step, ...]:
    """Spread `tokens_in - tokens_out` discards evenly over `layers`; drop empty steps."""
    total, count = tokens_in - tokens_out, len(layers)
    steps, current = [], tokens_in
    for index, layer in enumerate(layers):
        r = total // count + (1 if index < total % count else 0)
        if r:
            steps.append(Step(layer, current, current - r))
            current -= r
    return tuple(steps)


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes of a LLaVA model that the schedule depends on."""

    grid: tuple[int, int]  # patch grid of one crop, e.g. (24, 24)
    vision_layers: int  # encoder layers, e.g. 24
    feature_layer: int  # 0-based encoder layer whose output LLaVA reads (22 for hidden_states[-2])
    text_layers: int  # decoder layers, e.g. 32

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Schedule:
    """Per-layer token counts: vision per crop (patch tokens, CLS excluded), language over the prompt's visual span."""

    vision: tuple[Step, ...]
    language: tuple[Step, ...]

    @property
    def vision_tokens(self) -> dict[int, int]:
        """{layer: patch tokens per crop after that layer's step}."""
        return {s.layer: s.tokens_out for s in self.vision}


def vision_schedule(config: FiCoCoConfig, geometry: ModelGeometry) -> tuple[Step, ...]:
    """FiCoCo-V steps on encoder layers `vision_start_layer .. feature_layer` (empty for variant `l`)."""
    if not config.reduces_vision:
        return ()
    if config.vision_start_layer > geometry.feature_layer:
        raise ValueError(
            f"vision_start_layer={config.vision_start_layer} is after the encoder layer LLaVA reads "
            f"(layer {geometry.feature_layer} of {geometry.vision_layers})"
        )
    fraction = config.kept_fraction(geometry.patches)
    if config.variant == "vl":
        fraction = math.sqrt(fraction)
    kept = max(1, round(fraction * geometry.patches))
    return even_steps(list(range(config.vision_start_layer, geometry.feature_layer + 1)), geometry.patches, kept)


def language_schedule(config: FiCoCoConfig, geometry: ModelGeometry, visual_tokens: int) -> tuple[Step, ...]:
    """FiCoCo-L steps for a prompt holding `visual_tokens` visual tokens (after any FiCoCo-V)."""
    if not config.reduces_language:
        return ()
    if config.language_layers[-1] >= geometry.text_layers:
        raise ValueError(
            f"language_layers={config.language_layers} needs more than the {geometry.text_layers} decoder layers of this model"
        )
    fraction = config.kept_fraction(geometry.patches)
    if config.variant == "vl":  # bring the overall count to `fraction` of the unreduced one
        vision = vision_schedule(config, geometry)
        fraction *= geometry.patches / (vision[-1].tokens_out if vision else geometry.patches)
    kept = max(1, min(visual_tokens, round(fraction * visual_tokens)))
    return even_steps(list(config.language_layers), visual_tokens, kept)


def build_schedule(config: FiCoCoConfig, geometry: ModelGeometry, visual_tokens: int | None = None) -> Schedule:
    """The whole schedule; `visual_tokens` defaults to what FiCoCo-V passes on for one crop (LLaVA-1.5)."""
    vision = vision_schedule(config, geometry)
    if visual_tokens is None:
        visual_tokens = vision[-1].tokens_out if vision else geometry.patches
    return Schedule(vision, language_schedule(config, geometry, visual_tokens))
