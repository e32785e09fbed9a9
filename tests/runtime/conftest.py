"""Fixtures of the runtime tests: builds made once per session (on first use), photographs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

# name -> (preset, variant, ratio). Each build takes about a minute on 2 CPU cores, so there are
# four: LLaVA-1.5 with every variant, LLaVA-NeXT with the combined one.
BUILDS = {
    "1.5-v": ("tiny-llava-1.5", "v", 0.5),
    "1.5-l": ("tiny-llava-1.5", "l", 0.5),
    "1.5-vl": ("tiny-llava-1.5", "vl", 0.25),
    "next-vl": ("tiny-llava-next", "vl", 0.25),
}
PHOTOS = ("astronaut", "coffee")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory, preset_dirs: dict[str, Path]) -> Callable[[str], Path]:
    """build_dir(name) -> the directory of BUILDS[name], made by export.build on first use (backend none)."""
    from export.build import main

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            preset, variant, ratio = BUILDS[name]
            out = tmp_path_factory.mktemp("builds") / name
            args = ["--model", str(preset_dirs[preset]), "--variant", variant, "--ratio", str(ratio),
                    "--backend", "none", "--out", str(out)]
            with contextlib.redirect_stdout(io.StringIO()) as log:
                code = main(args)
            assert code == 0, f"export.build {' '.join(args)} failed:\n{log.getvalue()[-3000:]}"
            made[name] = out
        return made[name]

    return get


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """skimage.data photographs saved as files: astronaut (PNG, 512x512), coffee (JPEG, 600x400)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the photographs")
    root = tmp_path_factory.mktemp("photos")
    files = {"astronaut": root / "astronaut.png", "coffee": root / "coffee.jpg"}
    for name, path in files.items():
        Image.fromarray(getattr(data, name)()).save(path, quality=95)
    return files


def tree_digest(directory: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under directory."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            out[str(path.relative_to(directory))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out
