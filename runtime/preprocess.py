"""Image preprocessing for LLaVA-1.5 and LLaVA-NeXT, identical to Hugging Face's PIL-backend processors.

numpy + pillow only (no torch, no transformers). Mirrors transformers 5.23's ``CLIPImageProcessorPil``,
``LlavaImageProcessorPil`` and ``LlavaNextImageProcessorPil`` step by step:

* input: a file path goes through ``load_image`` = HF ``image_utils.load_image``: EXIF orientation is
  applied (``ImageOps.exif_transpose``) and the image is ``convert("RGB")``-ed (alpha is dropped, not
  composited). A PIL image handed over directly gets no EXIF transpose; with ``do_convert_rgb`` images
  with an alpha band or a ``transparency`` entry are composited onto white, others ``convert("RGB")``.
* LLaVA-1.5: [pad to a centred square filled with ``int(255 * mean)`` -- only ``LlavaImageProcessor`` with
  ``do_pad``; llava-hf's checkpoints use ``CLIPImageProcessor``, which never pads], resize with PIL
  (shortest edge to ``size``, long edge ``int(size * long / short)``, or to an exact height/width), centre
  crop (offset ``(in - out) // 2``), rescale in float64 then cast to float32, normalise in float32.
* LLaVA-NeXT (anyres): best pinpoint, aspect-preserving PIL resize (``ceil`` on the short side), zero
  padding (uint8 0, centred, extra pixel after), row-major crops of ``crop_size``; the whole image is first
  resized (squashed) to ``size`` x ``size`` and put in front; every crop then goes through the LLaVA-1.5 steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[Image.Image, str, "os.PathLike[str]"]
_KNOWN_TYPES = ("CLIPImageProcessor", "LlavaImageProcessor", "LlavaNextImageProcessor")
_REQUIRED_KEYS = ("size", "crop_size", "image_mean", "image_std")


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, not an image, or too small."""


def _size_dict(value: Any, key: str, square_int: bool) -> dict[str, int]:
    """HF ``get_size_dict``: an int is a square (``square_int``) or a shortest edge; a pair is (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square_int else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        return dict(value)
    raise ValueError(f"{key} must be {{'shortest_edge'}} or {{'height', 'width'}} (or an int), got {value!r}")


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{key} must have 3 values (RGB), got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class PreprocessConfig:
    """HF image-processor settings; build with :meth:`from_dict` from ``image_processor.to_dict()``."""

    processor_type: str = "CLIPImageProcessor"
    do_resize: bool = True
    shortest_edge: int | None = 336  # size={"shortest_edge": n}; exclusive with size_hw
    size_hw: tuple[int, int] | None = None  # size={"height": h, "width": w}
    resample: int = 3  # PIL code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
    do_center_crop: bool = True
    crop_hw: tuple[int, int] = (336, 336)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True
    do_pad: bool = False
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.processor_type not in _KNOWN_TYPES:
            raise ValueError(f"image_processor_type {self.processor_type!r} not one of {_KNOWN_TYPES}")
        if (self.shortest_edge is None) == (self.size_hw is None):
            raise ValueError("exactly one of shortest_edge and size_hw must be set")
        sizes = [*(self.size_hw or (self.shortest_edge,)), *self.crop_hw]
        sizes += [side for point in self.image_grid_pinpoints for side in point]
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be positive ints: size/crop/pinpoints {sizes}")
        if self.resample not in range(6):
            raise ValueError(f"resample must be a PIL filter code 0..5, got {self.resample!r}")
        if not self.rescale_factor > 0 or min(self.image_std) <= 0:
            raise ValueError(f"rescale_factor and image_std must be > 0: {self.rescale_factor}, {self.image_std}")
        patch = self.patch_size
        for point in self.image_grid_pinpoints:
            if len(point) != 2 or point[0] % patch or point[1] % patch:
                raise ValueError(f"pinpoint {point} is not (height, width) multiples of the crop size {patch}")
        if (self.processor_type == "LlavaNextImageProcessor") != bool(self.image_grid_pinpoints):
            raise ValueError("image_grid_pinpoints are required exactly for LlavaNextImageProcessor")

    @property
    def patch_size(self) -> int:
        """Side of one anyres crop: HF takes crop_size's height (always set here)."""
        return self.crop_hw[0]

    @property
    def pad_to_square(self) -> bool:
        """Only ``LlavaImageProcessor`` pads to a square; CLIP's ``do_pad`` pads a batch (no-op for one image)."""
        return self.do_pad and self.processor_type == "LlavaImageProcessor"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Read an HF image-processor dict; size, crop_size, image_mean and image_std are required."""
        missing = [key for key in _REQUIRED_KEYS if key not in d]
        if missing:
            raise ValueError(f"preprocessing config lacks {missing}")
        pinpoints = tuple(tuple(int(v) for v in p) for p in d.get("image_grid_pinpoints") or ())
        kind = str(d.get("image_processor_type") or "").removesuffix("Pil").removesuffix("Fast")
        kind = kind or ("LlavaNextImageProcessor" if pinpoints else "CLIPImageProcessor")
        size = _size_dict(d["size"], "size", square_int=False)
        crop = _size_dict(d["crop_size"], "crop_size", square_int=True)
        if "height" not in crop:
            raise ValueError(f"crop_size must have height and width, got {d['crop_size']!r}")
        flag = {k: bool(d[k]) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize",
                                        "do_convert_rgb", "do_pad") if d.get(k) is not None}
        return cls(
            processor_type=kind,
            shortest_edge=size.get("shortest_edge"),
            size_hw=(size["height"], size["width"]) if "height" in size else None,
            resample=int(d["resample"]) if d.get("resample") is not None else 3,
            crop_hw=(crop["height"], crop["width"]),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            image_mean=_triple(d["image_mean"], "image_mean"),
            image_std=_triple(d["image_std"], "image_std"),
            image_grid_pinpoints=pinpoints,
            **{"do_pad": kind == "LlavaNextImageProcessor", **flag},
        )


@dataclass(frozen=True, eq=False)
class Pixels:
    """Model input: pixel_values [crops, 3, H, W] float32, original (height, width), anyres (rows, cols) or None."""

    pixel_values: np.ndarray
    image_size: tuple[int, int]
    grid: tuple[int, int] | None


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and ``convert("RGB")`` -- HF ``load_image`` for a file."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        reason = "is a directory, not an image file" if os.path.isdir(name) else "no such image file"
        raise ImageError(f"{name}: {reason}")
    try:
        with Image.open(name) as probe:
            probe.verify()
        with Image.open(name) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{name}: cannot read image: {reason}") from None


def _as_rgb_array(image: ImageInput, config: PreprocessConfig) -> np.ndarray:
    """HF ``convert_to_rgb`` (alpha composited onto white) -> uint8 [H, W, 3]."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image size {width}x{height} is too small")
    try:
        if not config.do_convert_rgb:
            array = np.asarray(image)
        elif "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            array = np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
        else:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ImageError(f"image {width}x{height}: cannot decode: {error}") from None
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"image mode {image.mode!r} is not 8-bit RGB; enable do_convert_rgb")
    return array


def _resize(array: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resize of uint8 [H, W, 3] to [h, w, 3] (a same-size resize is a copy in PIL)."""
    return np.asarray(Image.fromarray(array).resize((size_hw[1], size_hw[0]), resample=resample))


def _resize_size(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """HF ``get_resize_output_image_size`` with ``default_to_square=False``: (new_h, new_w)."""
    if config.size_hw is not None:
        return config.size_hw
    edge = config.shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """HF ``center_crop`` on [H, W, C]: offset (in - out) // 2, zero padding when the image is smaller."""
    height, width = array.shape[:2]
    top, left = (height - crop_hw[0]) // 2, (width - crop_hw[1]) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_hw[0], left : left + crop_hw[1]]
    new_h, new_w = max(crop_hw[0], height), max(crop_hw[1], width)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + crop_hw[0]), max(0, left) : min(new_w, left + crop_hw[1])]


def _square_pad(array: np.ndarray, mean: tuple[float, float, float]) -> np.ndarray:
    """``LlavaImageProcessor.pad_to_square``: centred on a square of colour ``int(255 * mean)``."""
    height, width = array.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=array.dtype)
    canvas[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = array
    return canvas


def _finish(array: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Resize, centre-crop, rescale, normalise one uint8 [H, W, 3] -> float32 [3, h, w]."""
    if config.do_resize:
        new_h, new_w = _resize_size(*array.shape[:2], config)
        if Image.MAX_IMAGE_PIXELS and new_h * new_w > Image.MAX_IMAGE_PIXELS:  # HF would try; we refuse
            shape = f"{array.shape[1]}x{array.shape[0]}"
            raise ImageError(f"image size {shape} is too thin: resizing gives {new_w}x{new_h} pixels")
        array = _resize(array, (new_h, new_w), config.resample)
    if config.do_center_crop:
        array = _center_crop(array, config.crop_hw)
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    if config.do_rescale:
        chw = (chw.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        chw = chw if np.issubdtype(chw.dtype, np.floating) else chw.astype(np.float32)
        mean = np.array(config.image_mean, dtype=chw.dtype)[:, None, None]
        std = np.array(config.image_std, dtype=chw.dtype)[:, None, None]
        chw = (chw - mean) / std
    return chw.astype(np.float32, copy=False)


def preprocess_llava(image: ImageInput, config: PreprocessConfig) -> np.ndarray:
    """LLaVA-1.5 pixels: PIL image or path -> float32 [1, 3, crop_h, crop_w] ([1, 3, 336, 336])."""
    array = _as_rgb_array(image, config)
    if config.pad_to_square:
        array = _square_pad(array, config.image_mean)
    return _finish(array, config)[None]


def select_best_resolution(size_hw: tuple[int, int], pinpoints: Any) -> tuple[int, int]:
    """HF ``select_best_resolution``: the (height, width) pinpoint keeping most pixels, then wasting least."""
    height, width = size_hw
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def anyres_grid(size_hw: tuple[int, int], pinpoints: Any, patch: int = 336) -> tuple[int, int]:
    """(rows, cols) of the high-resolution crops; crops = 1 + rows * cols."""
    best_h, best_w = select_best_resolution(size_hw, pinpoints)
    return best_h // patch, best_w // patch


def _fit_size(height: int, width: int, target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF ``get_patch_output_size``: aspect-preserving (h, w) inside target_hw, ceil on the short side."""
    scale_w, scale_h = target_hw[1] / width, target_hw[0] / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_hw[0]), target_hw[1]
    return target_hw[0], min(math.ceil(width * scale_h), target_hw[1])


def _anyres_crops(array: np.ndarray, config: PreprocessConfig) -> list[np.ndarray]:
    """uint8 [H, W, 3] -> [base squashed to size, row-major crops of the padded best resolution], uint8."""
    target = select_best_resolution(array.shape[:2], config.image_grid_pinpoints)
    resized = _resize(array, _fit_size(*array.shape[:2], target), config.resample)
    new_h, new_w = _fit_size(*resized.shape[:2], target)
    pad_y, pad_x = divmod(target[0] - new_h, 2), divmod(target[1] - new_w, 2)
    padding = ((pad_y[0], pad_y[0] + pad_y[1]), (pad_x[0], pad_x[0] + pad_x[1]), (0, 0))
    padded = np.pad(resized, padding, mode="constant", constant_values=0)
    step = config.patch_size
    crops = [padded[i : i + step, j : j + step] for i in range(0, target[0], step) for j in range(0, target[1], step)]
    base_hw = config.size_hw or (config.shortest_edge, config.shortest_edge)
    return [_resize(array, base_hw, config.resample), *crops]


def preprocess_llava_next(image: ImageInput, config: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA-NeXT pixels: -> (float32 [1 + rows * cols, 3, 336, 336], original (height, width))."""
    if not config.image_grid_pinpoints:
        raise ValueError("LLaVA-NeXT preprocessing needs image_grid_pinpoints in the config")
    array = _as_rgb_array(image, config)
    pixels = np.stack([_finish(crop, config) for crop in _anyres_crops(array, config)])
    return pixels, (int(array.shape[0]), int(array.shape[1]))


def preprocess(image: ImageInput, config: PreprocessConfig, architecture: str) -> Pixels:
    """Dispatch on ``architecture`` ("llava" or "llava_next"); grid is None for LLaVA-1.5."""
    if architecture not in ("llava", "llava_next"):
        raise ValueError(f"unknown architecture {architecture!r}; expected 'llava' or 'llava_next'")
    if not isinstance(image, Image.Image):
        image = load_image(image)
    if architecture == "llava":
        return Pixels(preprocess_llava(image, config), (image.size[1], image.size[0]), None)
    pixel_values, size_hw = preprocess_llava_next(image, config)
    return Pixels(pixel_values, size_hw, anyres_grid(size_hw, config.image_grid_pinpoints, config.patch_size))
