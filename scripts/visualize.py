"""`python scripts/visualize.py`: which patches FiCoCo-V keeps at each encoder layer, and where the others went.

    python scripts/visualize.py --model tiny-llava-1.5 --ratio 0.25 --out fig.png
    python scripts/visualize.py --model /models/llava-1.5-7b-hf --image photo.jpg --ratio 0.11 --out fig.png

One panel for the preprocessed 336 px crop, then one per FiCoCo-V step
(encoder layer): patches still kept after the step are shown as they are,
patches discarded at earlier steps are dimmed, patches discarded at this step
are tinted magenta with a line to the preserved patch that received the largest
share of them (its merge target, the largest alpha of Eq. 2's weights). For
LLaVA-NeXT the base (whole-image) crop is shown. Without --image the picture
is `skimage.data.astronaut()`.

How the steps are captured: the encoder is run with `ficoco.patch.clip.encode`
(the model itself is never patched) while observing its FiCoCo-V steps
(`ficoco.patch.observe.observing`); each reported step's split and merge weights
are recomputed from its attention map with the same `ficoco.core` functions,
which must choose the tokens the step kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

if __package__ in (None, ""):  # `python scripts/visualize.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TITLE_H, LEGEND_H = 22, 26
DIM, TINT = 0.22, (200, 0, 255)
LINE, TARGET = (255, 230, 0), (0, 230, 255)


@dataclass(frozen=True)
class StepRecord:
    """One FiCoCo-V step on the first crop; all indices are raster positions on the patch grid."""

    layer: int
    discarded: tuple[int, ...]  # discarded at this step, by descending redundancy
    targets: tuple[int, ...]  # for each discarded patch: the preserved patch with the largest merge weight
    kept: tuple[int, ...]  # preserved after this step (raster order)


def analyse_step(attn, positions, r: int, params, kept) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Recompute `ficoco.core.vision_step`'s split and merge weights; (discarded, targets, kept) of crop 0."""
    import torch

    from ficoco import core

    attn = attn.to(torch.promote_types(attn.dtype, torch.float32))
    scores = core.vision_redundancy(attn, params.lam)
    if params.penalty:
        scores = core.window_penalty(scores, positions, params.grid, params.window, params.scale)
    src, dst = core.split_by_score(scores, r)
    alpha = core.merge_weights(core.vision_correlation(attn, src, dst), params.eps)  # [B, r, m]
    if not torch.equal(positions.gather(1, dst), kept):
        raise RuntimeError("the recomputed FiCoCo-V split differs from the step that ran; ficoco.core changed?")
    pos = positions[0]
    targets = pos[dst[0][alpha[0].argmax(dim=-1)]]
    return tuple(pos[src[0]].tolist()), tuple(targets.tolist()), tuple(kept[0].tolist())


def preprocess(processor, image: Image.Image):
    """(pixel_values [1, 3, S, S] of the first crop, the same crop as an RGB uint8 array)."""
    processed = processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
    pixels = processed["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: [images, crops, 3, S, S]; crop 0 is the resized whole image
        pixels = pixels[0, :1]
    ip = processor.image_processor
    mean, std = np.array(ip.image_mean).reshape(3, 1, 1), np.array(ip.image_std).reshape(3, 1, 1)
    rgb = (pixels[0].float().numpy() * std + mean).clip(0, 1) * 255
    return pixels, rgb.transpose(1, 2, 0).round().astype(np.uint8)


def trace(model, processor, image: Image.Image, config) -> tuple[np.ndarray, list[StepRecord], object]:
    """Run the vision tower with FiCoCo-V on `image`; (crop RGB, one StepRecord per step, the plan)."""
    import torch

    from ficoco.patch import clip
    from ficoco.patch.llava import make_plan
    from ficoco.patch.observe import observing

    plan = make_plan(model, config)
    if not plan.vision:
        raise ValueError(f"FiCoCo-{config.variant.upper()} at this ratio has no FiCoCo-V step to show")
    pixels, rgb = preprocess(processor, image)
    with torch.no_grad(), observing() as events:
        clip.encode(model.model.vision_tower, pixels, plan.vision, plan.geometry.feature_layer, plan.vision_params)
    steps = [StepRecord(event.layer, *analyse_step(event.attn, event.positions, event.r, event.params, event.kept))
             for event in events]
    if [step.layer for step in steps] != [step.layer for step in plan.vision]:
        raise RuntimeError(f"observed FiCoCo-V steps at layers {[s.layer for s in steps]}, "
                           f"the plan has {[s.layer for s in plan.vision]}")
    return rgb, steps, plan


def _cell(position: int, grid: tuple[int, int], patch: tuple[float, float]) -> tuple[float, float, float, float]:
    row, col = divmod(position, grid[1])
    return col * patch[1], row * patch[0], (col + 1) * patch[1], (row + 1) * patch[0]


def draw_panel(rgb: np.ndarray, grid: tuple[int, int], gone: set[int], step: StepRecord | None) -> Image.Image:
    """The crop with `gone` patches dimmed and, for a step, its discards tinted and linked to their targets."""
    height, width = rgb.shape[:2]
    patch = (height / grid[0], width / grid[1])
    shade = np.ones(grid[0] * grid[1], dtype=np.float32)
    shade[list(gone)] = DIM
    cells = shade.reshape(grid).repeat(round(patch[0]), 0).repeat(round(patch[1]), 1)[:height, :width]
    panel = Image.fromarray((rgb * cells[..., None]).astype(np.uint8))
    if step is None:
        return panel
    overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for position in step.discarded:
        draw.rectangle(_cell(position, grid, patch), fill=(*TINT, 150))
    centre = {p: ((x0 + x1) / 2, (y0 + y1) / 2) for p in set(step.discarded) | set(step.targets)
              for x0, y0, x1, y1 in [_cell(p, grid, patch)]}
    for source, target in zip(step.discarded, step.targets, strict=True):
        draw.line([centre[source], centre[target]], fill=(*LINE, 170), width=1)
    for target in set(step.targets):
        x, y = centre[target]
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(*TARGET, 255))
    return Image.alpha_composite(panel.convert("RGBA"), overlay).convert("RGB")


def render(
    rgb: np.ndarray, steps: list[StepRecord], grid: tuple[int, int], header: str, cols: int = 4
) -> tuple[Image.Image, list[dict]]:
    """The figure (input panel, then one per step) and, per panel, its title and kept count."""
    patches = grid[0] * grid[1]
    panels = [(f"input: {patches} patches", draw_panel(rgb, grid, set(), None), patches)]
    gone: set[int] = set()
    for step in steps:
        gone_before = set(gone)
        gone |= set(step.discarded)
        title = f"layer {step.layer}: keep {len(step.kept)} (-{len(step.discarded)})"
        panels.append((title, draw_panel(rgb, grid, gone_before, step), len(step.kept)))
    h, w = rgb.shape[:2]
    rows = -(-len(panels) // cols)
    font = ImageFont.load_default(size=14)
    figure = Image.new("RGB", (cols * w, TITLE_H + rows * (h + TITLE_H) + LEGEND_H), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((6, 3), header, fill="black", font=font)
    for index, (title, panel, _) in enumerate(panels):
        x, y = (index % cols) * w, TITLE_H + (index // cols) * (h + TITLE_H)
        draw.text((x + 6, y + 3), title, fill="black", font=font)
        figure.paste(panel, (x, y + TITLE_H))
    legend = ("bright: kept after the layer; dark: discarded earlier; magenta: discarded at this layer, "
              "yellow line to its merge target (largest weight, cyan dot)")
    draw.text((6, figure.height - LEGEND_H + 5), legend, fill="black", font=font)
    return figure, [{"title": t, "kept": k} for t, _, k in panels]


def visualize(model_name: str, image: Image.Image, variant: str, ratio: float, out: str | Path, cols: int = 4) -> list[dict]:
    """Load `model_name`, trace FiCoCo-V on `image` and write the PNG figure; returns the panels' titles and kept counts.

    The PNG carries the same list as JSON in its text chunk "ficoco".
    """
    from ficoco import FiCoCoConfig
    from ficoco.models.presets import preset_names, load

    model, processor = load(model_name)
    rgb, steps, plan = trace(model, processor, image, FiCoCoConfig(variant, ratio=ratio))
    preset = " (preset: random vision weights)" if str(model_name) in preset_names() else ""
    header = (f"FiCoCo-{variant.upper()} on {Path(str(model_name)).name}{preset}, ratio {ratio}: "
              f"{plan.geometry.patches} -> {plan.vision_tokens} patches per crop over encoder layers "
              f"{plan.vision[0].layer}-{plan.vision[-1].layer}")
    figure, panels = render(rgb, steps, plan.geometry.grid, header, cols)
    info = PngImagePlugin.PngInfo()
    info.add_text("ficoco", json.dumps({"model": str(model_name), "variant": variant, "ratio": ratio, "panels": panels}))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, pnginfo=info, optimize=True)  # 1/3 the size
    return panels


def load_image(path: str | None) -> Image.Image:
    """The image at `path`, or scikit-image's astronaut picture."""
    if path is None:
        from skimage import data

        return Image.fromarray(data.astronaut())
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read image {path!r}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/visualize.py", description=__doc__.split("\n")[0])
    p.add_argument("--image", help="image file (default: skimage.data.astronaut())")
    p.add_argument("--model", default="tiny-llava-1.5", help="preset name or local Hugging Face LLaVA directory")
    p.add_argument("--variant", default="v", choices=["v", "vl"], help="the FiCoCo-V part of this variant is shown")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of visual tokens kept")
    p.add_argument("--cols", type=int, default=4, help="panels per row")
    p.add_argument("--out", type=Path, default=Path("ficoco_v.png"))
    args = p.parse_args(argv)
    try:
        panels = visualize(args.model, load_image(args.image), args.variant, args.ratio, args.out, args.cols)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{p['title'].split(':')[0]} {p['kept']}" for p in panels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
