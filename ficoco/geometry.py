"""The shapes of a LLaVA model that a build depends on, read once from its config dict (no torch).

A config dict is Hugging Face's config.json format (`model.config.to_dict()`), with `text_config`
and `vision_config` dicts. Everything that reads a width, a head count, `head_dim` or the anyres
grids of a config reads it here:

    config_geometry(config)  -> ModelGeometry   vision grid, encoder layers, feature layer, decoder layers
    text_geometry(config)    -> TextGeometry    the decoder's widths (hidden, heads, kv_heads, head_dim, vocab)
    anyres_grids(config)     -> [(rows, cols)]  LLaVA-NeXT's grids from image_grid_pinpoints ([] for LLaVA-1.5)
    anyres_grid(config, g)   -> (rows, cols)    the grid a build serves: `g` checked, else the one of most crops
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelGeometry


@dataclass(frozen=True)
class TextGeometry:
    """The decoder's widths (Llama): what the KV cache, the graphs' I/O and the FLOPs depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def text_config(config: dict) -> dict:
    """The Llama config of a LLaVA config dict (or `config` itself when it is one)."""
    return config.get("text_config", config)


def text_geometry(config: dict) -> TextGeometry:
    """From a LLaVA (or Llama) config dict, with Llama's defaults: kv_heads = heads, head_dim = hidden / heads."""
    text = text_config(config)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    return TextGeometry(text["num_hidden_layers"], hidden, heads, text.get("num_key_value_heads") or heads,
                        text.get("head_dim") or hidden // heads, text.get("vocab_size", 0))


def config_geometry(config: dict) -> ModelGeometry:
    """ModelGeometry from a LLaVA config dict (`ficoco.patch.llava.geometry_of` reads a loaded model's through it)."""
    vision, text = config["vision_config"], config["text_config"]
    feature = config.get("vision_feature_layer", -2)
    if not isinstance(feature, int):  # as ficoco.patch.llava: bad input is a ValueError naming it
        raise ValueError(f"vision_feature_layer={feature} (several layers) is not supported by FiCoCo")  # noqa: TRY004
    layers = vision["num_hidden_layers"]
    hidden_index = feature if feature >= 0 else layers + 1 + feature
    side = vision["image_size"] // vision["patch_size"]
    return ModelGeometry((side, side), layers, hidden_index - 1, text["num_hidden_layers"])


def anyres_grids(config: dict) -> list[tuple[int, int]]:
    """LLaVA-NeXT's anyres grids (rows, cols), sorted, from `image_grid_pinpoints`; [] for LLaVA-1.5."""
    pinpoints = config.get("image_grid_pinpoints") if config.get("model_type") == "llava_next" else None
    side = config["vision_config"]["image_size"]
    return sorted({(h // side, w // side) for h, w in pinpoints or ()})


def anyres_grid(config: dict, grid: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The grid a build serves: `grid` checked against the config's, else the one with most crops; None for
    LLaVA-1.5 (ValueError naming the grids when `grid` is not one of them, or given for LLaVA-1.5)."""
    grids = anyres_grids(config)
    if not grids:
        if grid is not None:
            raise ValueError(f"--grid {grid[0]}x{grid[1]} applies to LLaVA-NeXT only; this model has one crop per image")
        return None
    if grid is not None and tuple(grid) not in grids:
        raise ValueError(f"--grid {grid[0]}x{grid[1]} is not one of this model's anyres grids "
                         f"({', '.join(f'{r}x{c}' for r, c in grids)})")
    return tuple(grid) if grid is not None else max(grids, key=lambda g: (g[0] * g[1], g))
