"""What each FiCoCo step kept, reported by the adapters to whoever asks.

    from ficoco.patch.observe import observing
    with observing() as events:
        model.generate(**inputs)             # or clip.encode / llama.decoder_forward directly
    events[0].kept                           # VisionEvent: [crops, k] grid positions kept

The adapters (`clip.reducing_layer`, `llama.reducing_layer`) call `report` right after each FiCoCo
step with the step's inputs and outputs; `ficoco.core` stays pure math. With nobody observing the
adapters skip the report (one check of an empty list: nothing is built, nothing recorded), so
ONNX tracing and timing see the plain step. Observers are process-wide (not per thread) and are
called in registration order; `observe` and `observing` remove theirs on exit, even on error.
The events hold references to the step's tensors, not copies: an observer that keeps them alive
(as `observing` does) keeps those tensors alive too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from ..core import LanguageStepParams, VisionStepParams


@dataclass(frozen=True)
class VisionEvent:
    """One FiCoCo-V step, in CLIP encoder layer `layer` (None when the caller did not say which)."""

    layer: int | None
    r: int  # patches discarded per crop
    params: VisionStepParams
    x: Tensor  # [crops, 1+n, C] tokens entering the step (CLS first)
    attn: Tensor  # [crops, 1+n, 1+n] the head-averaged attention map the step scored
    positions: Tensor  # [crops, n] grid positions (raster index) of the patches entering the step
    out: Tensor  # [crops, 1+n-r, C] tokens leaving the step
    kept: Tensor  # [crops, n-r] grid positions of the patches kept, in raster order


@dataclass(frozen=True)
class LanguageEvent:
    """One FiCoCo-L step, in decoder layer `layer`, over the visual span `start .. start+length-1`."""

    layer: int | None
    start: int
    length: int  # visual tokens entering the step
    r: int  # visual tokens discarded
    params: LanguageStepParams
    x: Tensor  # [B, L, C] the prompt entering the step
    attn: Tensor  # [B, L, L] the head-averaged attention map the step scored
    out: Tensor  # [B, L-r, C] the prompt leaving the step
    rows: Tensor  # [B, L-r] int64: the input row of each output token (text before, kept visual, text after)

    @property
    def kept(self) -> Tensor:
        """[B, length-r] int64: the kept tokens' indices within this step's visual span, ascending."""
        return self.rows[:, self.start : self.start + self.length - self.r] - self.start


Event = VisionEvent | LanguageEvent
Observer = Callable[[Event], None]

_observers: list[Observer] = []  # registered by `observe`; empty = off


def active() -> bool:
    """True while somebody observes; the adapters build an event only then."""
    return bool(_observers)


def report(event: Event) -> None:
    """Hand `event` to every observer (the adapters call this after a step)."""
    for observer in tuple(_observers):
        observer(event)


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Within the block, `observer(event)` is called after every FiCoCo step, in any patched model."""
    if not callable(observer):
        raise TypeError(f"observer must be callable, got {type(observer).__name__}")
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.contextmanager
def observing() -> Iterator[list[Event]]:
    """Within the block, every FiCoCo step's event is appended to the yielded list, in running order."""
    events: list[Event] = []
    with observe(events.append):
        yield events
