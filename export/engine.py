"""Compile the exported ONNX graphs into TensorRT engines, for standard TensorRT or TensorRT-RTX.

One code path, the raw builder API of the module ``load_flavour`` imported: parse the ONNX from
file (so external data works), add one optimization profile, set the precision, build, write the
engine atomically. The flavour-specific parts are small functions:

* ``_apply_precision``: standard TensorRT is weakly typed; fp16/bf16 set the builder flag and pin
  NORMALIZATION/SOFTMAX layers (and names matching ``EngineSpec.fp32_layers``) to fp32. TensorRT-RTX
  1.x is always strongly typed (no FP16/BF16 flags, no per-layer precision; ``STRONGLY_TYPED`` is
  deprecated and ignored): tensors keep their ONNX types, so the caller exports an fp16/bf16 ONNX
  with fp32 islands as explicit casts, and ``_check_strong_types`` refuses a network whose float
  types do not match ``EngineSpec.precision``.
* ``_apply_compute_capabilities``: RTX builds ahead of time, GPU-less, for the targets given. RTX
  1.7 knows 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; none given means its default set. On 7.5 (Turing) RTX
  has no fp32 GEMM: fp32 builds with a MatMul fail there, fp16 ones work. Standard TensorRT builds
  for the local GPU. ``_network_flags``: explicit batch on TensorRT < 10 only.

Polygraphy's loaders also build RTX engines here (with ``sys.modules["tensorrt_rtx"] =
tensorrt_rtx_bindings`` and ``POLYGRAPHY_USE_TENSORRT_RTX=1``), but Polygraphy fixes the module for
the whole process from that variable at import, and RTX needs another config class
(``CreateConfigRTX``); this module follows the ``Flavour`` it is given instead.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
BACKENDS = ("auto", TENSORRT, TENSORRT_RTX)
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_FP32_LAYERS = r"(?i)norm|softmax"

_INSTALL_HINT = {
    TENSORRT: "TensorRT is not installed (it ships with JetPack; on x86: pip install 'ficoco-edge[trt]')",
    TENSORRT_RTX: "TensorRT-RTX is not installed; install it with: pip install 'ficoco-edge[rtx]'",
}
# tensorrt_rtx_bindings: the pip wheels (the `rtx` extra); tensorrt_rtx: the SDK tarball's wheel.
_MODULES = {TENSORRT: ("tensorrt",), TENSORRT_RTX: ("tensorrt_rtx_bindings", "tensorrt_rtx")}
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8"}

Shape = tuple[int, ...]
Log = Callable[[str], Any]


class BackendNotInstalledError(ValueError):
    """The requested TensorRT flavour cannot be imported; the message names the extra to install."""


class EngineBuildError(RuntimeError):
    """Parsing or building failed; ``errors`` holds the parser or builder messages. Nothing is written."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        self.errors = list(errors)
        super().__init__("\n  ".join([message, *self.errors]))


@dataclass(frozen=True)
class Flavour:
    """An imported TensorRT flavour: ``name`` is "tensorrt" or "tensorrt-rtx"."""

    name: str
    module: ModuleType = field(compare=False, repr=False)
    version: str

    @property
    def is_rtx(self) -> bool:
        """Whether this is TensorRT-RTX (strongly typed, ahead-of-time compute capabilities)."""
        return self.name == TENSORRT_RTX


def _import_flavour(name: str) -> Flavour:
    """Import one flavour's module or raise BackendNotInstalledError with its install hint."""
    causes = []
    for module_name in _MODULES[name]:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError) as exc:  # OSError: a wheel whose shared libraries are missing
            causes.append(f"{module_name}: {exc}")
            continue
        return Flavour(name, module, str(getattr(module, "__version__", "unknown")))
    raise BackendNotInstalledError(f"{_INSTALL_HINT[name]} ({'; '.join(causes)})")


def load_flavour(backend: str = "auto") -> Flavour:
    """Import TensorRT: "tensorrt", "tensorrt-rtx", or "auto" (standard TensorRT first, then RTX)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown TensorRT backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return _import_flavour(backend)
    for name in (TENSORRT, TENSORRT_RTX):
        try:
            return _import_flavour(name)
        except BackendNotInstalledError:
            pass
    raise BackendNotInstalledError(
        "neither TensorRT nor TensorRT-RTX is installed; install one with pip install 'ficoco-edge[trt]' "
        "(TensorRT; JetPack ships it) or pip install 'ficoco-edge[rtx]' (TensorRT-RTX)"
    )


@dataclass(frozen=True)
class Profile:
    """The (min, opt, max) shapes of one input for an optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        shapes = [tuple(int(d) for d in s) for s in (self.min, self.opt, self.max)]
        for name, shape in zip(("min", "opt", "max"), shapes):
            object.__setattr__(self, name, shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"profile {name} shape {shape} has a negative dimension")
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(f"profile shapes differ in rank: {shapes}")
        if not all(a <= b <= c for a, b, c in zip(*shapes)):
            raise ValueError(f"profile needs min <= opt <= max in every dimension: {shapes}")

    @classmethod
    def of(cls, value: Profile | Sequence[Sequence[int]]) -> Profile:
        """A Profile from a Profile or a (min, opt, max) triple of shapes."""
        if isinstance(value, Profile):
            return value
        if len(value) != 3:
            raise ValueError(f"a profile is (min, opt, max) shapes, got {value!r}")
        return cls(*(tuple(s) for s in value))


@dataclass(frozen=True)
class EngineSpec:
    """What to build. ``profiles``: input name -> (min, opt, max); static inputs need none.

    ``compute_capabilities`` (e.g. ("8.6", "8.9", "12.0")) only applies to TensorRT-RTX; empty
    means RTX's default set. ``fp32_layers`` is a regex on layer names pinned to fp32 (besides
    every NORMALIZATION and SOFTMAX layer) in fp16/bf16 builds with standard TensorRT.
    """

    onnx_path: Path
    engine_path: Path
    profiles: Mapping[str, Profile] = field(default_factory=dict, hash=False)
    precision: str = "fp32"
    compute_capabilities: tuple[str, ...] = ()
    fp32_layers: str = DEFAULT_FP32_LAYERS

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        object.__setattr__(self, "engine_path", Path(self.engine_path))
        if self.onnx_path.resolve() == self.engine_path.resolve():
            raise ValueError("engine_path must differ from onnx_path")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in self.profiles:
            if not isinstance(name, str) or not name:
                raise ValueError(f"profile input names must be non-empty strings, got {name!r}")
        object.__setattr__(self, "profiles", {k: Profile.of(v) for k, v in self.profiles.items()})
        ccs = tuple(str(c) for c in self.compute_capabilities)
        bad = [c for c in ccs if not re.fullmatch(r"\d+\.\d+", c)]
        if bad or len(set(ccs)) != len(ccs):
            raise ValueError(f"compute capabilities must be distinct 'major.minor' strings, got {ccs}")
        object.__setattr__(self, "compute_capabilities", ccs)
        try:
            re.compile(self.fp32_layers)
        except re.error as exc:
            raise ValueError(f"fp32_layers is not a regular expression: {exc}") from None


@dataclass
class _Collector:
    """Routes a TensorRT logger's messages to the current build: errors kept, warnings logged."""

    errors: list[str] = field(default_factory=list)
    log: Log = print


_LOGGERS: dict[str, tuple[Any, _Collector]] = {}


def _logger(flavour: Flavour) -> tuple[Any, _Collector]:
    """One logger per flavour and process (TensorRT keeps the first logger it sees globally)."""
    if flavour.name not in _LOGGERS:
        trt, collector = flavour.module, _Collector()

        class _Logger(trt.ILogger):  # type: ignore[name-defined, misc]
            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= int(trt.ILogger.ERROR):
                    collector.errors.append(msg)
                if int(severity) <= int(trt.ILogger.WARNING):
                    collector.log(f"[{flavour.name}] {msg}")

        logger = _Logger()
        trt.ILogger.__init__(logger)
        _LOGGERS[flavour.name] = (logger, collector)
    return _LOGGERS[flavour.name]


def _network_flags(flavour: Flavour) -> int:
    """Network creation flags: explicit batch before TensorRT 10 (the default, and the only mode, since)."""
    flag = getattr(flavour.module.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    major = int(re.match(r"\d*", flavour.version).group() or 0)
    return 1 << int(flag) if flag is not None and not flavour.is_rtx and major < 10 else 0


def _parse(flavour: Flavour, builder: Any, spec: EngineSpec) -> tuple[Any, Any]:
    """Parse the ONNX from file into a network; EngineBuildError listing every parser error."""
    network = builder.create_network(_network_flags(flavour))
    parser = flavour.module.OnnxParser(network, builder.logger)
    ok = parser.parse_from_file(str(spec.onnx_path))
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()} {err.node_name()} ({err.node_operator()}): " if err.node() >= 0 else ""
        errors.append(f"{where}{err.desc()} [{err.func()}]")
    if errors or not ok:
        raise EngineBuildError(f"{flavour.name} could not parse {spec.onnx_path}", errors or ["unknown parser failure"])
    return network, parser


def _io(network: Any, outputs: bool = False) -> list[dict[str, Any]]:
    """The network's inputs (or outputs): name, dtype, shape with -1 for dynamic dimensions."""
    count = network.num_outputs if outputs else network.num_inputs
    tensors = [network.get_output(i) if outputs else network.get_input(i) for i in range(count)]
    return [
        {"name": t.name, "dtype": _DTYPES.get(t.dtype.name, t.dtype.name.lower()), "shape": [int(d) for d in t.shape]}
        for t in tensors
    ]


def _add_profile(flavour: Flavour, builder: Any, config: Any, network: Any, spec: EngineSpec) -> None:
    """Check ``spec.profiles`` against the network's inputs, then add them as one optimization profile."""
    inputs = {t["name"]: t["shape"] for t in _io(network)}
    problems = [f"profile for unknown input {n!r} (inputs: {sorted(inputs)})" for n in spec.profiles if n not in inputs]
    for name, shape in inputs.items():
        prof = spec.profiles.get(name)
        if prof is None:
            if -1 in shape:
                problems.append(f"input {name!r} has dynamic shape {shape} but no profile")
            continue
        for which in (prof.min, prof.opt, prof.max):
            if len(which) != len(shape) or any(s != -1 and s != w for s, w in zip(shape, which)):
                problems.append(f"profile shape {list(which)} does not fit input {name!r} of shape {shape}")
    if problems:
        raise EngineBuildError(f"bad optimization profile for {spec.onnx_path}", problems)
    if spec.profiles:
        profile = builder.create_optimization_profile()
        for name, prof in spec.profiles.items():
            profile.set_shape(name, prof.min, prof.opt, prof.max)
        config.add_optimization_profile(profile)


def _floats(trt: ModuleType) -> dict[str, Any]:
    """The float DataTypes by precision name."""
    return {"fp32": trt.DataType.FLOAT, "fp16": trt.DataType.HALF, "bf16": trt.DataType.BF16}


def _pinned_layers(flavour: Flavour, network: Any, spec: EngineSpec) -> list[Any]:
    """Layers kept in fp32 in a weakly typed fp16/bf16 build: norms, softmax, names matching fp32_layers."""
    types = {flavour.module.LayerType.NORMALIZATION, flavour.module.LayerType.SOFTMAX}
    pattern = re.compile(spec.fp32_layers)
    floats = set(_floats(flavour.module).values())
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [
        layer
        for layer in layers
        if (layer.type in types or pattern.search(layer.name))
        and any(layer.get_output(j).dtype in floats for j in range(layer.num_outputs))
    ]


def _check_strong_types(flavour: Flavour, network: Any, spec: EngineSpec) -> None:
    """For strongly typed TensorRT-RTX: the network's own float types must match spec.precision."""
    types = _floats(flavour.module)
    found = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        found.update(layer.get_output(j).dtype for j in range(layer.num_outputs))
    floats = found & set(types.values())
    if types[spec.precision] not in floats or (spec.precision == "fp32" and floats != {types["fp32"]}):
        names = sorted(_DTYPES[d.name] for d in floats)
        raise EngineBuildError(
            f"{flavour.name} is strongly typed: it takes precisions from the ONNX, whose float tensors are "
            f"{names}, but precision {spec.precision!r} was asked for; export {spec.onnx_path.name} in "
            f"{spec.precision}" + ("" if spec.precision == "fp32" else " (fp32 parts as explicit casts)")
        )


def _apply_precision(flavour: Flavour, config: Any, network: Any, spec: EngineSpec, log: Log) -> list[str]:
    """Set the precision; return the names of layers pinned to fp32 (standard TensorRT only)."""
    if flavour.is_rtx:
        _check_strong_types(flavour, network, spec)
        return []
    if spec.precision == "fp32":
        return []
    trt = flavour.module
    flag = getattr(trt.BuilderFlag, spec.precision.upper(), None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {flavour.version} has no {spec.precision} builder flag")
    config.set_flag(flag)
    obey = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None)
    if obey is not None:
        config.set_flag(obey)
    pinned = _pinned_layers(flavour, network, spec)
    for layer in pinned:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in _floats(trt).values():
                layer.set_output_type(j, trt.float32)
    log(f"[{flavour.name}] {spec.precision}: {len(pinned)} layers pinned to fp32")
    return [layer.name for layer in pinned]


def _apply_compute_capabilities(flavour: Flavour, config: Any, spec: EngineSpec, log: Log) -> list[str]:
    """Target compute capabilities for RTX; return what the engine is built for."""
    if not flavour.is_rtx:
        if spec.compute_capabilities:
            log(f"[{flavour.name}] compute capabilities {spec.compute_capabilities} ignored: builds for the local GPU")
        return ["local"]
    if not spec.compute_capabilities:
        return ["default"]
    enum = flavour.module.ComputeCapability
    names = ["SM" + c.replace(".", "") for c in spec.compute_capabilities]
    missing = [c for c, n in zip(spec.compute_capabilities, names) if not hasattr(enum, n)]
    if missing:
        known = [f"{m[2:-1]}.{m[-1]}" for m in enum.__members__ if m.startswith("SM")]
        raise EngineBuildError(f"{flavour.name} {flavour.version} cannot target {missing}; it knows {known}")
    config.num_compute_capabilities = len(names)
    for i, name in enumerate(names):
        if not config.set_compute_capability(getattr(enum, name), i):
            raise EngineBuildError(f"{flavour.name} refused compute capability {spec.compute_capabilities[i]}")
    return list(spec.compute_capabilities)


def _write_atomically(path: Path, data: memoryview) -> None:
    """Write data to a temp file next to path, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp, keeps the umask's permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_engine(spec: EngineSpec, flavour: Flavour, log: Log = print) -> dict[str, Any]:
    """Parse ``spec.onnx_path``, build an engine with ``flavour`` and write it to ``spec.engine_path``.

    Raises EngineBuildError (nothing written) on parser errors, a profile that does not fit
    the network, a precision the (RTX) network does not have, or a failed build. Builds in one
    process must not overlap (they share the flavour's logger).
    """
    if not spec.onnx_path.is_file():
        raise FileNotFoundError(spec.onnx_path)
    logger, collector = _logger(flavour)
    collector.errors, collector.log = [], log
    start = time.perf_counter()
    builder = flavour.module.Builder(logger)
    network, _parser = _parse(flavour, builder, spec)
    config = builder.create_builder_config()
    _add_profile(flavour, builder, config, network, spec)
    pinned = _apply_precision(flavour, config, network, spec, log)
    targets = _apply_compute_capabilities(flavour, config, spec, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{flavour.name} could not build {spec.onnx_path}", collector.errors)
    data = memoryview(serialized).cast("B")
    _write_atomically(spec.engine_path, data)
    seconds = time.perf_counter() - start
    log(f"[{flavour.name}] {spec.engine_path} ({data.nbytes} bytes) built in {seconds:.1f}s")
    return {
        "flavour": flavour.name,
        "version": flavour.version,
        "parser_errors": 0,
        "seconds": round(seconds, 3),
        "bytes": data.nbytes,
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": _io(network),
        "outputs": _io(network, outputs=True),
        "compute_capabilities": targets,
        "precision": spec.precision,
        "trtexec": trtexec_command(spec, flavour, pinned),
    }


def _shapes(spec: EngineSpec, which: str) -> str:
    """trtexec shape syntax for one of min/opt/max: name:1x8x16,other:1x4."""
    return ",".join(f"{name}:{'x'.join(map(str, getattr(p, which)))}" for name, p in spec.profiles.items())


def trtexec_command(spec: EngineSpec, flavour: Flavour, fp32_layers: Sequence[str] = ()) -> str:
    """The command line equivalent to ``build_engine`` (``trtexec``, or ``tensorrt_rtx`` for RTX).

    ``fp32_layers``: layer names pinned to fp32 (``build_engine`` passes those it pinned); they are
    only known after parsing, so without them a standard fp16/bf16 command ends in a shell comment.
    """
    args = ["tensorrt_rtx" if flavour.is_rtx else "trtexec", f"--onnx={spec.onnx_path}", f"--saveEngine={spec.engine_path}"]
    if spec.profiles:
        args += [f"--{w}Shapes={_shapes(spec, w)}" for w in ("min", "opt", "max")]
    note = ""
    if flavour.is_rtx:
        # Strongly typed, so no precision flags. The comma list without dots ("86,120") is the
        # form NVIDIA's TensorRT-RTX docs show for --computeCapabilities.
        if spec.compute_capabilities:
            args.append("--computeCapabilities=" + ",".join(c.replace(".", "") for c in spec.compute_capabilities))
    elif spec.precision != "fp32":
        args += [f"--{spec.precision}", "--precisionConstraints=obey"]
        if fp32_layers:
            args.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers))
            args.append("--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32_layers))
        else:
            note = "  # add --layerPrecisions=<layer>:fp32 for each norm/softmax layer"
    args.append("--skipInference")  # build only, as build_engine does
    return " ".join(shlex.quote(a) for a in args) + note
