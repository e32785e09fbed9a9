"""The build manifest (`manifest.json`): what `export.build` writes and the runtime relies on alone.

No torch, no transformers: this module runs on the device. Schema (version 2):

    schema, schema_version        "ficoco-build", 2
    created                       ISO time of the build
    source                        {model (a preset name or the checkpoint directory's base name, never a
                                   local path), preset, fingerprint (sha256 of config.json and the weight
                                   files' names and sizes), architecture, text: {image_token_id, eos_token_ids}}
    variant, ficoco               the FiCoCo variant ("none" for an unreduced build) and its settings
    schedule                      the build plan, as `ficoco.BuildPlan.to_dict` writes it and `Build.plan` reads
                                   it back: {variant, geometry, text: {layers, hidden, heads, kv_heads, head_dim,
                                   vocab}, grid, crops, vision: [[layer, in, out], ...] per crop,
                                   patches_per_crop, kept_per_crop, newline_rows, visual_tokens, language: [...],
                                   max_seq_len, segments: [[first layer, stop, capacity], ...]}
    precision
    graphs                        {GRAPH: {file, sha256, bytes, external_data: [{file, sha256}],
                                   inputs: [{name, shape, dtype}], outputs: [...]}} for every graph of
                                   `runtime.names.graph_names`, in running order
    embedding                     {graph, file, offset, shape, dtype, transposed}: the text embedding table
                                   in that graph's external data (the runtime looks rows up there)
    memory                        the memory plan (ficoco.analysis.memory): bytes of weights, KV cache, engines
    engines                       same keys, engine files (empty when no TensorRT build)
    tensorrt                      {flavour, version, compute_capabilities, trtexec: {graph: command}} or null
    preprocess                    the Hugging Face image-processor settings (dict), with "backend": "pil" |
                                   "torchvision", the processor the build was verified with
    tokenizer                     {files: [{file, sha256, bytes}] (tokenizer.json, chat_template.jinja, ...), image_token}
    libraries, flops              versions; FLOPs estimate
    parity                        the verification record (export/gates.py): {limits, graphs, end_to_end,
                                   passed}; passed false for --allow-parity-failure, null for --no-verify
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ficoco.plan import BuildPlan

from . import names

SCHEMA = "ficoco-build"
SCHEMA_VERSION = 2
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


def plain_name(value: object, where: str) -> str:
    """A file name the manifest lists: a plain name inside the build (no directories, no '..'), else BuildError."""
    if (not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value
            or value != value.strip()):
        raise BuildError(f"manifest: {where} file {value!r} is not a plain file name inside the build")
    return value


def file_items(entries: object, kind: str) -> list[tuple[str, dict]]:
    """[(label, {file, sha256, ...})] of a manifest section ({name: entry} with optional external_data),
    each checked for shape and a plain file name; BuildError on anything mangled."""
    if not isinstance(entries, dict):
        raise BuildError(f"manifest: {kind} must be a mapping of entries, got {type(entries).__name__}")
    items = []
    for label, entry in entries.items():
        extra = entry.get("external_data", []) if isinstance(entry, dict) else None
        if not isinstance(extra, list):
            raise BuildError(f"manifest: {kind}.{label} must be an entry with file and sha256, got {entry!r:.80}")
        for item in [entry, *extra]:
            if not isinstance(item, dict) or not isinstance(item.get("sha256"), str):
                raise BuildError(f"manifest: {kind}.{label} has an entry without a sha256: {item!r:.80}")
            plain_name(item.get("file"), f"{kind}.{label}")
            items.append((str(label), item))
    return items


def check_files(directory: str | Path, entries: dict, kind: str = "graphs") -> None:
    """Raise BuildError if a listed file (or its external data) is missing or fails its sha256."""
    directory = Path(directory)
    for graph, item in file_items(entries, kind):
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
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# element types as ONNX Runtime ("tensor(float)") and TensorRT ("FLOAT", "DataType.HALF") spell them -> numpy names
_TYPE_NAMES = {"float": "float32", "float32": "float32", "half": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "double": "float64", "int64": "int64", "int32": "int32"}
MAX_SEQ_LEN_KEY = "ficoco.max_seq_len"  # ONNX metadata_props entry: the max_seq_len a graph was exported for


def dtype_name(value: object) -> str:
    """A tensor element type in numpy's spelling, from ONNX Runtime's, TensorRT's or numpy's."""
    text = str(value).split(".")[-1].lower()
    text = text[len("tensor("):-1] if text.startswith("tensor(") else text
    return _TYPE_NAMES.get(text, text)


def tokenizer_files(manifest: dict) -> dict:
    """{file: entry} of the manifest's tokenizer files, each checked like a graph entry."""
    section = manifest.get("tokenizer") or {}
    files = section.get("files", []) if isinstance(section, dict) else None
    if not isinstance(files, list):
        raise BuildError(f"manifest: tokenizer.files must be a list of entries, got {files!r:.80}")
    entries = {str(item.get("file")) if isinstance(item, dict) else str(i): item for i, item in enumerate(files)}
    file_items(entries, "tokenizer")
    return entries


def _preprocess(settings: object) -> Any:
    from .preprocess import PreprocessConfig

    if not isinstance(settings, dict):
        raise BuildError(f"manifest: preprocess must be a mapping of image-processor settings, got {settings!r:.80}")
    try:
        return PreprocessConfig.from_dict(settings)
    except (ValueError, TypeError, KeyError) as error:
        raise BuildError(f"manifest: unusable preprocess settings: {error}") from None


def _positive(**values: object) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BuildError(f"manifest: {key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Build:
    """The facts of a build the runtime relies on, checked once; `from_directory` reads them. Every count
    (visual tokens, FiCoCo-L steps, segments, cache capacities, the decoder's widths) is the build plan's,
    `Build.plan`, read back from the manifest's `schedule`."""

    directory: Path
    manifest: dict = field(repr=False, compare=False)
    plan: BuildPlan
    architecture: str  # "llava" (LLaVA-1.5) | "llava_next"
    image_token_id: int
    eos_token_ids: frozenset[int]
    precision: str
    preprocess: Any = field(repr=False, compare=False)  # runtime.preprocess.PreprocessConfig of the manifest

    def __post_init__(self) -> None:
        _positive(layers=self.layers, hidden=self.hidden, kv_heads=self.kv_heads, head_dim=self.head_dim, vocab=self.vocab,
                  max_seq_len=self.max_seq_len)
        if self.architecture not in ARCHITECTURES.values():
            raise BuildError(f"manifest: unknown architecture {self.architecture!r}")
        if (self.architecture == "llava_next") != (self.plan.grid is not None):
            raise BuildError(f"manifest: schedule grid {self.plan.grid} does not fit architecture {self.architecture!r}")
        if not self.eos_token_ids:
            raise BuildError("manifest: source.text.eos_token_ids is empty")
        if self.precision not in FLOAT_DTYPES:
            raise BuildError(f"manifest: precision {self.precision!r} is not one of {sorted(FLOAT_DTYPES)}")
        for name, ids in (("eos_token_ids", sorted(self.eos_token_ids, key=str)), ("image_token_id", [self.image_token_id])):
            if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab for i in ids):
                raise BuildError(f"manifest: {name} {ids} are not token ids below vocab {self.vocab}")

    @classmethod
    def from_directory(cls, directory: str | Path) -> Build:
        """read() the manifest and pull out the runtime's facts; BuildError on anything missing."""
        return cls.from_manifest(directory, read(directory))

    @classmethod
    def from_manifest(cls, directory: str | Path, manifest: dict) -> Build:
        """The facts of `manifest` for the build in `directory` (the export's verification passes the manifest
        it is about to write); BuildError on anything missing."""
        directory = Path(directory)
        for kind in ("graphs", "engines"):
            file_items(manifest.get(kind) or {}, kind)
        tokenizer_files(manifest)
        try:
            text, architecture = manifest["source"]["text"], manifest["source"]["architecture"]
            plan = BuildPlan.from_dict(manifest["schedule"])
            build = cls(
                directory=directory, manifest=manifest, plan=plan,
                architecture=ARCHITECTURES.get(architecture, architecture),
                image_token_id=text["image_token_id"], eos_token_ids=frozenset(text["eos_token_ids"]),
                precision=manifest["precision"], preprocess=_preprocess(manifest["preprocess"]),
            )
        except (KeyError, TypeError, IndexError, ValueError) as error:
            if isinstance(error, BuildError):
                raise
            raise BuildError(f"{str(directory / FILENAME)!r} lacks or mangles {error}") from None
        return build

    # the decoder's widths and the cache length, as the plan holds them
    layers = property(lambda self: self.plan.text.layers)
    hidden = property(lambda self: self.plan.text.hidden)
    kv_heads = property(lambda self: self.plan.text.kv_heads)
    head_dim = property(lambda self: self.plan.text.head_dim)
    vocab = property(lambda self: self.plan.text.vocab)
    max_seq_len = property(lambda self: self.plan.max_seq_len)

    def check_eos(self) -> None:
        """The manifest's EOS ids against the build's own generation_config.json (when it has one; after its
        sha256 check, which `check("tokenizer")` does)."""
        path = self.directory / "generation_config.json"
        if not path.is_file():
            return
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as error:
            raise BuildError(f"cannot read {str(path)!r}: {error}") from None
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if eos and eos != set(self.eos_token_ids):
            raise BuildError(f"manifest: eos_token_ids {sorted(self.eos_token_ids)} differ from {sorted(eos, key=str)} "
                             f"in the build's generation_config.json")

    def expected_io(self, graph: str) -> dict[str, tuple[list, str]]:
        """{tensor: (shape, dtype)} a graph must have for this manifest; None in a shape: any (dynamic) size."""
        f, i64, hidden, p = FLOAT_DTYPES[self.precision], "int64", self.hidden, self.plan
        if graph == names.VISION:
            return {names.PIXEL_VALUES: ([p.crops, 3, *self.preprocess.crop_hw], f),
                    names.IMAGE_FEATURES: ([p.visual_tokens, hidden], f),
                    names.KEPT_POSITIONS: ([p.crops, p.kept_per_crop], i64)}
        if graph == names.EMBED:
            return {names.INPUT_IDS: ([1, None], i64), names.INPUTS_EMBEDS: ([1, None, hidden], f)}
        inputs, outputs = names.io_names(graph, self.plan)
        tokens = [1, None, hidden]
        known = {names.HIDDEN_STATES: (tokens, f), names.ATTENDED: (tokens, f), names.ATTENTION: ([1, None, None], "float32"),
                 names.POSITION_IDS: ([1, None], i64), names.REDUCED_POSITION_IDS: ([1, None], i64),
                 names.INPUT_IDS_BEFORE: ([1, None], i64), names.KEPT: ([1, None], i64),
                 names.PAST_LENGTH: ([1], i64), names.LOGITS: ([1, self.vocab], f)}
        cache = ([1, self.kv_heads, None, self.head_dim], f)
        return {name: known.get(name, cache) for name in [*inputs, *outputs]}

    def check_io(self, graph: str, tensors: list[tuple[str, list, object]], max_seq_len: int | None = None) -> None:
        """A graph's own I/O (name, shape, dtype), as the backend loaded it, against `expected_io`; and the
        max_seq_len the graph records (ONNX metadata, a TensorRT profile's max), if it records one."""
        found = {name: ([d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else None for d in shape]
                        if isinstance(shape, (list, tuple)) else None, dtype_name(t)) for name, shape, t in tensors}
        expected = self.expected_io(graph)
        extra = sorted(set(found) - set(expected), key=str)
        if extra:
            raise BuildError(f"{graph}: the graph has {len(extra)} tensor(s) this build's manifest does not imply, "
                             f"e.g. {extra[0]!r} (source.text.layers changed?)")
        for name, (shape, dtype) in expected.items():
            if name not in found:
                raise BuildError(f"{graph}: the graph has no {name!r}, which this build's manifest implies")
            got_shape, got_dtype = found[name]
            fits = got_shape is not None and len(got_shape) == len(shape) and all(e is None or e == g for e, g in zip(shape, got_shape))
            if not fits or got_dtype != dtype:
                want = [e if e is not None else "*" for e in shape]
                got = [g if g is not None else "*" for g in got_shape or []]
                raise BuildError(f"{graph}.{name}: the graph takes {got_dtype} {got}, but the manifest implies {dtype} {want} "
                                 f"(precision, preprocess crop_size, schedule or source.text changed?)")
        if max_seq_len is not None and max_seq_len != self.max_seq_len:
            raise BuildError(f"manifest: max_seq_len {self.max_seq_len} differs from the {max_seq_len} {graph} was built for")

    def check_listed_io(self) -> None:
        """The graphs' I/O as the manifest lists it (what `--from-onnx` makes engine profiles from) against `expected_io`."""
        for graph in self.graph_names:
            entry = (self.manifest.get("graphs") or {}).get(graph)
            lists = [entry.get(key) for key in ("inputs", "outputs")] if isinstance(entry, dict) else [None]
            if not all(isinstance(t, list) and all(isinstance(x, dict) for x in t) for t in lists):
                raise BuildError(f"manifest: graphs.{graph} must list inputs and outputs as {{name, shape, dtype}} entries")
            self.check_io(graph, [(x.get("name"), x.get("shape"), x.get("dtype")) for t in lists for x in t])

    @property
    def graph_names(self) -> list[str]:
        """Every graph of this build, in running order (`runtime.names.graph_names`)."""
        return names.graph_names(self.plan, names.EMBED in (self.manifest.get("graphs") or {}))

    @property
    def engines(self) -> dict:
        """The manifest's TensorRT engine entries ({} when the build has none)."""
        return self.manifest.get("engines") or {}

    @property
    def tensorrt(self) -> dict:
        """The manifest's TensorRT section: flavour, version, compute capabilities ({} when the build has none)."""
        return self.manifest.get("tensorrt") or {}

    @property
    def tensorrt_flavour(self) -> str | None:
        """"tensorrt" or "tensorrt-rtx": the flavour the engines were built with (None without engines)."""
        return self.tensorrt.get("flavour") if self.engines else None

    @property
    def weights(self) -> str | None:
        """"int8" / "int4" for a build with weight-only quantized linears, else None (float weights)."""
        return (self.manifest.get("quantization") or {}).get("weights")

    @property
    def parity(self) -> dict | None:
        """The verification record (None for a --no-verify build)."""
        return self.manifest.get("parity")

    @property
    def image_token(self) -> str:
        """The tokenizer's image placeholder token."""
        return (self.manifest.get("tokenizer") or {}).get("image_token") or "<image>"

    def path(self, kind: str, graph: str) -> Path:
        """The file of graph `graph` in `kind` ("graphs": ONNX, "engines": TensorRT), a plain name inside the build."""
        entries = self.manifest.get(kind) or {}
        if graph not in entries:
            raise BuildError(f"{str(self.directory)!r} has no {graph} in its manifest's {kind!r}")
        return self.directory / plain_name(entries[graph]["file"], f"{kind}.{graph}")

    def check(self, kind: str) -> None:
        """sha256 of the files of `kind` ("graphs", "engines" or "tokenizer") against the manifest."""
        entries = tokenizer_files(self.manifest) if kind == "tokenizer" else self.manifest.get(kind) or {}
        if not entries:
            raise BuildError(f"{str(self.directory)!r} lists no {kind} in its manifest")
        check_files(self.directory, entries, kind)
