"""The one TensorRT layer: importing a flavour, checking its version, and its logger. Imports nothing heavy.

Both sides use it: `export/engine.py` builds engines with it and `runtime/backend_trt.py` runs them, so it
lives in the runtime (which ships to devices without the export side). TensorRT itself is imported only
when asked for. The module table (`errors.TRT_MODULES`), the install hints (`errors.HINTS`,
`errors.trt_install_hint`) and the error types (`errors.BackendNotInstalledError`,
`errors.UnsupportedVersionError`) are in `runtime/errors.py`, next to the other backends'.

* `import_trt(flavour, directory)`: the module of "tensorrt" (`tensorrt`) or "tensorrt-rtx"
  (`tensorrt_rtx_bindings` from pip, else `tensorrt_rtx` from the SDK), or BackendNotInstalledError
  naming what to install (on a Jetson: JetPack's TensorRT).
* `load_flavour(backend, directory)`: that, as a `Flavour`, with the version checked (standard 10.x,
  TensorRT-RTX 1.x; `device.trt_version_problem`); "auto" tries standard TensorRT, then RTX.
* `logger(module, flavour)`: one `ILogger` per TensorRT module and process (TensorRT keeps the first
  logger it is given): warnings and errors go to its `sink` (stderr; a build routes them to its log with
  `routed`), errors are also kept in `.errors`, and `last_error` gives the latest for a message.

Named `trtlib`, not `tensorrt`: a script run from this directory would otherwise shadow the real module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .device import trt_version_problem
from .errors import (
    HINTS,
    TENSORRT,
    TENSORRT_RTX,
    TRT_MODULES,
    BackendNotInstalledError,
    UnsupportedVersionError,
    trt_install_hint,
)

FLAVOURS = (TENSORRT, TENSORRT_RTX)
BACKENDS = ("auto", *FLAVOURS)  # what load_flavour takes
Sink = Callable[[str], Any]


@dataclass(frozen=True)
class Flavour:
    """An imported TensorRT flavour: `name` is "tensorrt" or "tensorrt-rtx", `module` what was imported."""

    name: str
    module: ModuleType = field(compare=False, repr=False)
    version: str

    @property
    def is_rtx(self) -> bool:
        """Whether this is TensorRT-RTX (strongly typed, ahead-of-time compute capabilities)."""
        return self.name == TENSORRT_RTX


def import_trt(flavour: str, directory: str | Path | None = None) -> Any:
    """The TensorRT module of `flavour`, or BackendNotInstalledError with the install hint and each import's error.

    `directory`: the build whose engines need it (the runtime), None when building engines (the export)."""
    if flavour not in TRT_MODULES:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    causes = []
    for name in TRT_MODULES[flavour]:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as error:  # OSError: a wheel whose shared libraries are missing
            causes.append(f"{name}: {error}")
    raise BackendNotInstalledError(f"{trt_install_hint(flavour, directory)} ({'; '.join(causes)})")


def _flavour(name: str, directory: str | Path | None) -> Flavour:
    """Import one flavour and check its version: UnsupportedVersionError naming the supported ones."""
    module = import_trt(name, directory)
    flavour = Flavour(name, module, str(getattr(module, "__version__", "unknown")))
    if (problem := trt_version_problem(name, flavour.version)) is not None:
        raise UnsupportedVersionError(problem)
    return flavour


def load_flavour(backend: str = "auto", directory: str | Path | None = None) -> Flavour:
    """Import TensorRT: "tensorrt", "tensorrt-rtx", or "auto" (standard TensorRT first, then RTX)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown TensorRT backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return _flavour(backend, directory)
    passed_over = []
    for name in FLAVOURS:
        try:
            return _flavour(name, directory)
        except UnsupportedVersionError as error:
            passed_over.append(str(error))
        except BackendNotInstalledError:
            pass
    raise BackendNotInstalledError(
        f"neither TensorRT nor TensorRT-RTX can be imported: {HINTS[TENSORRT]}; {HINTS[TENSORRT_RTX]}"
        + "".join(f"; {line}" for line in passed_over)
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_LOGGERS: dict[tuple[str, int], Any] = {}


def logger(trt: Any, flavour: str) -> Any:
    """The one logger of TensorRT module `trt` in this process, its messages tagged "[flavour]".

    Warnings and errors go to `.sink` (stderr unless `routed`); errors are also appended to `.errors`."""
    key = (flavour, id(trt.ILogger))
    if key not in _LOGGERS:

        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.sink: Sink = _stderr

            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= int(trt.ILogger.ERROR):
                    self.errors.append(msg)
                if int(severity) <= int(trt.ILogger.WARNING):
                    self.sink(f"[{flavour}] {msg}")

        _LOGGERS[key] = _Logger()
    return _LOGGERS[key]


@contextmanager
def routed(trt_logger: Any, sink: Sink) -> Iterator[Any]:
    """Within the block the logger's errors start empty and its messages go to `sink`; the sink is put back after.

    A build routes TensorRT's messages to its log this way; builds in one process must not overlap."""
    previous = trt_logger.sink
    trt_logger.errors.clear()
    trt_logger.sink = sink
    try:
        yield trt_logger
    finally:
        trt_logger.sink = previous


def last_error(trt_logger: Any, fallback: str) -> str:
    """The latest error TensorRT logged, on one line, or `fallback` when there is none."""
    return " ".join(trt_logger.errors[-1].split()) if trt_logger.errors else fallback
