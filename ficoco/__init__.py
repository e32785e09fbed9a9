"""FiCoCo (filter, correlate, compress) token reduction for LLaVA-class models.

    from ficoco import FiCoCoConfig, apply
    model = apply(model, FiCoCoConfig(variant="vl", ratio=0.25))

The algorithm is in `ficoco.core` (pure tensor functions), the schedule in
`ficoco.config`, the per-model adapters in `ficoco.patch`. torch and
transformers are imported when `apply` is first used.
"""

from __future__ import annotations

from .config import FiCoCoConfig, ModelGeometry, Schedule, Step, build_schedule
from .plan import BuildPlan, plan

__all__ = ["BuildPlan", "FiCoCoConfig", "ModelGeometry", "Schedule", "Step", "apply", "build_schedule", "plan", "remove"]
__version__ = "0.1.0"


def apply(model, config: FiCoCoConfig):
    """Patch a loaded `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` in place; returns it."""
    from .patch.llava import apply as _apply

    return _apply(model, config)


def remove(model):
    """Undo `apply` on `model`; returns it."""
    from .patch.llava import remove as _remove

    return _remove(model)
