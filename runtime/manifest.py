"""The build manifest (`manifest.json`): what `export.build` writes and the runtime relies on alone.

No torch, no transformers: this module runs on the device. Schema (version 1):

    schema, schema_version        "ficoco-build", 1
    created                       ISO time of the build
    source                        {model, architecture, text: {layers, hidden, kv_heads, head_dim, vocab,
                                   image_token_id, eos_token_ids}}
    variant, ficoco               the FiCoCo variant ("none" for an unreduced build) and its settings
    schedule                      {vision: [[layer, in, out], ...] per crop, language: [...],
                                   patches_per_crop, kept_per_crop, crops, grid, visual_tokens}
    precision, max_seq_len
    graphs                        {vision|prefill|decode: {file, sha256, bytes, external_data: [{file, sha256}],
                                   inputs: [{name, shape, dtype}], outputs: [...]}}
    engines                       same keys, engine files (empty when no TensorRT build)
    tensorrt                      {flavour, version, compute_capabilities, trtexec: {graph: command}} or null
    preprocess                    the Hugging Face image-processor settings (dict)
    tokenizer                     {files: [{file, sha256, bytes}] (tokenizer.json, chat_template.jinja, ...), image_token}
    libraries, flops, parity      versions; FLOPs estimate; verification figures
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "ficoco-build"
SCHEMA_VERSION = 1
FILENAME = "manifest.json"


class BuildError(ValueError):
    """A build directory the runtime cannot use; the message says why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(directory: Path, name: str) -> dict:
    """{file, sha256, bytes} of directory/name."""
    path = directory / name
    return {"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def is_build(directory: Path) -> bool:
    """Whether `directory` holds a manifest written by export.build (any schema version)."""
    try:
        return json.loads((directory / FILENAME).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def read(directory: str | Path) -> dict:
    """Load and check a build's manifest; raises BuildError with one clear line."""
    directory = Path(directory)
    path = directory / FILENAME
    if not directory.is_dir():
        raise BuildError(f"build directory {str(directory)!r} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{str(directory)!r} is not a build: it has no {FILENAME}") from None
    except (OSError, ValueError) as error:
        raise BuildError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BuildError(f"{str(path)!r} is not a ficoco build manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BuildError(
            f"{str(path)!r} has schema version {manifest.get('schema_version')!r}; this runtime reads version {SCHEMA_VERSION}"
        )
    return manifest


def check_files(directory: str | Path, entries: dict) -> None:
    """Raise BuildError if a listed file (or its external data) is missing or fails its sha256."""
    directory = Path(directory)
    for graph, entry in entries.items():
        for item in [entry, *entry.get("external_data", [])]:
            path = directory / item["file"]
            if not path.is_file():
                raise BuildError(f"{graph}: {str(path)!r} is missing")
            if sha256_file(path) != item["sha256"]:
                raise BuildError(f"{graph}: {str(path)!r} fails its sha256 check (altered or truncated)")


def write(directory: Path, manifest: dict) -> Path:
    manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **manifest}
    path = directory / FILENAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------- read side: what the runtime uses

ARCHITECTURES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}


def _positive(**values: object) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BuildError(f"manifest: {key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Build:
    """The facts of a build the runtime relies on, checked once; `from_directory` reads them."""

    directory: Path
    manifest: dict = field(repr=False, compare=False)
    architecture: str  # "llava" (LLaVA-1.5) | "llava_next"
    layers: int  # decoder layers
    kv_heads: int
    head_dim: int
    vocab: int
    image_token_id: int
    eos_token_ids: frozenset[int]
    crops: int  # 1, or 1 + rows * cols
    patches_per_crop: int  # before FiCoCo-V (576 for 336 px / 14 px patches)
    kept_per_crop: int  # after FiCoCo-V
    grid: tuple[int, int] | None  # LLaVA-NeXT anyres (rows, cols)
    visual_tokens: int  # into the LLM: crops * kept (+ one newline per grid row for NeXT)
    language_steps: tuple[tuple[int, int, int], ...]  # FiCoCo-L (layer, tokens in, tokens out)
    max_seq_len: int
    precision: str

    def __post_init__(self) -> None:
        _positive(layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim, vocab=self.vocab,
                  crops=self.crops, patches_per_crop=self.patches_per_crop, kept_per_crop=self.kept_per_crop,
                  visual_tokens=self.visual_tokens, max_seq_len=self.max_seq_len)
        if self.architecture not in ARCHITECTURES.values():
            raise BuildError(f"manifest: unknown architecture {self.architecture!r}")
        if (self.architecture == "llava_next") != (self.grid is not None):
            raise BuildError(f"manifest: schedule grid {self.grid} does not fit architecture {self.architecture!r}")
        rows, cols = self.grid or (0, 0)
        crops, visual = 1 + rows * cols, self.kept_per_crop * self.crops + rows
        if (self.crops, self.visual_tokens) != (crops, visual):
            raise BuildError(f"manifest: crops {self.crops} / visual_tokens {self.visual_tokens} do not follow from "
                             f"grid {self.grid} and kept_per_crop {self.kept_per_crop} (expected {crops} / {visual})")
        if not self.eos_token_ids:
            raise BuildError("manifest: source.text.eos_token_ids is empty")
        for layer, tokens_in, tokens_out in self.language_steps:
            if not (0 <= layer < self.layers and 0 < tokens_out <= tokens_in <= self.visual_tokens):
                raise BuildError(f"manifest: FiCoCo-L step {(layer, tokens_in, tokens_out)} is out of range")

    @classmethod
    def from_directory(cls, directory: str | Path) -> Build:
        """read() the manifest and pull out the runtime's facts; BuildError on anything missing."""
        directory = Path(directory)
        manifest = read(directory)
        try:
            text, schedule = manifest["source"]["text"], manifest["schedule"]
            architecture = manifest["source"]["architecture"]
            return cls(
                directory=directory, manifest=manifest,
                architecture=ARCHITECTURES.get(architecture, architecture),
                layers=text["layers"], kv_heads=text["kv_heads"], head_dim=text["head_dim"], vocab=text["vocab"],
                image_token_id=text["image_token_id"], eos_token_ids=frozenset(text["eos_token_ids"]),
                crops=schedule["crops"], patches_per_crop=schedule["patches_per_crop"],
                kept_per_crop=schedule["kept_per_crop"], grid=tuple(schedule["grid"]) if schedule["grid"] else None,
                visual_tokens=schedule["visual_tokens"],
                language_steps=tuple(tuple(step) for step in schedule["language"]),
                max_seq_len=manifest["max_seq_len"], precision=manifest["precision"],
            )
        except (KeyError, TypeError, IndexError) as error:
            raise BuildError(f"{str(directory / FILENAME)!r} lacks or mangles {error}") from None

    @property
    def after_ficoco_l(self) -> int:
        """Visual tokens left after the last FiCoCo-L step (visual_tokens without one)."""
        return self.language_steps[-1][2] if self.language_steps else self.visual_tokens

    def cache_lengths(self, prompt_length: int) -> tuple[int, ...]:
        """Layer i's cache length after the prefill: layers after a FiCoCo-L step keep only its survivors."""
        return tuple(
            prompt_length - sum(t_in - t_out for layer, t_in, t_out in self.language_steps if layer < index)
            for index in range(self.layers)
        )

    @property
    def engines(self) -> dict:
        """The manifest's TensorRT engine entries ({} when the build has none)."""
        return self.manifest.get("engines") or {}

    @property
    def tensorrt_flavour(self) -> str | None:
        """"tensorrt" or "tensorrt-rtx": the flavour the engines were built with (None without engines)."""
        section = self.manifest.get("tensorrt") or {}
        return section.get("flavour") if self.engines else None

    def path(self, kind: str, graph: str) -> Path:
        """The file of graph `graph` in `kind` ("graphs": ONNX, "engines": TensorRT)."""
        entries = self.manifest.get(kind) or {}
        if graph not in entries:
            raise BuildError(f"{str(self.directory)!r} has no {graph} in its manifest's {kind!r}")
        return self.directory / entries[graph]["file"]

    def check(self, kind: str) -> None:
        """sha256 of the files of `kind` ("graphs", "engines" or "tokenizer") against the manifest."""
        if kind == "tokenizer":
            entries = {item["file"]: item for item in (self.manifest.get("tokenizer") or {}).get("files", [])}
        else:
            entries = self.manifest.get(kind) or {}
        if not entries:
            raise BuildError(f"{str(self.directory)!r} lists no {kind} in its manifest")
        check_files(self.directory, entries)
