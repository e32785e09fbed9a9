"""runtime.preprocess against Hugging Face's image processors, both backends.

* backend "pil" against the PIL-backend processors (``CLIPImageProcessorPil``, ...): bit-exact;
* backend "torchvision" against the torchvision processors (``CLIPImageProcessor``, ...), which run in a
  subprocess (``tests/torchvision_shim.py``; skipped when ``.tv`` holds no torchvision): max abs diff <= 1e-6.

The HF processors are built here with the settings of ``ficoco.models.presets._processor`` (no preset build needed).
"""

from __future__ import annotations

import contextlib
import json
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
    PreprocessConfigError,
    anyres_grid,
    load_image,
    preprocess,
    preprocess_llava,
    preprocess_llava_next,
    select_best_resolution,
)

TOL = 0.0  # backend "pil" against HF's PIL processors: bit-exact
TV_TOL = 0.0  # backend "torchvision" against HF's torchvision processors: bit-exact too (issue 8 asks <= 1e-6;
# exactness also pins the float32 order of the fused rescale + normalise, which is ~1e-7 from PIL's order)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
KINDS = ("clip", "llava_pad", "llava_next")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")  # the LLaVA-NeXT set
PHOTOS_15 = PHOTOS + ("hubble_deep_field", "immunohistochemistry", "retina")  # the LLaVA-1.5 set
# (kind, photo): LLaVA-1.5 geometry on 8 photos; LLaVA-NeXT on 5, with every pinpoint and with the one 2x2
# pinpoint that export.build pins (fix_grid, --grid 2x2)
PHOTO_CASES = [(k, n) for k in ("clip", "llava_pad") for n in PHOTOS_15] + \
              [(k, n) for k in ("llava_next", "next_2x2") for n in PHOTOS]
KWARGS: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 336}, resample=3,
    do_center_crop=True, crop_size={"height": 336, "width": 336},
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
)
# kind -> (HF class without the "Pil" suffix, extra kwargs); "Pil" classes for backend "pil"
PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "clip": ("CLIPImageProcessor", {}),
    "llava_pad": ("LlavaImageProcessor", {"do_pad": True}),
    "llava_next": ("LlavaNextImageProcessor", {"image_grid_pinpoints": PINPOINTS, "do_pad": True}),
    "next_2x2": ("LlavaNextImageProcessor", {"image_grid_pinpoints": [[672, 672]], "do_pad": True}),
}
# torchvision stress cases only: without a resize, small images reach the centre crop, which pads them (the
# odd pixel goes after the image in torchvision, before it in PIL)
TV_STRESS_KINDS = (*PROCESSORS, "crop_only")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf() -> dict[str, Any]:
    """{kind: HF PIL image processor}: CLIP (llava-hf LLaVA-1.5), Llava with do_pad, LLaVA-NeXT, NeXT 2x2."""
    import transformers

    return {kind: getattr(transformers, name + "Pil")(**KWARGS, **extra) for kind, (name, extra) in PROCESSORS.items()}


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


@pytest.mark.parametrize(("kind", "name"), PHOTO_CASES)
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


# --- backend "torchvision": HF's torchvision processors, run in a subprocess by tests/torchvision_shim.py ---


def tv_cases(root: Path) -> dict[str, dict[str, Any]]:
    """{case: {kind, image (HF's input), how, ours (the runtime's input)}} for every torchvision comparison."""
    cases = {f"{k}-{n}": {"kind": k, "image": photo(n)} for k, n in PHOTO_CASES}
    cases |= {f"{k}-{n}": {"kind": k, "image": stress_image(n)} for k in TV_STRESS_KINDS for n in STRESS}
    for size_hw in ((400, 800), (800, 400), (700, 700), (1000, 300), (300, 1000)):
        name = f"llava_next-pinpoint-{size_hw[0]}x{size_hw[1]}"
        cases[name] = {"kind": "llava_next", "image": Image.fromarray(noise(*size_hw, seed=sum(size_hw)))}
    rotated, alpha = root / "rotated.jpg", root / "alpha.png"
    write_exif_jpeg(rotated)
    stress_image("rgba").save(alpha)
    for kind in PROCESSORS:
        # a path: HF's load_image on both sides; a PIL image handed over directly: no EXIF transpose on either
        cases[f"{kind}-exif-path"] = {"kind": kind, "image": rotated, "how": "load_image", "ours": rotated}
        cases[f"{kind}-exif-raw"] = {"kind": kind, "image": rotated, "ours": "raw"}
        cases[f"{kind}-rgba-path"] = {"kind": kind, "image": alpha, "how": "load_image", "ours": alpha}
    return cases


@pytest.fixture(scope="module")
def tv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HF torchvision outputs for tv_cases, and this process's torchvision state before and after."""
    from tests import torchvision_shim

    torchvision_shim.require()
    state = ("torchvision" in sys.modules, list(sys.path))
    root = tmp_path_factory.mktemp("torchvision")
    cases = tv_cases(root)
    processors = {kind: {"class": name, "kwargs": {**KWARGS, **extra}} for kind, (name, extra) in PROCESSORS.items()}
    processors["crop_only"] = {"class": "CLIPImageProcessor", "kwargs": {**KWARGS, "do_resize": False}}
    ref = torchvision_shim.hf_torchvision(processors, cases, root / "work")
    return {"cases": cases, "ref": ref, "state": (state, ("torchvision" in sys.modules, list(sys.path)))}


def tv_config(tv: dict[str, Any], kind: str, backend: str | None = None) -> PreprocessConfig:
    """The config a build exported with the torchvision processor records (optionally another backend)."""
    manifest = tv["ref"]["_meta"]["manifest"][kind]
    return PreprocessConfig.from_dict(manifest if backend is None else {**manifest, "backend": backend})


def tv_diff(tv: dict[str, Any], case: str, backend: str | None = None) -> float:
    """Max abs difference between the runtime (config from the torchvision processor's manifest) and HF."""
    entry, ref = tv["cases"][case], tv["ref"][case]
    config = tv_config(tv, entry["kind"], backend)
    ours = entry.get("ours", entry["image"])
    with contextlib.ExitStack() as stack:
        if ours == "raw":
            ours = stack.enter_context(Image.open(entry["image"]))
        if config.image_grid_pinpoints:
            got, size_hw = preprocess_llava_next(ours, config)
            assert size_hw == ref["image_sizes"]
        else:
            got = preprocess_llava(ours, config)[0]
    expected = ref["pixel_values"]
    assert got.dtype == np.float32 and got.shape == expected.shape
    return float(np.abs(got - expected).max())


def check_tv(tv: dict[str, Any], case: str, backend: str | None = None) -> None:
    diff = tv_diff(tv, case, backend)
    assert diff <= TV_TOL, f"{case}: max abs diff {diff}"


def test_torchvision_reference_is_the_torchvision_processor(tv: dict[str, Any]) -> None:
    meta = tv["ref"]["_meta"]
    assert Path(meta["torchvision_file"]).resolve().is_relative_to((REPO / ".tv").resolve())
    classes = {kind: name for kind, (name, _) in PROCESSORS.items()}
    assert meta["classes"] == {**classes, "crop_only": "CLIPImageProcessor"}
    assert {m["backend"] for m in meta["manifest"].values()} == {"torchvision"}
    assert {tv_config(tv, kind).backend for kind in TV_STRESS_KINDS} == {"torchvision"}


@pytest.mark.parametrize(("kind", "name"), PHOTO_CASES)
def test_torchvision_photographs(tv: dict[str, Any], kind: str, name: str) -> None:
    check_tv(tv, f"{kind}-{name}")


@pytest.mark.parametrize(("kind", "name"), [c for c in PHOTO_CASES if c[0] in ("clip", "next_2x2")])
def test_pil_backend_fails_the_torchvision_comparison(tv: dict[str, Any], kind: str, name: str) -> None:
    # The PIL resize is up to 2/255 away from torch's on every photograph: the comparison above sees it.
    with pytest.raises(AssertionError, match="max abs diff"):
        check_tv(tv, f"{kind}-{name}", backend="pil")
    assert tv_diff(tv, f"{kind}-{name}", backend="pil") >= 0.99 / 255 / max(CLIP_STD)  # a whole uint8 level


@pytest.mark.parametrize("kind", TV_STRESS_KINDS)
@pytest.mark.parametrize("name", STRESS)
def test_torchvision_stress(tv: dict[str, Any], kind: str, name: str) -> None:
    check_tv(tv, f"{kind}-{name}")


@pytest.mark.parametrize("kind", PROCESSORS)
@pytest.mark.parametrize("name", ["exif-path", "exif-raw", "rgba-path"])
def test_torchvision_files(tv: dict[str, Any], kind: str, name: str) -> None:
    check_tv(tv, f"{kind}-{name}")


@pytest.mark.parametrize("size", ["400x800", "800x400", "700x700", "1000x300", "300x1000"])
def test_torchvision_each_pinpoint(tv: dict[str, Any], size: str) -> None:
    check_tv(tv, f"llava_next-pinpoint-{size}")


def test_torchvision_stays_in_its_subprocess(tv: dict[str, Any], tmp_path: Path) -> None:
    """Running the torchvision processors changed nothing here: AutoImageProcessor still picks the PIL class."""
    import importlib.util

    from transformers import AutoImageProcessor, CLIPImageProcessorPil

    before, after = tv["state"]
    assert before == after and str(REPO / ".tv") not in sys.path
    if importlib.util.find_spec("torchvision") is None:  # the project's environment: torchvision only in .tv
        CLIPImageProcessorPil(**KWARGS).save_pretrained(tmp_path)
        assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__ == "CLIPImageProcessorPil"


def test_tv_resize_equals_torch_interpolate() -> None:
    """The numpy kernel against torch's uint8 antialiased interpolate directly, on random sizes both ways."""
    torch = pytest.importorskip("torch")
    from runtime.preprocess import _tv_resize

    rng = np.random.default_rng(11)
    sizes = [tuple(int(v) for v in rng.integers(1, 600, 4)) for _ in range(40)]
    sizes += [(1, 1, 336, 336), (7, 5, 470, 336), (50, 2000, 336, 13440), (1411, 1411, 336, 336), (5, 900, 5, 3)]
    # An output 1 pixel wide: torch's AVX2 kernel agrees (and asserts on 1x1), its generic uint8 kernel does not.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        sizes += [(3000, 1, 1008, 1), (100, 50, 60, 1)]
    for index, (h, w, out_h, out_w) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for mode, code in (("bicubic", 3), ("bilinear", 2)) if index % 2 else (("bicubic", 3),):
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()[None]
            ref = torch.nn.functional.interpolate(tensor, size=(out_h, out_w), mode=mode, antialias=True)
            assert np.array_equal(_tv_resize(image, (out_h, out_w), code), ref[0].permute(1, 2, 0).numpy()), \
                (mode, (h, w), (out_h, out_w))


def test_backend_from_dict(hf: dict[str, Any]) -> None:
    d = hf["clip"].to_dict()
    assert "backend" not in d and PreprocessConfig.from_dict(d).backend == "pil"  # builds before the field
    assert PreprocessConfig.from_dict({**d, "backend": "torchvision"}).backend == "torchvision"
    with pytest.raises(PreprocessConfigError, match="'opencv'"):
        PreprocessConfig.from_dict({**d, "backend": "opencv"})
    with pytest.raises(PreprocessConfigError, match="resample 0"):
        PreprocessConfig.from_dict({**d, "backend": "torchvision", "resample": 0})


def test_build_records_its_processor_backend(build_dir: Any, tiny: dict[str, Any]) -> None:
    manifest = json.loads((build_dir("1.5-v") / "manifest.json").read_text())
    backend = tiny["tiny-llava-1.5"][1].image_processor.backend  # loaded by AutoProcessor, as the export does
    assert manifest["preprocess"]["backend"] == backend
    assert PreprocessConfig.from_dict(manifest["preprocess"]).backend == backend
