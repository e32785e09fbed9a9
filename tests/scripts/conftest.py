"""Fixtures of the scripts tests: one small export.build build (vision.onnx + prefill.onnx, no engines)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_build(tmp_path_factory: pytest.TempPathFactory, preset_dirs) -> Path:
    """`python -m export.build --backend none --ratio 0.5` of tiny-llava-1.5 (FiCoCo-V, 288 tokens), made once."""
    from export.build import main

    out = tmp_path_factory.mktemp("scripts-build") / "tiny-v-r0.5"
    args = ["--model", str(preset_dirs["tiny-llava-1.5"]), "--variant", "v", "--ratio", "0.5",
            "--backend", "none", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = main(args)
    assert code == 0, f"export.build {' '.join(args)} failed:\n{log.getvalue()[-3000:]}"
    return out
