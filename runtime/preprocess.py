"""Image preprocessing for LLaVA-1.5 and LLaVA-NeXT, identical to Hugging Face's image processors.

numpy + pillow only (no torch, no transformers). Two backends, as recorded in the build (``backend`` in the
manifest's ``preprocess``; absent means ``"pil"``):

* ``"pil"`` mirrors transformers 5.23's ``CLIPImageProcessorPil``, ``LlavaImageProcessorPil`` and
  ``LlavaNextImageProcessorPil`` (the list below);
* ``"torchvision"`` mirrors their torchvision counterparts ``CLIPImageProcessor``, ``LlavaImageProcessor`` and
  ``LlavaNextImageProcessor`` (what ``AutoProcessor`` picks when torchvision is installed). The steps are the
  same except three: the resize is torch's CPU uint8 antialiased kernel (see :func:`_tv_resize`), the centre
  crop pads its extra pixel after the image, not before, and rescale + normalise are fused in float32.

The PIL backend, step by step:

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
BACKENDS = ("pil", "torchvision")


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, not an image, or too small."""


class PreprocessConfigError(ValueError):
    """Preprocessing settings that cannot be used: missing keys, bad sizes, an unknown backend or filter."""


def _size_dict(value: Any, key: str, square_int: bool) -> dict[str, int]:
    """HF ``get_size_dict``: an int is a square (``square_int``) or a shortest edge; a pair is (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square_int else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        return dict(value)
    shapes = "{'shortest_edge'} or {'height', 'width'} (or an int)"
    raise PreprocessConfigError(f"{key} must be {shapes}, got {value!r}")


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise PreprocessConfigError(f"{key} must have 3 values (RGB), got {value!r}")
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
    backend: str = "pil"  # which HF processor family this equals: "pil" or "torchvision"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PreprocessConfigError(f"preprocess backend {self.backend!r} is not one of {BACKENDS}")
        if self.backend == "torchvision" and self.resample not in _TV_FILTERS:
            raise PreprocessConfigError(f"resample {self.resample!r} is not supported with the torchvision backend "
                                        f"(supported: {sorted(_TV_FILTERS)}: 2 bilinear, 3 bicubic)")
        if self.processor_type not in _KNOWN_TYPES:
            raise PreprocessConfigError(f"image_processor_type {self.processor_type!r} not one of {_KNOWN_TYPES}")
        if (self.shortest_edge is None) == (self.size_hw is None):
            raise PreprocessConfigError("exactly one of shortest_edge and size_hw must be set")
        sizes = [*(self.size_hw or (self.shortest_edge,)), *self.crop_hw]
        sizes += [side for point in self.image_grid_pinpoints for side in point]
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise PreprocessConfigError(f"sizes must be positive ints: size/crop/pinpoints {sizes}")
        if self.resample not in range(6):
            raise PreprocessConfigError(f"resample must be a PIL filter code 0..5, got {self.resample!r}")
        if not self.rescale_factor > 0 or min(self.image_std) <= 0:
            raise PreprocessConfigError(
                f"rescale_factor and image_std must be > 0: {self.rescale_factor}, {self.image_std}")
        patch = self.patch_size
        for point in self.image_grid_pinpoints:
            if len(point) != 2 or point[0] % patch or point[1] % patch:
                raise PreprocessConfigError(
                    f"pinpoint {point} is not (height, width) multiples of the crop size {patch}")
        if (self.processor_type == "LlavaNextImageProcessor") != bool(self.image_grid_pinpoints):
            raise PreprocessConfigError("image_grid_pinpoints are required exactly for LlavaNextImageProcessor")

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
            raise PreprocessConfigError(f"preprocessing config lacks {missing}")
        pinpoints = tuple(tuple(int(v) for v in p) for p in d.get("image_grid_pinpoints") or ())
        kind = str(d.get("image_processor_type") or "").removesuffix("Pil").removesuffix("Fast")
        kind = kind or ("LlavaNextImageProcessor" if pinpoints else "CLIPImageProcessor")
        size = _size_dict(d["size"], "size", square_int=False)
        crop = _size_dict(d["crop_size"], "crop_size", square_int=True)
        if "height" not in crop:
            raise PreprocessConfigError(f"crop_size must have height and width, got {d['crop_size']!r}")
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
            backend=d.get("backend", "pil"),
            **{"do_pad": kind == "LlavaNextImageProcessor", **flag},
        )


@dataclass(frozen=True, eq=False)
class Pixels:
    """Model input: pixel_values [crops, 3, H, W] float32, original (height, width), anyres (rows, cols) or None."""

    pixel_values: np.ndarray
    image_size: tuple[int, int]
    grid: tuple[int, int] | None


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and ``convert("RGB")`` -- HF ``load_image`` for a file.

    Images of more than ``max_pixels`` (width x height; default ``$FICOCO_MAX_IMAGE_PIXELS``, else 24
    megapixels: 6000x4000, about 70 MB as RGB and 0.4 GB of peak memory to decode and resize) are refused from their header, before anything is decoded: a small
    file can hold a huge image. Pillow's own bomb check (an error above about 179 megapixels) stays on."""
    import warnings

    name = os.fspath(path)
    if not os.path.isfile(name):
        reason = "is a directory, not an image file" if os.path.isdir(name) else "no such image file"
        raise ImageError(f"{name}: {reason}")
    if max_pixels is None:
        setting = os.environ.get("FICOCO_MAX_IMAGE_PIXELS", "24000000")
        if not setting.isdigit() or int(setting) < 1:
            raise ImageError(f"FICOCO_MAX_IMAGE_PIXELS must be a positive integer (pixels), got {setting!r}")
        max_pixels = int(setting)
    try:
        with warnings.catch_warnings():  # the cap below replaces Pillow's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(name) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageError(f"{name}: image {width}x{height} has {width * height / 1e6:.1f} megapixels, more than "
                                     f"this runtime's cap of {max_pixels / 1e6:g} (set FICOCO_MAX_IMAGE_PIXELS to change it)")
                probe.verify()
            with Image.open(name) as image:
                image.load()
                upright = ImageOps.exif_transpose(image)
                return upright.convert("RGB")
    except ImageError:
        raise
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


def _resize(array: np.ndarray, size_hw: tuple[int, int], config: PreprocessConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3] with the config's backend (a same-size resize is a copy in both)."""
    if config.backend == "torchvision":
        return _tv_resize(array, size_hw, config.resample)
    return np.asarray(Image.fromarray(array).resize((size_hw[1], size_hw[0]), resample=config.resample))


def _tv_filter_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5 (torch's ``HelperInterpCubic::aa_filter``, as PIL's), in float64."""
    x, a = np.abs(x), -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _tv_filter_linear(x: np.ndarray) -> np.ndarray:
    """Triangle filter (torch's ``HelperInterpLinear::aa_filter``)."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_TV_FILTERS = {2: (_tv_filter_linear, 2), 3: (_tv_filter_cubic, 4)}  # PIL code -> (filter, interp_size)


def _tv_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Taps of one axis: (first input index [out], int16-valued weights [out, taps], precision bits).

    torch ``HelperInterpBase::_compute_index_ranges_weights`` (antialias=True, align_corners=False, no scale
    factor) then ``_compute_index_ranges_int16_weights``: float64 weights normalised per output, scaled by
    2**precision with the largest precision (at most 22) whose largest weight still fits int16, rounded half
    away from zero.
    """
    filter_fn, interp_size = _TV_FILTERS[resample]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ int64 cast truncates, as astype
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps)
    weights = filter_fn(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale)
    weights = np.where(j[None, :] < xsize[:, None], weights, 0.0)
    total = np.zeros((out_size, 1))
    for tap in range(taps):  # summed in tap order, as the C++ loop does (numpy's sum may pair them up)
        total[:, 0] += weights[:, tap]
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    w_max = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return xmin, np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32), precision


def _tv_resize_rows(rows: np.ndarray, out_size: int, resample: int) -> np.ndarray:
    """One separable pass over axis 0 of uint8 [in, N]: int32 sums from half, >> precision, clamped to uint8."""
    in_size, width = rows.shape
    xmin, weights, precision = _tv_weights(in_size, out_size, resample)
    indices = [np.minimum(xmin + tap, in_size - 1) for tap in range(weights.shape[1])]  # past a window: weight 0
    out = np.empty((out_size, width), np.uint8)
    step = max(1, (1 << 22) // out_size)  # int32 work arrays of at most 16 MiB each
    for start in range(0, width, step):
        block = rows[:, start : start + step]
        acc = np.full((out_size, block.shape[1]), 1 << (precision - 1), np.int32)
        term = np.empty_like(acc)
        for tap, index in enumerate(indices):
            acc += np.multiply(block[index], weights[:, tap, None], out=term)
        out[:, start : start + step] = np.clip(np.right_shift(acc, precision, out=acc), 0, 255)
    return out


def _tv_resize(array: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    """torch ``interpolate(uint8, antialias=True)`` on CPU, as torchvision's ``resize`` runs it for uint8 images.

    Same arithmetic as torch's AVX2 kernel (``UpSampleKernelAVXAntialias.h``, from Pillow-SIMD) and its
    generic uint8 path (``UpSampleKernel.cpp``): horizontal pass first, rounded to uint8, then vertical; an
    axis whose size does not change is skipped. Pillow does the same with 22-bit weights, hence up to 2/255
    apart. Bilinear here is torchvision's native uint8 path (AVX2/AVX512/arm64 CPUs; others resize in float).
    One known disagreement: an output 1 pixel wide (LLaVA-NeXT, images over ~1000 times taller than wide) equals
    the AVX2 kernel, not torch's generic one (CPUs without AVX2), which differs there; torch asserts on 1x1.
    """
    height, width, channels = array.shape
    if width != size_hw[1]:  # rows of the transposed image are the columns: gathers stay contiguous
        columns = np.ascontiguousarray(array.transpose(1, 0, 2)).reshape(width, height * channels)
        array = _tv_resize_rows(columns, size_hw[1], resample).reshape(size_hw[1], height, channels).transpose(1, 0, 2)
    if height != size_hw[0]:
        rows = np.ascontiguousarray(array).reshape(height, size_hw[1] * channels)
        array = _tv_resize_rows(rows, size_hw[0], resample).reshape(size_hw[0], size_hw[1], channels)
    return np.ascontiguousarray(array)


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


def _tv_center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """``TorchvisionBackend.center_crop`` on [H, W, C]: zero padding puts the odd pixel after (PIL's: before)."""
    height, width = array.shape[:2]
    if crop_hw[0] > height or crop_hw[1] > width:
        pad_h, pad_w = max(crop_hw[0] - height, 0), max(crop_hw[1] - width, 0)
        array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = array.shape[:2]
    top, left = int((height - crop_hw[0]) / 2.0), int((width - crop_hw[1]) / 2.0)
    return array[top : top + crop_hw[0], left : left + crop_hw[1]]


def _tv_rescale_normalize(chw: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """``TorchvisionBackend.rescale_and_normalize``: fused as (x - mean / f) / (std / f) in float32, f = factor."""
    mean, std = np.array(config.image_mean, np.float32), np.array(config.image_std, np.float32)
    if config.do_rescale and config.do_normalize:
        inverse = np.float32(1.0 / config.rescale_factor)
        mean, std = mean * inverse, std * inverse
    if config.do_normalize:
        return (chw.astype(np.float32) - mean[:, None, None]) / std[:, None, None]
    if config.do_rescale:
        return chw.astype(np.float32) * np.float32(config.rescale_factor)
    return chw.astype(np.float32)


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
    """Resize, centre-crop, rescale, normalise one uint8 [H, W, 3] -> float32 [3, h, w] (either backend)."""
    if config.do_resize:
        new_h, new_w = _resize_size(*array.shape[:2], config)
        if Image.MAX_IMAGE_PIXELS and new_h * new_w > Image.MAX_IMAGE_PIXELS:  # HF would try; we refuse
            shape = f"{array.shape[1]}x{array.shape[0]}"
            raise ImageError(f"image size {shape} is too thin: resizing gives {new_w}x{new_h} pixels")
        array = _resize(array, (new_h, new_w), config)
    if config.do_center_crop:
        crop = _tv_center_crop if config.backend == "torchvision" else _center_crop
        array = crop(array, config.crop_hw)
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    if config.backend == "torchvision":
        return _tv_rescale_normalize(chw, config)
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
    resized = _resize(array, _fit_size(*array.shape[:2], target), config)
    new_h, new_w = _fit_size(*resized.shape[:2], target)
    pad_y, pad_x = divmod(target[0] - new_h, 2), divmod(target[1] - new_w, 2)
    padding = ((pad_y[0], pad_y[0] + pad_y[1]), (pad_x[0], pad_x[0] + pad_x[1]), (0, 0))
    padded = np.pad(resized, padding, mode="constant", constant_values=0)
    step = config.patch_size
    crops = [padded[i : i + step, j : j + step] for i in range(0, target[0], step) for j in range(0, target[1], step)]
    base_hw = config.size_hw or (config.shortest_edge, config.shortest_edge)
    return [_resize(array, base_hw, config), *crops]


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
