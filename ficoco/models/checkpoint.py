"""Is a local checkpoint directory complete and readable? Checked before anything is loaded.

`check_checkpoint(directory)` raises `ModelSourceError` (a ValueError, defined here and also raised by
`ficoco.models.presets` for a model argument that is neither a preset nor a directory) naming the file and what is
wrong with it; it reads headers and small files only, never the weights themselves:

* architecture: config.json's first `architectures` entry has a FiCoCo adapter.
* weights: `model.safetensors`, or the shards that `model.safetensors.index.json` lists. Each must
  parse as safetensors (the `safetensors` library checks that the header is whole and that the data
  covers the file exactly, so a truncated or padded file fails here). Pickle weights
  (`pytorch_model.bin`, `*.pt`, ...) are refused: unpickling can run code, and transformers would load
  them with `torch.load`. Safetensors is required; convert first.
* tokenizer: `tokenizer.json` parsed by `tokenizers`, or a non-empty `tokenizer.model` (SentencePiece).
* processor: `preprocessor_config.json`, or `processor_config.json` with an `image_processor` section.
* every JSON file transformers reads from the directory parses as a JSON object; `chat_template.jinja`
  is UTF-8 text.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
JSON_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json", INDEX)


class ModelSourceError(ValueError):
    """A model argument is neither a known preset nor a usable checkpoint directory."""


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelSourceError(f"'{path}' is not readable JSON: {' '.join(str(error).split())}") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"'{path}' must hold a JSON object, not {type(value).__name__}")
    return value


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files the checkpoint's weights are in; refuses pickles and missing shards."""
    index = directory / INDEX
    if index.is_file():
        weight_map = _json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSourceError(f"'{index}' has no weight_map")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise ModelSourceError(f"'{index}' lists shards that are not plain file names: {bad[:3]}")
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelSourceError(f"model directory '{directory}' lacks {len(missing)} shard(s) its index lists: {missing[:3]}")
        return [directory / n for n in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelSourceError(
            f"model directory '{directory}' has only pickle weights ({', '.join(pickles[:3])}); safetensors is required "
            f"(pickles can run code when loaded): convert them to model.safetensors first")
    raise ModelSourceError(f"model directory '{directory}' has no weights: expected model.safetensors or {INDEX}")


def check_weights(directory: Path) -> None:
    """Each safetensors file parses and its data covers the file exactly (header only, no tensors read)."""
    from safetensors import safe_open

    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="np") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError derives from Exception only
            raise ModelSourceError(f"'{path}' is not a readable safetensors file (truncated or corrupt): "
                                   f"{' '.join(str(error).split())}") from None


def check_tokenizer_and_processor(directory: Path) -> None:
    """A tokenizer that parses, image-processor settings, and every JSON file as a JSON object."""
    configs = {name: _json_object(directory / name) for name in JSON_FILES if (directory / name).is_file()}
    fast, slow = directory / "tokenizer.json", directory / "tokenizer.model"
    if fast.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(fast))
        except Exception as error:  # tokenizers raises a plain Exception
            raise ModelSourceError(f"'{fast}' does not parse as a tokenizer: {' '.join(str(error).split())[:200]}") from None
    elif not (slow.is_file() and slow.stat().st_size > 0):
        raise ModelSourceError(f"model directory '{directory}' has no tokenizer (tokenizer.json or tokenizer.model)")
    if "preprocessor_config.json" not in configs and not isinstance(configs.get("processor_config.json", {}).get("image_processor"), dict):
        raise ModelSourceError(f"model directory '{directory}' has no image-processor settings "
                               "(preprocessor_config.json, or processor_config.json with image_processor)")
    template = directory / "chat_template.jinja"
    if template.is_file():
        try:
            template.read_text(encoding="utf-8")
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"'{template}' is not UTF-8 text: {error}") from None


def check_architecture(directory: Path) -> None:
    """config.json names an architecture FiCoCo has an adapter for (LLaVA-1.5, LLaVA-NeXT)."""
    from ..patch.llava import ADAPTERS

    architectures = _json_object(directory / "config.json").get("architectures") or ["(none listed)"]
    if not isinstance(architectures, list) or architectures[0] not in ADAPTERS:
        raise ModelSourceError(f"unsupported architecture {architectures[0] if isinstance(architectures, list) else architectures} "
                               f"in {directory}; FiCoCo supports {sorted(ADAPTERS)}")


def check_checkpoint(directory: Path) -> None:
    """Architecture, weights, tokenizer and processor files of a local checkpoint; ModelSourceError on the first problem."""
    check_architecture(directory)
    check_weights(directory)
    check_tokenizer_and_processor(directory)
