"""What a user asked `export.build` for, validated (no torch until `check_model`, which a full build runs)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from dataclasses import dataclass
from pathlib import Path

from ficoco.config import FiCoCoConfig
from ficoco.plan import BuildPlan, default_max_seq_len

VARIANTS = ("v", "l", "vl", "none")
PRECISIONS = ("fp32", "fp16", "bf16")
WEIGHTS = ("fp32", "fp16", "int8", "int4")  # int: weight-only, the LLM's linear layers (export/quantize.py)
QUANT_METHODS = ("rtn", "hqq")
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "none")
DEFAULT_COMPUTE_CAPABILITIES = ("8.6", "8.9", "12.0")  # Ampere RTX, Ada, Blackwell RTX


def parse_grid(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"--grid must look like 2x2 (rows x cols of 336 px crops), got {text!r}")
    return int(match[1]), int(match[2])


def parse_capability(text: str) -> str:
    match = re.fullmatch(r"(?:sm_?|SM)?(\d+)\.?(\d)", text)
    if not match:
        raise ValueError(f"--compute-capability takes values like 8.6, 87 or sm_120, got {text!r}")
    return f"{int(match[1])}.{match[2]}"


@dataclass(frozen=True)
class BuildRequest:
    model: str = "tiny-llava-1.5"
    variant: str = "v"
    ratio: float | None = None
    tokens: int | None = None
    tflops: float | None = None  # a prefill budget; resolved to `tokens` once the model is loaded
    out: Path | None = None
    precision: str = "fp32"
    backend: str = "auto"
    compute_capabilities: tuple[str, ...] = DEFAULT_COMPUTE_CAPABILITIES
    max_seq_len: int | None = None  # None: the model's default (`ficoco.plan.default_max_seq_len`), set by check_model
    allow_parity_failure: bool = False  # verify, publish even if it fails (marked failed in the manifest)
    verify: bool = True  # False: --no-verify, no parity check at all
    grid: tuple[int, int] = (2, 2)
    grid_given: bool = False
    weights: str | None = None  # None: the precision's float weights
    block_size: int = 32  # int4: input elements per scale
    quant_method: str = "rtn"
    quantize_vision: bool = False  # int8/int4 also on the vision tower's linear layers

    @property
    def quantized(self) -> bool:
        return self.weights in ("int8", "int4")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "none" and (self.ratio not in (None, 1.0) or self.tokens is not None):
            raise ValueError(f"--variant none keeps every token; drop --ratio {self.ratio} / --tokens {self.tokens}")
        if self.variant != "none" and sum(x is not None for x in (self.ratio, self.tokens, self.tflops)) != 1:
            raise ValueError("give exactly one of --ratio, --tokens and --tflops")
        if self.tflops is not None and self.tflops <= 0:
            raise ValueError(f"--tflops must be > 0, got {self.tflops}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_seq_len is not None and not 16 <= self.max_seq_len <= 131072:
            raise ValueError(f"--max-seq-len must be in [16, 131072], got {self.max_seq_len}")
        if self.precision == "bf16" and self.verify:
            raise ValueError("--precision bf16 cannot be verified on ONNX Runtime's CPU provider (no bf16 kernels); add --no-verify")
        self._check_weights()
        if self.tflops is None:
            self.ficoco_config()  # validates ratio / tokens

    def _check_weights(self) -> None:
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"--weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights in ("fp32", "fp16") and self.weights != self.precision:
            raise ValueError(f"--weights {self.weights} with --precision {self.precision}: float weights are the graphs' "
                             f"precision; use --precision {self.weights}")
        if self.quantized and self.precision == "bf16":
            raise ValueError(f"--weights {self.weights} needs --precision fp32 or fp16 activations, got bf16")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.quant_method not in QUANT_METHODS:
            raise ValueError(f"--quant-method must be one of {QUANT_METHODS}, got {self.quant_method!r}")
        if self.quant_method == "hqq" and self.weights != "int4":
            raise ValueError(f"--quant-method hqq applies to --weights int4, got --weights {self.weights}")
        if (self.quantize_vision or self.quant_method != "rtn") and not self.quantized:
            raise ValueError("--quantize-vision and --quant-method apply to --weights int8 / int4")

    def ficoco_config(self) -> FiCoCoConfig:
        """The FiCoCo setting; `none` is ratio 1 (an empty schedule) with the same static layout."""
        if self.variant == "none":
            return FiCoCoConfig("v", ratio=1.0, crop_layout="crops")
        return FiCoCoConfig(self.variant, ratio=self.ratio, tokens=self.tokens, crop_layout="crops")

    def default_out(self) -> Path:
        name = Path(self.model).name if Path(self.model).exists() else self.model
        amount = ("" if self.variant == "none" else f"-r{self.ratio:g}" if self.ratio is not None
                  else f"-t{self.tokens}" if self.tokens is not None else f"-{self.tflops:g}tflops")
        weights = f"-{self.weights}" if self.quantized else ""
        return Path("builds") / f"{name}-{self.variant}{amount}-{self.precision}{weights}"

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.default_out()


# ------------------------------------------------------------------ checks before the first heavy stage


def check_targets(request: BuildRequest, flavour) -> None:
    """TensorRT-RTX builds only for the compute capabilities it knows: refuse others before any export."""
    if flavour is None or not flavour.is_rtx:
        return
    from .engine import CURRENT, supported_compute_capabilities

    known = supported_compute_capabilities(flavour)
    unknown = [c for c in request.compute_capabilities if c not in (*known, CURRENT)]
    if unknown:
        jetson = (" (8.7 is Jetson Orin: compile its engines on the device with standard TensorRT, "
                  "python -m export.build --from-onnx BUILD --backend tensorrt)") if "8.7" in unknown else ""
        raise ValueError(f"--compute-capability {' '.join(unknown)}: {flavour.name} {flavour.version} cannot target "
                         f"{'it' if len(unknown) == 1 else 'them'}; it supports {', '.join(known)}{jetson}")


class SequenceLengthError(ValueError):
    """--max-seq-len cannot hold a sequence the build traces or verifies; the message names both lengths."""


@dataclass(frozen=True)
class ModelCheck:
    """What `check_model` resolved from the model's config.json and processor files, before any weights load."""

    source: Path  # the checkpoint directory
    request: BuildRequest  # with --tflops resolved to --tokens
    budget: float | None  # the --tflops it was resolved from
    plan: BuildPlan  # the one plan of the build: the export traces it, the manifest holds it
    tied: bool  # the LM head is the input embedding table: no embed graph


def check_model(request: BuildRequest) -> ModelCheck:
    """The model against the request, from its files and config.json only (no weights loaded). `resolve_model_dir`
    checks the files; here the plan (--ratio/--tokens/--tflops against the patch count and layers, --grid
    against the anyres grids, --max-seq-len against the positions and the prompts the build runs)."""
    from transformers import AutoConfig

    from ficoco import plan as build_plan
    from ficoco.geometry import anyres_grids, config_geometry, text_geometry
    from ficoco.analysis.memory import tied_embeddings
    from ficoco.models.presets import ModelSourceError, resolve_model_dir

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        source = resolve_model_dir(request.model)  # a preset's first use builds it: its progress bars are noise
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        settings = config.to_dict()
        for read_shapes in (config_geometry, text_geometry):  # what the plan reads: a KeyError where it is missing
            read_shapes(settings)
        next_model = bool(anyres_grids(settings))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelSourceError(f"{source / 'config.json'}: not a usable LLaVA config: {' '.join(str(error).split())[:200]}") from None
    positions = settings["text_config"].get("max_position_embeddings")
    grid = request.grid if next_model or request.grid_given else None  # LLaVA-1.5 with --grid: refused by the plan
    if request.max_seq_len is None:  # the default: an unreduced image at the build's grid and room to answer
        default = default_max_seq_len(settings, grid)
        request = dataclasses.replace(request, max_seq_len=min(default, positions) if isinstance(positions, int) else default)
    if isinstance(positions, int) and request.max_seq_len > positions:
        raise ValueError(f"--max-seq-len {request.max_seq_len} is more than the model's {positions} positions "
                         "(text_config.max_position_embeddings)")
    resolved = resolve_budget(request, settings, grid)
    plan = build_plan(settings, resolved.ficoco_config(), grid, max_seq_len=request.max_seq_len)  # ValueError naming values
    from .trace.pipeline import prompt_lengths  # the prompts need the processor (torch side)

    prompts, new_tokens = prompt_lengths(source, config.image_token_id, request.verify)
    check_sequence(request.max_seq_len, plan, prompts, new_tokens, positions)
    return ModelCheck(source, resolved, request.tflops, plan, tied_embeddings(settings))


def resolve_budget(request: BuildRequest, settings: dict, grid: tuple[int, int] | None) -> BuildRequest:
    """--tflops B -> the most visual tokens per crop whose prefill fits B (ficoco.analysis.flops convention)."""
    if request.tflops is None:
        return request
    from ficoco.analysis.flops import tokens_for_budget

    tokens = tokens_for_budget(settings, request.tflops, request.variant, grid=grid)
    print(f"--tflops {request.tflops:g}: {tokens} visual tokens per crop", flush=True)
    return dataclasses.replace(request, tokens=tokens, tflops=None)


def check_sequence(max_seq_len: int, plan: BuildPlan, prompts: list[tuple[int, int]], new_tokens: int,
                   positions: int | None = None) -> None:
    """The longest of `prompts` ((text tokens before, after the image)) at layer 0, its text around the plan's
    visual tokens, plus the `new_tokens` the verification generates, must fit --max-seq-len."""
    before, after = max(prompts, key=lambda p: plan.prompt_length(*p))
    longest = plan.prompt_length(before, after)
    need = longest + new_tokens
    if need <= max_seq_len:
        return
    generated = f" + {new_tokens} tokens the verification generates" if new_tokens else ""
    hint = f"give --max-seq-len {need} or more" if positions is None or need <= positions else (
        f"the model has {positions} positions: keep fewer visual tokens before the LLM (--variant v or vl)")
    raise SequenceLengthError(
        f"--max-seq-len {max_seq_len} is shorter than the {need} tokens this build needs: a prompt of {longest} tokens "
        f"at layer 0 ({before + after} text + {plan.visual_tokens} visual){generated}; {hint}")
