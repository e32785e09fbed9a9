"""What `export.build` prints: numbered stages with their times, and the closing summary (no torch)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

from ficoco.plan import BuildPlan

from . import gates


class Progress:
    """Numbered stages [i/total] with their time, printed as they finish; `rows` for the summary. `total` is
    every stage of the run, known before the first (`export.build.stage_count`)."""

    def __init__(self, total: int, log: io.StringIO):
        self.total, self.index, self.rows, self.log = total, 0, [], log

    @contextlib.contextmanager
    def stage(self, title: str, quiet: bool = True):
        self.index += 1
        print(f"[{self.index}/{self.total}] {title} ...", flush=True)
        start = time.perf_counter()
        sink = contextlib.ExitStack()
        if quiet:  # the exporters' chatter goes to build.log
            sink.enter_context(contextlib.redirect_stdout(self.log))
            sink.enter_context(contextlib.redirect_stderr(self.log))
            sink.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            sink.callback(logging.getLogger("torch").setLevel, logging.getLogger("torch").level)
            logging.getLogger("torch").setLevel(logging.ERROR)
        with sink:
            yield
        seconds = time.perf_counter() - start
        self.rows.append((title, seconds))
        print(f"      done in {seconds:.1f}s", flush=True)


def summary(body: dict, progress: Progress, out: Path) -> str:
    lines = [f"\nbuild: {out}", f"  visual tokens: {visual_tokens_line(BuildPlan.from_dict(body['schedule']))}"]
    lines.append(f"  {'file':<22}{'MB':>10}")
    for kind in ("graphs", "engines"):
        for graph, entry in body.get(kind, {}).items():
            size = entry["bytes"] + sum(e["bytes"] for e in entry.get("external_data", []))
            lines.append(f"  {entry['file']:<22}{size / 1e6:>10.2f}")
    parity = body["parity"]
    if parity is None:
        lines.append("  parity: NOT VERIFIED (--no-verify)")
    else:
        lines.append(f"  parity: {'passed' if parity['passed'] else 'FAILED (published with --allow-parity-failure)'}")
        lines.extend(f"    {line}" for line in gates.report_lines(parity))
    q = body.get("quantization")
    if q:
        lines.append(f"  weights: {q['weights']} ({q['method']}, block {q['block_size']}), "
                     + ", ".join(f"{g} {r['quantized']} MatMul" for g, r in q["graphs"].items()))
        if q["quality"]:
            f = q["quality"]
            lines.append(f"  {q['weights']} against the fp32 PyTorch model over {f['prompts']} prompts: teacher-forced agreement "
                         f"{f['agreement']:.3f}, logits cosine {f['cosine']:.4f} (min {f['cosine_min']:.4f}), greedy match "
                         f"{f['greedy_match']:.3f}" + (f", kept overlap {f['kept_overlap']:.3f}" if "kept_overlap" in f else "")
                         + f" (gate {f['gate']['agreement']}, {f['gate']['cosine']}: {'passed' if f['passed'] else 'FAILED'})")
    if body.get("memory"):
        lines.extend(f"  {line}" for line in body["memory"]["lines"])
    tf = body["flops"]
    lines.append(f"  FLOPs: prefill {tf['tflops']['prefill']:.4f} TFLOPs (unreduced {tf['unreduced_tflops']['prefill']:.4f}, "
                 f"{tf['prefill_reduction']:.2f}x less); vision {tf['tflops']['vision']:.4f} TFLOPs")
    lines.append("  stages: " + ", ".join(f"{title.split(' (')[0]} {seconds:.1f}s" for title, seconds in progress.rows))
    return "\n".join(lines)


def visual_tokens_line(plan: BuildPlan) -> str:
    """What FiCoCo does to the visual tokens in `plan`; a step is named only where one runs."""
    per_crop = (f"{plan.patches_per_crop} -> {plan.kept_per_crop} per crop (FiCoCo-V)" if plan.vision
                else f"{plan.patches_per_crop} per crop")
    line = f"{plan.crops} crop(s), {per_crop}, {plan.visual_tokens} into the LLM"
    if plan.language:
        line += f", {plan.language[-1].tokens_out} after layer {plan.language[-1].layer} (FiCoCo-L)"
    return line


def resolve_flavour(backend: str):
    """The TensorRT flavour, None to skip engines; an explicit backend that is missing is an error."""
    if backend == "none":
        return None
    from .engine import BackendNotInstalledError, load_flavour

    try:
        return load_flavour(backend)
    except BackendNotInstalledError as error:
        if backend == "auto":
            print(f"note: {error}; engines are skipped", flush=True)
            return None
        raise
