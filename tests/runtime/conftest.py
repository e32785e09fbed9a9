"""Fixtures of the runtime tests: builds made once per session (on first use), photographs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

PHOTOS = ("astronaut", "coffee")


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
