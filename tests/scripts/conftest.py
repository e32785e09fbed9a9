"""Fixtures of the scripts tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_build(build_dir) -> Path:
    """The shared tiny-llava-1.5 FiCoCo-V ratio-0.5 build (tests/conftest.py), made once per session."""
    return build_dir("1.5-v")


@pytest.fixture(scope="session")
def small_source(preset_dirs) -> Path:
    """The checkpoint directory `small_build` was made from (manifests name models, not local paths)."""
    return preset_dirs["tiny-llava-1.5"]
