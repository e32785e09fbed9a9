"""What identifies a build's source model, and reloading it for `python -m export.trace.verify`.

The manifest records the model's name (a preset name, or the checkpoint
directory's base name) and a fingerprint of its files, never the exporting
machine's paths. Re-verifying a build of a local checkpoint therefore takes
`--model DIR`; the fingerprint must match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .request import BuildRequest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def fingerprint(directory: Path) -> str:
    """sha256 over config.json's bytes and the names and sizes of the weight files (cheap for 14 GB)."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def source_entry(model_arg: str, directory: Path) -> dict:
    """The manifest's identification of the model: no absolute path."""
    from ficoco.models.presets import preset_names

    preset = model_arg in preset_names()  # the tiny presets and the real-weights ones
    return {"model": model_arg if preset else Path(model_arg).name, "preset": preset, "fingerprint": fingerprint(directory)}


def source_dir(manifest: dict, model: str | Path | None = None) -> Path:
    """The checkpoint directory a build was made from: `model` (a directory or preset name), else the
    manifest's preset; its fingerprint must match the manifest's."""
    from ficoco.models.presets import resolve_model_dir

    source = manifest["source"]
    if model is None:
        if not source.get("preset"):
            raise ValueError(f"the build was made from a local checkpoint ({source['model']!r}); pass --model DIR")
        model = source["model"]
    directory = resolve_model_dir(model)
    if fingerprint(directory) != source.get("fingerprint"):
        raise ValueError(f"model {str(model)!r} is not the one this build was made from (fingerprint differs)")
    return directory


def reload_for_verify(build, model: str | Path | None = None):
    """(model, processor, graphs) of an existing build (`runtime.manifest.Build`); `model` is the checkpoint
    directory unless a preset."""
    from .trace import pipeline
    from .trace.graphs import graph_set

    manifest, plan = build.manifest, build.plan
    request = BuildRequest(
        model=str(source_dir(manifest, model)), variant=manifest["variant"],
        ratio=manifest["ficoco"]["ratio"] if manifest["variant"] != "none" else None,
        tokens=manifest["ficoco"]["tokens"], precision=manifest["precision"], max_seq_len=plan.max_seq_len,
        **({"grid": plan.grid, "grid_given": True} if plan.grid else {}),
    )
    loaded, processor, _ = pipeline.load_model(request)
    patch_plan, plan = pipeline.patch(loaded, processor, request, plan)  # the build's own plan
    return loaded, processor, graph_set(loaded, patch_plan, plan)
