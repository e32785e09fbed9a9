"""ficoco-edge runtime: preprocess an image and generate text from an `export.build` directory.

numpy, pillow, tokenizers, jinja2 and the inference backend (ONNX Runtime or TensorRT); never
torch or transformers. `Pipeline` and `Result` are imported on first use, so `runtime.manifest` and
`runtime.loop` stay light for the exporter.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
