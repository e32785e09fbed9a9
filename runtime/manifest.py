"""The build manifest (`manifest.json`): what `export.build` writes and the runtime relies on alone.

No torch, no transformers: this module runs on the device. Schema (version 1):

    schema, schema_version        "ficoco-build", 1
    created                       ISO time of the build
    source                        {model, architecture, text: {layers, hidden, kv_heads, head_dim, vocab,
                                   image_token_id, eos_token_ids}}
    variant, ficoco               the FiCoCo variant ("none" for an unreduced build) and its settings
    schedule                      {vision: [[layer, in, out], ...] per crop, language: [...],
                                   kept_per_crop, crops, grid, visual_tokens}
    precision, max_seq_len
    graphs                        {vision|prefill|decode: {file, sha256, bytes, external_data: [{file, sha256}],
                                   inputs: [{name, shape, dtype}], outputs: [...]}}
    engines                       same keys, engine files (empty when no TensorRT build)
    tensorrt                      {flavour, version, compute_capabilities, trtexec: {graph: command}} or null
    preprocess                    the Hugging Face image-processor settings (dict)
    tokenizer                     {files: [...], chat_template, image_token}
    libraries, flops, parity      versions; FLOPs estimate; verification figures
"""

from __future__ import annotations

import hashlib
import json
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
