"""Compile the exported ONNX graphs into TensorRT engines, for standard TensorRT or TensorRT-RTX.

One code path, the raw builder API of the module ``load_flavour`` imported: parse the ONNX from
file (so external data works), add one optimization profile, check the precision, build, write the
engine atomically. Supported: standard TensorRT 10.x and TensorRT-RTX 1.x (``load_flavour`` refuses
others in one line; JetPack 6.0's TensorRT 8.6 cannot parse these graphs). The flavour-specific
parts are small functions:

* ``_network_flags`` / ``_apply_precision``: both flavours build strongly typed, so every tensor
  keeps the type the ONNX gives it: standard TensorRT with the ``STRONGLY_TYPED`` network flag
  (weak typing is deprecated from TensorRT 10.12), TensorRT-RTX always (its flag is deprecated and
  ignored). No FP16/BF16 builder flags, no per-layer precisions: the exporter writes an fp16/bf16
  ONNX whose fp32 parts (FiCoCo's scores, TopK and merges, norms, softmax) are explicit casts, and
  ``_check_strong_types`` refuses a network whose float types do not match ``EngineSpec.precision``.
* ``_apply_compute_capabilities``: RTX builds ahead of time, GPU-less, for the targets given, or for
  the GPU it runs on ("current"). RTX 1.7 knows 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; none given means its
  default set. On 7.5 (Turing) RTX has no fp32 GEMM: fp32 builds with a MatMul fail there, fp16 ones
  work. Standard TensorRT builds for the local GPU. Either way the report names the actual compute
  capability where a GPU is visible (``runtime.device``).

Importing TensorRT (``load_flavour``, ``Flavour``), its install hints, its logger and
``BackendNotInstalledError`` are the runtime's (``runtime/trtlib.py``, ``runtime/errors.py``): one
TensorRT layer for building and running engines. During ``build_engine`` TensorRT's warnings and
errors go to its ``log`` callable (``build.log`` in ``export.build``); an ``EngineBuildError`` carries
the parser's or builder's errors in its one-line message, and a build's report records the ONNX
parser's own error count (``parser_errors``: 0, as any parser error stops the build).

Polygraphy's loaders also build RTX engines here (with ``sys.modules["tensorrt_rtx"] =
tensorrt_rtx_bindings`` and ``POLYGRAPHY_USE_TENSORRT_RTX=1``), but Polygraphy fixes the module for
the whole process from that variable at import, and RTX needs another config class
(``CreateConfigRTX``); this module follows the ``Flavour`` it is given instead.
"""

from __future__ import annotations

import hashlib
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

from runtime.device import driver
from runtime.errors import (  # noqa: F401  (re-exported: the export's callers import them from here)
    TENSORRT,
    TENSORRT_RTX,
    BackendNotInstalledError,
    UnsupportedVersionError,
)
from runtime.trtlib import BACKENDS, Flavour, load_flavour, logger, routed  # noqa: F401  (re-exported)

PRECISIONS = ("fp32", "fp16", "bf16")
CURRENT = "current"  # EngineSpec.compute_capabilities: the GPU the build runs on (TensorRT-RTX's ComputeCapability.CURRENT)

_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8"}

Shape = tuple[int, ...]
Log = Callable[[str], Any]


class EngineBuildError(RuntimeError):
    """Parsing or building failed; ``errors`` holds the parser or builder messages. Nothing is written.

    The message is one line: the summary, then the first errors (all of them are in ``errors``)."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        self.errors = [" ".join(str(e).split()) for e in errors]
        shown = "; ".join(self.errors[:3]) + (f"; and {len(self.errors) - 3} more" if len(self.errors) > 3 else "")
        super().__init__(f"{message}: {shown}" if shown else message)


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

    ``compute_capabilities`` (e.g. ("8.6", "8.9", "12.0"), or ("current",) for the local GPU) only
    applies to TensorRT-RTX; empty means RTX's default set. ``precision`` is checked against the
    network's own float types (both flavours build strongly typed).
    """

    onnx_path: Path
    engine_path: Path
    profiles: Mapping[str, Profile] = field(default_factory=dict, hash=False)
    precision: str = "fp32"
    compute_capabilities: tuple[str, ...] = ()

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
        bad = [c for c in ccs if not re.fullmatch(r"\d+\.\d+", c)] if ccs != (CURRENT,) else []
        if bad or len(set(ccs)) != len(ccs):
            raise ValueError(f"compute capabilities must be distinct 'major.minor' strings (or just {CURRENT!r}), got {ccs}")
        object.__setattr__(self, "compute_capabilities", ccs)


def _network_flags(flavour: Flavour) -> int:
    """Network creation flags: STRONGLY_TYPED for standard TensorRT; none for TensorRT-RTX (always strongly typed)."""
    if flavour.is_rtx:
        return 0
    return 1 << int(flavour.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def parser_errors(parser: Any) -> list[str]:
    """The ONNX parser's errors after a parse, one line each: "node 3 name (Op): description [function]"."""
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()} {err.node_name()} ({err.node_operator()}): " if err.node() >= 0 else ""
        errors.append(f"{where}{err.desc()} [{err.func()}]")
    return errors


def _parse(flavour: Flavour, builder: Any, spec: EngineSpec) -> tuple[Any, Any]:
    """Parse the ONNX from file into (network, parser); EngineBuildError listing every parser error.

    Any error stops the build, even one the parser reports beside a successful parse."""
    network = builder.create_network(_network_flags(flavour))
    parser = flavour.module.OnnxParser(network, builder.logger)
    ok = parser.parse_from_file(str(spec.onnx_path))
    errors = parser_errors(parser)
    if errors or not ok:
        raise EngineBuildError(f"{flavour.name} could not parse {spec.onnx_path}",
                               errors or ["the parser failed without reporting an error"])
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


def _check_strong_types(flavour: Flavour, network: Any, spec: EngineSpec) -> None:
    """Strongly typed builds (both flavours): the network's own float types must match spec.precision."""
    types = _floats(flavour.module)
    found = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        found.update(layer.get_output(j).dtype for j in range(layer.num_outputs))
    floats = found & set(types.values())
    if types[spec.precision] not in floats or (spec.precision == "fp32" and floats != {types["fp32"]}):
        names = sorted(_DTYPES[d.name] for d in floats)
        raise EngineBuildError(
            f"{flavour.name} builds strongly typed: it takes precisions from the ONNX, whose float tensors are "
            f"{names}, but precision {spec.precision!r} was asked for; export {spec.onnx_path.name} in "
            f"{spec.precision}" + ("" if spec.precision == "fp32" else " (fp32 parts as explicit casts)")
        )


def _apply_precision(flavour: Flavour, config: Any, network: Any, spec: EngineSpec, log: Log) -> None:
    """Strongly typed (both flavours): no precision flags to set; the network's types must be spec.precision's."""
    _check_strong_types(flavour, network, spec)
    log(f"[{flavour.name}] strongly typed {spec.precision}: tensor types as in {spec.onnx_path.name}")


def _local_capability() -> str | None:
    """The compute capability of the GPU this process sees (device 0), or None without one."""
    found = driver()
    return found.compute_capability if found else None


def _apply_compute_capabilities(flavour: Flavour, config: Any, spec: EngineSpec, log: Log) -> list[str]:
    """Target compute capabilities for RTX; return what the engine is built for (the local GPU's, where known)."""
    if not flavour.is_rtx:
        if spec.compute_capabilities:
            log(f"[{flavour.name}] compute capabilities {spec.compute_capabilities} ignored: builds for the local GPU")
        return [_local_capability() or "local"]
    if not spec.compute_capabilities:
        return ["default"]
    enum = flavour.module.ComputeCapability
    names = ["CURRENT" if c == CURRENT else "SM" + c.replace(".", "") for c in spec.compute_capabilities]
    missing = [c for c, n in zip(spec.compute_capabilities, names) if not hasattr(enum, n)]
    if missing:
        known = [f"{m[2:-1]}.{m[-1]}" for m in enum.__members__ if m.startswith("SM")]
        raise EngineBuildError(f"{flavour.name} {flavour.version} cannot target {missing}; it knows {known}")
    config.num_compute_capabilities = len(names)
    for i, name in enumerate(names):
        if not config.set_compute_capability(getattr(enum, name), i):
            raise EngineBuildError(f"{flavour.name} refused compute capability {spec.compute_capabilities[i]}")
    if spec.compute_capabilities == (CURRENT,):
        return [_local_capability() or CURRENT]
    return list(spec.compute_capabilities)


def supported_compute_capabilities(flavour: Flavour) -> tuple[str, ...]:
    """The compute capabilities TensorRT-RTX can target ("7.5", ..., "12.1"); () for standard TensorRT,
    which builds for the local GPU. export.build checks --compute-capability against it before exporting."""
    if not flavour.is_rtx:
        return ()
    return tuple(f"{m[2:-1]}.{m[-1]}" for m in flavour.module.ComputeCapability.__members__ if m.startswith("SM"))


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


def build_engine(spec: EngineSpec, flavour: Flavour, log: Log = print, base: Path | None = None) -> dict[str, Any]:
    """Parse ``spec.onnx_path``, build an engine with ``flavour`` and write it to ``spec.engine_path``.

    Raises EngineBuildError (nothing written) on parser errors, a profile that does not fit
    the network, a precision the network does not have, or a failed build. TensorRT's warnings and
    errors go to ``log`` during the build (``runtime.trtlib.routed``). The report's ``trtexec`` line
    has paths relative to ``base`` (a build directory) when given. Builds in one process must not
    overlap (they share the flavour's logger).
    """
    if not spec.onnx_path.is_file():
        raise FileNotFoundError(spec.onnx_path)
    start = time.perf_counter()
    with routed(logger(flavour.module, flavour.name), log) as trt_logger:
        builder = flavour.module.Builder(trt_logger)
        network, parser = _parse(flavour, builder, spec)
        config = builder.create_builder_config()
        _add_profile(flavour, builder, config, network, spec)
        _apply_precision(flavour, config, network, spec, log)
        targets = _apply_compute_capabilities(flavour, config, spec, log)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"{flavour.name} could not build {spec.onnx_path}", trt_logger.errors)
    data = memoryview(serialized).cast("B")
    _write_atomically(spec.engine_path, data)
    seconds = time.perf_counter() - start
    log(f"[{flavour.name}] {spec.engine_path} ({data.nbytes} bytes) built in {seconds:.1f}s")
    return {
        "flavour": flavour.name,
        "version": flavour.version,
        "parser_errors": int(parser.num_errors),  # the parser's own count: 0, or _parse would have raised
        "seconds": round(seconds, 3),
        "bytes": data.nbytes,
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": _io(network),
        "outputs": _io(network, outputs=True),
        "compute_capabilities": targets,
        "precision": spec.precision,
        "trtexec": trtexec_command(spec, flavour, targets, base),
    }


def _shapes(spec: EngineSpec, which: str) -> str:
    """trtexec shape syntax for one of min/opt/max: name:1x8x16,other:1x4."""
    return ",".join(f"{name}:{'x'.join(map(str, getattr(p, which)))}" for name, p in spec.profiles.items())


def trtexec_command(spec: EngineSpec, flavour: Flavour, targets: Sequence[str] = (), base: Path | None = None) -> str:
    """The command line equivalent to ``build_engine`` (``trtexec``, or ``tensorrt_rtx`` for RTX).

    ``targets``: the compute capabilities the engine was built for (``build_engine``'s report); an RTX
    build for the current GPU names the GPU's. ``base``: paths are written relative to it, so the
    line runs from that directory (a build's commands run from the build directory).
    """
    def where(path: Path) -> str:
        return os.path.relpath(path, base) if base is not None else str(path)

    args = ["tensorrt_rtx" if flavour.is_rtx else "trtexec", f"--onnx={where(spec.onnx_path)}",
            f"--saveEngine={where(spec.engine_path)}"]
    if spec.profiles:
        args += [f"--{w}Shapes={_shapes(spec, w)}" for w in ("min", "opt", "max")]
    if flavour.is_rtx:
        # Always strongly typed. The comma list without dots ("86,120") is the form NVIDIA's
        # TensorRT-RTX docs show for --computeCapabilities.
        named = [c for c in (targets or spec.compute_capabilities) if re.fullmatch(r"\d+\.\d+", c)]
        if named:
            args.append("--computeCapabilities=" + ",".join(c.replace(".", "") for c in named))
    else:
        args.append("--stronglyTyped")  # precisions as in the ONNX, as build_engine builds
    args.append("--skipInference")  # build only, as build_engine does
    return " ".join(shlex.quote(a) for a in args)
