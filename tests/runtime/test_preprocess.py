"""runtime.preprocess against Hugging Face's PIL-backend image processors (max abs diff <= 1e-5).

The HF processors are built here with the settings of ``ficoco.presets._processor`` (no preset build needed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import (
    ImageError,
    Pixels,
    PreprocessConfig,
    anyres_grid,
    load_image,
    preprocess,
    preprocess_llava,
    preprocess_llava_next,
    select_best_resolution,
)

TOL = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
KINDS = ("clip", "llava_pad", "llava_next")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf() -> dict[str, Any]:
    """{kind: HF image processor}: CLIP (llava-hf LLaVA-1.5), Llava with do_pad (square + mean), LLaVA-NeXT."""
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil

    kwargs: dict[str, Any] = dict(
        do_resize=True, size={"shortest_edge": 336}, resample=3,
        do_center_crop=True, crop_size={"height": 336, "width": 336},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    return {
        "clip": CLIPImageProcessorPil(**kwargs),
        "llava_pad": LlavaImageProcessorPil(do_pad=True, **kwargs),
        "llava_next": LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, do_pad=True, **kwargs),
    }


def check_parity(processor: Any, ours_input: Any, hf_input: Any = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Run HF on ``hf_input`` (default: same as ours) and ours; assert shapes, sizes and values agree."""
    out = processor(images=ours_input if hf_input is None else hf_input, return_tensors="np")
    expected = out["pixel_values"][0]  # [3, 336, 336] or [crops, 3, 336, 336]
    config = PreprocessConfig.from_dict(processor.to_dict())
    if config.image_grid_pinpoints:
        got, size_hw = preprocess_llava_next(ours_input, config)
        assert tuple(int(v) for v in out["image_sizes"][0]) == size_hw
    else:
        batch = preprocess_llava(ours_input, config)
        assert batch.shape[0] == 1
        got, size_hw = batch[0], (-1, -1)
    assert got.dtype == np.float32 and got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    assert diff <= TOL, f"max abs diff {diff}"
    return got, size_hw


def photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) is needed for the photographs")
    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(array)


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def stress_image(name: str) -> Image.Image:
    """Constructed edge cases: extreme aspect ratios, tiny, and every colour mode HF converts."""
    if name == "wide":
        return Image.fromarray(noise(50, 2000))
    if name == "tall":
        return Image.fromarray(noise(2000, 50, seed=1))
    if name == "tiny":
        return Image.fromarray(noise(7, 5, seed=2))
    if name == "one_pixel_line":
        return Image.fromarray(noise(1, 400, seed=3))
    if name == "gray_L":
        return photo_or_noise().convert("L")
    if name == "rgba":
        rgba = np.dstack([np.asarray(photo_or_noise()), noise(*photo_or_noise().size[::-1], channels=1)])
        return Image.fromarray(rgba, "RGBA")
    if name == "palette_P":
        return photo_or_noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if name == "palette_transparency":
        image = photo_or_noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image
    if name == "gray_alpha_LA":
        return Image.fromarray(noise(120, 90, channels=2, seed=4), "LA")
    raise KeyError(name)


def photo_or_noise() -> Image.Image:
    return Image.fromarray(noise(240, 320, seed=5))


STRESS = ("wide", "tall", "tiny", "one_pixel_line", "gray_L", "rgba", "palette_P", "palette_transparency",
          "gray_alpha_LA")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PHOTOS)
def test_parity_photographs(hf: dict[str, Any], kind: str, name: str) -> None:
    check_parity(hf[kind], photo(name))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", STRESS)
def test_parity_stress(hf: dict[str, Any], kind: str, name: str) -> None:
    check_parity(hf[kind], stress_image(name))


def write_exif_jpeg(path: Path, orientation: int = 6) -> Image.Image:
    """A 200x120 (WxH) JPEG whose EXIF says 'rotate 90 CW to display'."""
    image = Image.fromarray(noise(120, 200, seed=6))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return image


@pytest.mark.parametrize("kind", KINDS)
def test_exif_rotated_jpeg(hf: dict[str, Any], kind: str, tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    write_exif_jpeg(path)
    # A path goes through HF's load_image: EXIF transpose, so the picture is upright (portrait).
    assert load_image(path).size == (120, 200)
    _, size_hw = check_parity(hf[kind], path, hf_input=str(path))
    if kind == "llava_next":
        assert size_hw == (200, 120)
    # A PIL image handed over directly gets no EXIF transpose, in HF as here.
    with Image.open(path) as raw:
        _, size_hw = check_parity(hf[kind], raw)
    if kind == "llava_next":
        assert size_hw == (120, 200)


@pytest.mark.parametrize("kind", KINDS)
def test_rgba_png_file_drops_alpha_like_hf(hf: dict[str, Any], kind: str, tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    stress_image("rgba").save(path)
    assert load_image(path).mode == "RGB"
    check_parity(hf[kind], path, hf_input=str(path))


@pytest.mark.parametrize(
    ("size_hw", "best"),
    [((400, 800), (336, 672)), ((800, 400), (672, 336)), ((700, 700), (672, 672)),
     ((1000, 300), (1008, 336)), ((300, 1000), (336, 1008))],
)
def test_each_pinpoint(hf: dict[str, Any], size_hw: tuple[int, int], best: tuple[int, int]) -> None:
    assert select_best_resolution(size_hw, PINPOINTS) == best
    rows, cols = anyres_grid(size_hw, PINPOINTS)
    assert (rows, cols) == (best[0] // 336, best[1] // 336)
    image = Image.fromarray(noise(*size_hw, seed=sum(size_hw)))
    pixels, got_size = check_parity(hf["llava_next"], image)
    assert pixels.shape == (1 + rows * cols, 3, 336, 336) and got_size == size_hw


def test_select_best_resolution_matches_hf() -> None:
    from transformers.image_processing_utils import select_best_resolution as hf_select

    rng = np.random.default_rng(7)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(400)]
    sizes += [(1, 1), (1, 10000), (10000, 1), (336, 336), (672, 1344), (5, 7)]
    for size_hw in sizes:
        assert select_best_resolution(size_hw, PINPOINTS) == tuple(hf_select(size_hw, PINPOINTS)), size_hw


def test_dispatcher(hf: dict[str, Any], tmp_path: Path) -> None:
    image = Image.fromarray(noise(300, 1000, seed=8))
    llava = preprocess(image, PreprocessConfig.from_dict(hf["clip"].to_dict()), "llava")
    assert isinstance(llava, Pixels) and llava.pixel_values.shape == (1, 3, 336, 336)
    assert llava.image_size == (300, 1000) and llava.grid is None
    next_config = PreprocessConfig.from_dict(hf["llava_next"].to_dict())
    nxt = preprocess(image, next_config, "llava_next")
    assert nxt.pixel_values.shape == (4, 3, 336, 336) and nxt.image_size == (300, 1000) and nxt.grid == (1, 3)
    path = tmp_path / "photo.png"
    image.save(path)
    assert np.array_equal(preprocess(path, next_config, "llava_next").pixel_values, nxt.pixel_values)
    with pytest.raises(ValueError, match="architecture"):
        preprocess(image, next_config, "llava-2")


def test_config_from_dict_and_validation(hf: dict[str, Any]) -> None:
    clip = PreprocessConfig.from_dict(hf["clip"].to_dict())
    assert (clip.shortest_edge, clip.crop_hw, clip.resample, clip.pad_to_square) == (336, (336, 336), 3, False)
    assert PreprocessConfig.from_dict(hf["llava_pad"].to_dict()).pad_to_square
    legacy = PreprocessConfig.from_dict({**hf["clip"].to_dict(), "size": 336, "crop_size": 336})
    assert legacy == clip
    with pytest.raises(Exception):
        clip.do_resize = False  # type: ignore[misc]
    base = hf["llava_next"].to_dict()
    bad = [
        {k: v for k, v in base.items() if k != "crop_size"},
        {**base, "resample": 9},
        {**base, "image_grid_pinpoints": [[336, 500]]},
        {**base, "image_std": [0.2, 0.0, 0.2]},
        {**base, "image_mean": [0.5, 0.5]},
        {**base, "size": {"longest_edge": 336}},
        {**base, "image_processor_type": "SiglipImageProcessor"},
        {**base, "image_processor_type": "CLIPImageProcessor"},  # pinpoints without LLaVA-NeXT
    ]
    for d in bad:
        with pytest.raises(ValueError):
            PreprocessConfig.from_dict(d)


def test_import_does_not_pull_torch_or_transformers() -> None:
    code = "import sys, runtime.preprocess; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        write_exif_jpeg(tmp_path / "whole.jpg")
        data = (tmp_path / "whole.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": never created


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "empty", "directory"])
def test_bad_input_raises_image_error(kind: str, tmp_path: Path) -> None:
    path = bad_file(kind, tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(ImageError):
        preprocess(str(path), PreprocessConfig(), "llava")


def test_too_small_or_too_thin_raises_image_error() -> None:
    with pytest.raises(ImageError, match="0x5"):
        preprocess(Image.new("RGB", (0, 5)), PreprocessConfig(), "llava")
    # A 1-pixel-high line 400000 wide would need a 134400000x336 intermediate for shortest-edge 336.
    with pytest.raises(ImageError, match="400000x1"):
        preprocess_llava(Image.new("RGB", (400000, 1)), PreprocessConfig())
