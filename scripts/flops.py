"""Analytic FLOPs of LLaVA under a FiCoCo schedule, the token budget search, and an ONNX cross-check.

    python scripts/flops.py --model llava-1.5-7b                 # vanilla vs the paper, FiCoCo budgets
    python scripts/flops.py --model llava-1.5-7b --tflops 1.5    # tokens kept (and schedule) for a budget
    python scripts/flops.py --all                                # the three paper models at once
    python scripts/flops.py --onnx builds/tiny-llava-1.5-v-r0.5-fp32   # ONNX graph count vs analytic

Convention (the paper's, `ficoco.analysis.flops`): 2 FLOPs per multiply-accumulate of
every linear layer plus Q K^T and A V over the full T x T matrix, LLM prefill
only, 576 visual tokens per 336 px crop and 60 text tokens. The visual tokens are
those a build with the setting runs (`ficoco.plan`, as the manifest's FLOPs):
LLaVA-NeXT counts the anyres grid of most crops (2x2 + base crop = 5 crops x 576)
plus one `image_newline` token per grid row, 2882 tokens (this project's crop
layout, without HF's unpadding): 42.64 TFLOPs (paper 42.7). Leaving the two
newline tokens out (2880, what this script counted before) gives 42.61; HF's
unpadded 672x672 layout (2928 tokens) 43.38. Budgets count the prefill, as the
paper's TFLOPs columns do for every variant; that is exactly FiCoCo-V's prefill
(the LLM sees k visual tokens from layer 0), hence the default variant `v`.
`--include-vision` adds the CLIP encoder. On LLaVA-NeXT the newline tokens
cost a budget a little: 2.9 TFLOPs keeps 31 tokens per crop (5 x 31 + 2 = 157
visual tokens), not 32.

`--onnx BUILD` counts the MatMul / Gemm FLOPs of a build's graphs, run once
with ONNX Runtime at a prompt of 5 + 55 text tokens: vision.onnx, and the
prefill as the runtime runs it, the sum over decoder.0, reduce.1, decoder.1, ...
(each decoder segment on its prompt tokens with empty past buffers), against the
analytic count of the build's schedule, with the known differences itemised.

`--model` takes a shipped shape-only config (scripts/configs/NAME.json, the
Hugging Face config.json format), a local checkpoint directory or config.json,
or a tiny preset name. No weights are read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/flops.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ficoco.analysis import flops as F
from ficoco.config import Schedule, Step
from ficoco.analysis.flops import (  # noqa: F401  (re-exported: the counting lives in ficoco.analysis.flops)
    TEXT_TOKENS,
    VARIANTS,
    Count,
    count,
    tokens_for_budget,
)
from ficoco.geometry import anyres_grid, config_geometry  # noqa: F401  (re-exported)
from ficoco.plan import BuildPlan
from runtime.names import VISION, decoder, reduce

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONVENTION = ("LLM prefill; 2 FLOPs/MAC over linear layers + full (not causally halved) QK^T and AV; "
              "norms, softmax, activations, LM head and FiCoCo's own ops left out; {text} text tokens; "
              "visual tokens = crops x tokens per crop (LLaVA-NeXT: anyres grid of most crops, + one newline token per grid row)")
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_VISION_KEYS = (*_TEXT_KEYS, "image_size", "patch_size")


# --------------------------------------------------------------------------- model configs


def shipped_models() -> list[str]:
    """Names of the shape-only configs under scripts/configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_path(model: str | Path) -> Path:
    """The config.json behind a shipped name, a checkpoint dir, a JSON file or a tiny preset name."""
    path = Path(model).expanduser()
    if str(model) in shipped_models():
        return CONFIG_DIR / f"{model}.json"
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file():
        return path
    from ficoco.models.presets import preset_names, resolve_model_dir

    if str(model) in preset_names():
        return resolve_model_dir(str(model)) / "config.json"
    raise ValueError(f"model {str(model)!r} is neither a shipped config ({', '.join(shipped_models())}), "
                     f"a preset ({', '.join(preset_names())}) nor a directory with config.json")


def complete(config: dict) -> dict:
    """Fill shape fields that a real checkpoint's config.json leaves to the defaults (llava-hf omits Llama's)."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if all(k in text for k in _TEXT_KEYS) and all(k in vision for k in _VISION_KEYS):
        return config
    from transformers import AutoConfig

    rest = {k: v for k, v in config.items() if k != "model_type"}
    return {**config, **AutoConfig.for_model(config["model_type"], **rest).to_dict()}


def load_model_config(model: str | Path) -> dict:
    """A LLaVA config dict (Hugging Face format, with text_config / vision_config) for `model`."""
    return complete(json.loads(config_path(model).read_text()))


def describe_schedule(schedule: Schedule) -> str:
    """`vision [(layer, in, out), ...] per crop; language [...]` for printing."""
    def steps(s: tuple[Step, ...]) -> str:
        return "[" + ", ".join(f"({x.layer}, {x.tokens_in}, {x.tokens_out})" for x in s) + "]"

    return f"vision {steps(schedule.vision)} per crop; language {steps(schedule.language)}"


# --------------------------------------------------------------------------- ONNX cross-check


COUNTED_OPS = ("MatMul", "Gemm", "Conv")


def run_shapes(path: str | Path, dims: dict[str, int], seed: int = 0) -> tuple[object, dict[str, tuple[int, ...]]]:
    """(the ONNX model, {tensor name: shape}) for every input and output of its MatMul / Gemm / Conv nodes.

    Static shape inference cannot be relied on here: `onnx.shape_inference`
    (even with data propagation) leaves the Slice bounds that FiCoCo-L computes
    from shapes unresolved, and ONNX Runtime's symbolic inference fails on the
    vision graph. So the graph is run once with ONNX Runtime on seeded inputs
    whose dynamic dims (dim_params such as `text_before`) come from `dims`,
    with those tensors exposed as extra outputs: the shapes are the executed
    ones. Every shape in these graphs is fixed by the input sizes (FiCoCo's
    counts are constants), so the input values do not matter. Meant for small
    builds: it holds the exposed intermediates in memory.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))  # element types of the intermediates
    known = {t.name: tuple(t.dims) for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    rng, feeds = np.random.default_rng(seed), {}
    for value in model.graph.input:
        shape = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param not in dims:
                raise ValueError(f"{path}: bind the dynamic dim {dim.dim_param!r} (got {sorted(dims)})")
            shape.append(dims[dim.dim_param] if dim.dim_param else dim.dim_value)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = np.zeros(shape, dtype) if dtype.kind in "iu" else rng.standard_normal(shape).astype(dtype)
    wanted = {name for node in model.graph.node if node.op_type in COUNTED_OPS for name in [*node.input[:2], node.output[0]]}
    wanted -= set(known) | set(feeds)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in sorted(wanted - outputs))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    known |= {n: a.shape for n, a in zip(names, session.run(names, feeds))} | {n: a.shape for n, a in feeds.items()}
    return model, known


def graph_flops(path: str | Path, dims: dict[str, int]) -> dict[str, float]:
    """FLOPs of an ONNX graph's MatMul + Gemm ("matmul") and Conv ("conv") nodes at concrete input sizes
    (`dims` binds the dynamic input dims); 2 FLOPs per multiply-accumulate. Shapes from `run_shapes`."""
    model, shapes = run_shapes(path, dims)
    totals = {"matmul": 0.0, "conv": 0.0}
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        a, w, out = (shapes[name] for name in (node.input[0], node.input[1], node.output[0]))
        if node.op_type == "Conv":
            totals["conv"] += 2.0 * math.prod(out) * math.prod(w[1:])
            continue
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        inner = a[0] if node.op_type == "Gemm" and trans_a else a[-1]
        totals["matmul"] += 2.0 * math.prod(out) * inner
    return totals


@dataclass(frozen=True)
class CrossCheck:
    """One graph: its MatMul/Gemm FLOPs vs the analytic count, and the known terms between the two."""

    graph: str
    analytic: float  # ficoco.analysis.flops convention
    onnx: float  # MatMul + Gemm nodes of the graph
    terms: dict[str, float] = field(default_factory=dict)  # in the graph, not in the convention (or vice versa)
    conv: float = 0.0  # Conv nodes (CLIP's patch embedding), outside the convention and not in `onnx`
    graphs: dict[str, float] = field(default_factory=dict)  # the prefill: `onnx` per graph of the chain

    @property
    def relative(self) -> float:
        return self.onnx / self.analytic - 1.0

    @property
    def unexplained(self) -> float:
        return self.onnx - self.analytic - sum(self.terms.values())


def _vision_terms(config: dict, steps: list[list[int]], crops: int, kept: int) -> dict[str, float]:
    """What vision.onnx computes beyond (or short of) `ficoco.analysis.flops.vision_flops`."""
    v, t = config["vision_config"], config["text_config"]
    tokens = kept + (config.get("vision_feature_select_strategy", "default") == "full")
    return {
        "FiCoCo-V merges (alpha^T X_S)": crops * sum(2.0 * out * (inp - out) * v["hidden_size"] for _, inp, out in steps),
        "reducing layers' MLP on kept tokens only": -crops * sum(
            2.0 * (inp - out) * 2 * v["hidden_size"] * v["intermediate_size"] for _, inp, out in steps),
        "multimodal projector": crops * tokens * 2.0 * (v["hidden_size"] + t["hidden_size"]) * t["hidden_size"],
    }


def _prefill_terms(config: dict, steps: list[list[int]], text_after: int) -> dict[str, float]:
    """What the decoder.* and reduce.* graphs compute beyond (or short of) `ficoco.analysis.flops.prefill_flops`."""
    t = config["text_config"]
    terms = {"LM head on the last position": 2.0 * t["hidden_size"] * t["vocab_size"]}
    if steps:
        terms["FiCoCo-L merges (alpha^T X_S)"] = sum(2.0 * out * (inp - out) * t["hidden_size"] for _, inp, out in steps)
        terms["FiCoCo-L indirect correlation"] = sum(2.0 * (inp - out) * text_after * out for _, inp, out in steps)
        terms["reducing layer's MLP on kept tokens only"] = -sum(
            2.0 * (inp - out) * 3 * t["hidden_size"] * t["intermediate_size"] for _, inp, out in steps)
    return terms


def prefill_dims(plan: BuildPlan, text_before: int, text_after: int) -> dict[str, dict[str, int]]:
    """{graph: dynamic dims} of the LLM graphs a prefill runs, in order, for a prompt of `text_before` +
    the plan's visual tokens + `text_after` tokens: decoder.{s} on the tokens left after s FiCoCo-L
    steps (`BuildPlan.segment_tokens`) with empty past buffers (capacity 0, past_length 0, as the
    runtime's prefill), reduce.{s+1} on what decoder.{s} returns."""
    prompt, dims = plan.prompt_length(text_before, text_after), {}
    for segment in plan.segments:
        dims[decoder(segment.index)] = {"tokens": plan.segment_tokens(segment.index, prompt), "capacity": 0}
        if segment.step is not None:
            dims[reduce(segment.index + 1)] = {"tokens": plan.segment_tokens(segment.index, prompt), "text_before": text_before}
    return dims


def cross_check(build_dir: str | Path, text_before: int = 5, text_after: int = 55,
                model_config: dict | None = None, model: str | Path | None = None) -> list[CrossCheck]:
    """Count vision.onnx and the prefill's chain of graphs (decoder.0, reduce.1, decoder.1, ...) of an
    `export.build` build against the analytic model of its plan."""
    from runtime.manifest import Build, BuildError

    try:
        build = Build.from_directory(build_dir)
    except BuildError as error:
        raise ValueError(str(error)) from None
    if model_config is None:
        from export.reload import source_dir

        model_config = load_model_config(source_dir(build.manifest, model))  # the checkpoint the build was made from
    config, p = model_config, build.plan
    analytic_vision, analytic_prefill = F.plan_flops(config, p, text_before + text_after)
    vision = graph_flops(build.path("graphs", VISION), {})
    llm = {graph: graph_flops(build.path("graphs", graph), dims)["matmul"]
           for graph, dims in prefill_dims(p, text_before, text_after).items()}
    steps = {kind: [[s.layer, s.tokens_in, s.tokens_out] for s in getattr(p, kind)] for kind in ("vision", "language")}
    return [
        CrossCheck("vision", analytic_vision, vision["matmul"], _vision_terms(config, steps["vision"], p.crops, p.kept_per_crop),
                   vision["conv"]),
        CrossCheck("prefill", analytic_prefill, sum(llm.values()), _prefill_terms(config, steps["language"], text_after), graphs=llm),
    ]


# --------------------------------------------------------------------------- CLI


def report_model(name: str, config: dict, args: argparse.Namespace) -> list[str]:
    """Vanilla vs the paper and the FiCoCo budgets of one model, as printed lines."""
    base = count(config, text_tokens=args.text_tokens, grid=args.grid)
    patches = config_geometry(config).patches
    paper = config.get("ficoco_paper", {}) if args.grid is None else {}  # the paper counts the largest grid
    vs = f" (paper {paper['vanilla_tflops']}: {base.prefill / 1e12 / paper['vanilla_tflops'] - 1:+.1%})" if "vanilla_tflops" in paper else ""
    newlines = f" + {base.plan.newline_rows} newline" if base.plan.newline_rows else ""
    lines = [f"{name}: {base.crops} crop(s) x {patches}{newlines} = {base.visual_tokens} visual + {args.text_tokens} text tokens",
             f"  vanilla prefill {base.prefill / 1e12:.2f} TFLOPs{vs}; vision encoder {base.vision / 1e12:.2f} TFLOPs",
             "  FiCoCo, prefill TFLOPs (vision encoder) at tokens kept per crop:",
             f"  {'tokens':>8} {'ratio':>6}" + "".join(f"{'FiCoCo-' + v.upper():>18}" for v in VARIANTS)]
    for tokens in (192, 128, 64):
        cells = [count(config, v, tokens, args.text_tokens, args.grid) for v in VARIANTS]
        lines.append(f"  {tokens:>8} {tokens / patches:>6.3f}" + "".join(
            f"{c.prefill / 1e12:>10.2f} ({c.vision / 1e12:.2f})" for c in cells))
    for budget in paper.get("budgets_tflops", []):
        lines.append(f"  paper budget {budget} TFLOPs -> tokens per crop: " + ", ".join(
            f"{v.upper()} {_fit(config, budget, v, args)}" for v in VARIANTS))
    return lines


def _fit(config: dict, budget: float, variant: str, args: argparse.Namespace) -> str:
    try:
        return str(tokens_for_budget(config, budget, variant, args.text_tokens, args.grid, args.include_vision))
    except ValueError:
        return "none fits"


def report_budget(config: dict, args: argparse.Namespace) -> list[str]:
    """The schedule that meets `--tflops` for `--variant`."""
    tokens = tokens_for_budget(config, args.tflops, args.variant, args.text_tokens, args.grid, args.include_vision)
    c = count(config, args.variant, tokens, args.text_tokens, args.grid)
    patches = config_geometry(config).patches
    counted = "prefill + vision" if args.include_vision else "prefill"
    return [(f"budget {args.tflops} TFLOPs ({counted}), FiCoCo-{args.variant.upper()}: "
             f"keep {tokens} of {patches} tokens per crop (--tokens {tokens}, ratio {tokens / patches:.4f})"),
            (f"  {c.visual_tokens} visual tokens into the LLM; prefill {c.prefill / 1e12:.3f} TFLOPs, "
             f"vision encoder {c.vision / 1e12:.3f} TFLOPs"),
            f"  schedule: {describe_schedule(c.schedule)}"]


def report_onnx(build_dir: Path, model: str | None = None) -> list[str]:
    lines = [f"ONNX cross-check of {build_dir} (text_before 5, text_after 55):"]
    for row in cross_check(build_dir, model=model):
        lines.append(f"  {row.graph}: ONNX MatMul/Gemm {row.onnx / 1e9:.4f} GFLOPs vs analytic {row.analytic / 1e9:.4f} "
                     f"({row.relative:+.2%}); unexplained {row.unexplained / 1e9:.6f} GFLOPs")
        lines += [f"    {graph}.onnx: {value / 1e9:.4f} GFLOPs" for graph, value in row.graphs.items()]
        lines += [f"    {name}: {value / 1e9:+.4f} GFLOPs" for name, value in row.terms.items()]
        if row.conv:
            lines.append(f"    (Conv patch embedding, not counted: {row.conv / 1e9:.4f} GFLOPs)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/flops.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"shipped config ({', '.join(shipped_models())}; default llava-1.5-7b), checkpoint dir "
                   "or preset; with --onnx, the checkpoint the build was made from (not needed for presets)")
    p.add_argument("--all", action="store_true", help="report every shipped config")
    p.add_argument("--tflops", type=float, help="find the tokens kept per crop that meet this budget")
    p.add_argument("--variant", default="v", choices=VARIANTS, help="variant for --tflops (default v: the paper's count)")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    p.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.lower().split("x")), help="LLaVA-NeXT anyres grid RxC")
    p.add_argument("--include-vision", action="store_true", help="budgets count the vision encoder too")
    p.add_argument("--onnx", type=Path, metavar="BUILD_DIR", help="cross-check an export.build build's graphs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = [f"convention: {CONVENTION.format(text=args.text_tokens)}"]
        if args.onnx is not None:
            lines += report_onnx(args.onnx, args.model)
        else:
            for name in shipped_models() if args.all else [args.model or "llava-1.5-7b"]:
                config = load_model_config(name)
                lines += report_budget(config, args) if args.tflops is not None else report_model(str(name), config, args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
