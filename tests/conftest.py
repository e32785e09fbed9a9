"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def preset_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every preset in ``ficoco.models.presets.PRESETS`` built once per session: {name: checkpoint dir}."""
    from ficoco.models.presets import PRESETS, build_preset

    root = tmp_path_factory.mktemp("presets")
    return {name: build_preset(name, root / name) for name in PRESETS}


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-weights preset ``smol-llava-1.5``, through the preset cache that `--model smol-llava-1.5`
    also uses (built once, about 40 s and 0.54 GB, on a fresh machine)."""
    from ficoco.models.presets import resolve_model_dir

    return resolve_model_dir("smol-llava-1.5")


@pytest.fixture(scope="session")
def photo():
    """A deterministic 500x400 RGB test picture (smooth gradients plus seeded noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:400, 0:500]
    rgb = np.stack([x * 255 / 500, y * 255 / 400, (x + y) % 256], axis=-1)
    rgb = rgb + rng.normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype("uint8"))


def make_inputs(processor, image, instruction: str = "Describe the image."):
    """Processor inputs for one image and a LLaVA chat prompt (the processor's own expansion of <image>)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="session")
def tiny(preset_dirs):
    """{preset name: (model float32, processor)}, loaded through the same code as a real checkpoint."""
    from ficoco.models.presets import load

    return {name: load(path) for name, path in preset_dirs.items()}


# name -> (preset, variant, ratio): the builds that the export and runtime tests share, each made once
# per session on first use (about a minute each on 2 cores), with TensorRT-RTX engines when the `rtx`
# extra is installed (CI installs it through the `test` extra).
BUILDS = {
    "1.5-v": ("tiny-llava-1.5", "v", 0.5),
    "1.5-l": ("tiny-llava-1.5", "l", 0.5),
    "1.5-vl": ("tiny-llava-1.5", "vl", 0.25),
    "next-v": ("tiny-llava-next", "v", 0.5),
    "next-vl": ("tiny-llava-next", "vl", 0.25),
}


# name -> (preset, variant, ratio, extra arguments): quantized builds, made once per session on first use
QUANT_BUILDS = {
    "1.5-l-int4": ("tiny-llava-1.5", "l", 0.5, ["--weights", "int4"]),
}


def rtx_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx_bindings") is not None


# name -> (variant, ratio, precision): builds of the real-weights preset `smol-llava-1.5` (SmolLM2-135M),
# made once per session on first use, without engines (4-6 minutes each on 2 cores: the exports of a
# 30-layer LLM dominate). They show that the default parity gates pass on real activation scales.
REAL_BUILDS = {
    "smol-l": ("l", 0.5, "fp32"),
    "smol-l-fp16": ("l", 0.5, "fp16"),
}


def _export(args: list[str], out: Path) -> Path:
    """`python -m export.build ARGS --out OUT` in-process; fails the test with the build's output."""
    import contextlib
    import io

    from export.build import main

    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = main([*args, "--out", str(out)])
    assert code == 0, f"export.build {' '.join(args)} failed:\n{log.getvalue()[-3000:]}"
    return out


def _builds(tmp_path_factory, arguments) -> Callable[[str], Path]:
    """name -> build directory, exported with `arguments(name)` on first use and shared for the session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = _export(arguments(name), tmp_path_factory.mktemp("builds") / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory, preset_dirs):
    """build_dir(name) -> the directory of BUILDS[name], made through `python -m export.build` on first use."""

    def arguments(name: str) -> list[str]:
        preset, variant, ratio = BUILDS[name]
        return ["--model", str(preset_dirs[preset]), "--variant", variant, "--ratio", str(ratio),
                "--backend", "tensorrt-rtx" if rtx_installed() else "none"]

    return _builds(tmp_path_factory, arguments)


@pytest.fixture(scope="session")
def quant_build_dir(tmp_path_factory, preset_dirs):
    """quant_build_dir(name) -> the directory of QUANT_BUILDS[name], with engines when TensorRT-RTX is installed."""

    def arguments(name: str) -> list[str]:
        preset, variant, ratio, extra = QUANT_BUILDS[name]
        return ["--model", str(preset_dirs[preset]), "--variant", variant, "--ratio", str(ratio), *extra,
                "--backend", "tensorrt-rtx" if rtx_installed() else "none"]

    return _builds(tmp_path_factory, arguments)


@pytest.fixture(scope="session")
def real_build_dir(tmp_path_factory, smol_dir):
    """real_build_dir(name) -> the directory of REAL_BUILDS[name] (`--model smol-llava-1.5`), made on first use."""

    def arguments(name: str) -> list[str]:
        variant, ratio, precision = REAL_BUILDS[name]
        return ["--model", "smol-llava-1.5", "--variant", variant, "--ratio", str(ratio),
                "--precision", precision, "--backend", "none"]

    return _builds(tmp_path_factory, arguments)
