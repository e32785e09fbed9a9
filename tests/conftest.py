"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def preset_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every preset in ``ficoco.presets.PRESETS`` built once per session: {name: checkpoint dir}."""
    from ficoco.presets import PRESETS, build_preset

    root = tmp_path_factory.mktemp("presets")
    return {name: build_preset(name, root / name) for name in PRESETS}


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-weights preset ``smol-llava-1.5`` built once per session (about 40 s, 0.54 GB)."""
    from ficoco.presets import build_preset

    return build_preset("smol-llava-1.5", tmp_path_factory.mktemp("presets") / "smol-llava-1.5")


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
    from ficoco.presets import load

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


def rtx_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx_bindings") is not None


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory, preset_dirs):
    """build_dir(name) -> the directory of BUILDS[name], made through `python -m export.build` on first use."""
    import contextlib
    import io

    from export.build import main

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            preset, variant, ratio = BUILDS[name]
            out = tmp_path_factory.mktemp("builds") / name
            args = ["--model", str(preset_dirs[preset]), "--variant", variant, "--ratio", str(ratio),
                    "--backend", "tensorrt-rtx" if rtx_installed() else "none", "--out", str(out)]
            with contextlib.redirect_stdout(io.StringIO()) as log:
                code = main(args)
            assert code == 0, f"export.build {' '.join(args)} failed:\n{log.getvalue()[-3000:]}"
            made[name] = out
        return made[name]

    return get
