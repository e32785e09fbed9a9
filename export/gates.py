"""Parity gates: when an exported graph counts as the PyTorch model it came from.

Pure numpy; `export.verify` runs the graphs and feeds their outputs here.

Why relative limits
-------------------
Two correct implementations of the same graph (PyTorch on CPU, ONNX Runtime)
differ only by rounding, and rounding error is relative to the size of the
numbers. A real Llama's keys reach |25| and its logits |32|, so an absolute
limit that suits a random tiny model fails a real one for no defect. Every
numeric output is therefore judged as

    max |actual - reference| <= rtol * max |reference|          (per output)

The limit `rtol` (derivation)
-----------------------------
Let `u_store` be the unit roundoff of the precision the graph stores its
activations in (fp32 2^-24, fp16 2^-11, bf16 2^-8) and `u_acc = 2^-24` that of
the accumulators (CPU matmuls accumulate in fp32 for every precision here).
One transformer layer rounds its outputs once to the storage precision (error
`u_store`, relative) and sums products over reductions of length at most `K`
(hidden size, MLP width or sequence length) in a different order on each side;
with independent rounding errors that sum differs by about `sqrt(K) * u_acc`
relative. The residual stream carries every layer's error to the end, so over
`depth` layers the errors add:

    rtol = depth * (u_store + sqrt(K) * u_acc)

SmolLM2-135M (30 layers, K = 1536): fp32 7.2e-5, fp16 1.5e-2. LLaVA-1.5-7B's
Vicuna (32 layers, K = 11008): fp32 2.0e-4, fp16 1.6e-2. The measured fp32
errors on SmolLM2 are about ten times below this limit (README), and a single
weight tensor scaled by 1 + 1e-3 moves the outputs after it by about 1e-3
relative, more than ten times above it: the gate separates rounding from
defects by an order of magnitude on each side in fp32. In fp16 the rounding
itself is ~5e-4 per operation, so a 1e-3 weight error is not separable from
it there; fp16 gates catch structural defects (positions, heads, counts,
spans), fp32 gates also catch weight errors.

Near-tie flips
--------------
FiCoCo's TopK picks are discrete. Where two candidates' scores differ by less
than the rounding error, the two sides may keep different tokens: a *flip*.
Kept sets are compared as overlaps (the fraction of one side's kept positions
that the other side also kept). Tensors whose rows are tokens (image features,
the KV of layers after a FiCoCo-L step) are compared on the rows both sides
kept. A flipped token is merged into a different target on each side, so with
one target per discarded token (what epsilon = 0.998 gives below ~500 kept
tokens, see README) each flip changes at most 2 surviving rows by more than
rounding: the gate allows `ROWS_PER_FLIP * flips` such rows. The correlate
stage flips too, invisibly: when a discarded token's two best correlations are
within rounding of each other, its content goes to a different target on each
side, again 2 rows. Those are not observable from the outputs, so half
precision gets a slack of `ROW_SLACK[precision]` of the kept rows (fp16 2%:
measured 2 such rows of 288 on the tiny preset, see README). fp32 gets none:
with no flips (every fp32 build so far) no row may exceed the limit.

End to end, fp32 builds must decode the same greedy tokens as PyTorch; every
precision must agree on the teacher-forced next token (the argmax after each
reference token) at `tokens` of the positions of several prompts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

STORE_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
ACCUMULATOR_ROUNDOFF = 2.0**-24
ROWS_PER_FLIP = 2
ROW_SLACK = {"fp32": 0.0, "fp16": 0.02, "bf16": 0.05}


@dataclass(frozen=True)
class Limits:
    """The gate of one graph family (vision tower or LLM) at one precision."""

    precision: str
    depth: int  # layers an output has passed through (upper bound)
    reduction: int  # longest reduction length K
    rtol: float  # max|a-b| <= rtol * max|ref|
    kept: float  # minimum kept-set overlap
    tokens: float  # minimum teacher-forced next-token agreement
    greedy_exact: bool  # greedy tokens must be identical
    row_slack: float  # share of token rows that may differ (correlate-stage flips), on top of kept-set flips

    def allowed_rows(self, flips: int, rows: int) -> int:
        """Token rows of one output that may exceed the limit: 2 per kept-set flip + the slack."""
        return ROWS_PER_FLIP * flips + math.ceil(self.row_slack * rows)

    def to_dict(self) -> dict:
        return asdict(self)


KEPT_OVERLAP = {"fp32": 0.99, "fp16": 0.95, "bf16": 0.9}
TOKEN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.8}


def limits(precision: str, depth: int, reduction: int) -> Limits:
    """rtol = depth * (u_store + sqrt(K) * u_acc), see the module docstring."""
    if precision not in STORE_ROUNDOFF:
        raise ValueError(f"no parity limits for precision {precision!r}; known: {sorted(STORE_ROUNDOFF)}")
    if depth < 1 or reduction < 1:
        raise ValueError(f"depth and reduction length must be >= 1, got depth={depth}, reduction={reduction}")
    rtol = depth * (STORE_ROUNDOFF[precision] + math.sqrt(reduction) * ACCUMULATOR_ROUNDOFF)
    return Limits(precision, depth, reduction, rtol, KEPT_OVERLAP[precision], TOKEN_AGREEMENT[precision],
                  precision == "fp32", ROW_SLACK[precision])


def kept_overlap(reference: np.ndarray, actual: np.ndarray) -> float:
    """[..., k] kept positions per row -> mean over rows of |ref & act| / k (1.0 when both empty)."""
    ref, act = np.atleast_2d(reference), np.atleast_2d(actual)
    if ref.shape != act.shape:
        return 0.0
    ref, act = ref.reshape(-1, ref.shape[-1]), act.reshape(-1, act.shape[-1])
    if ref.shape[-1] == 0:
        return 1.0
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / a.size for a, b in zip(ref, act)]))


def common_rows(reference: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept positions of one row (1-D) on each side -> (indices into ref, indices into act) of the
    positions both kept, in increasing position order."""
    _, ref_index, act_index = np.intersect1d(reference, actual, assume_unique=True, return_indices=True)
    return ref_index, act_index


def judge(reference: np.ndarray, actual: np.ndarray, rtol: float, allowed_bad_rows: int = 0, row_axis: int | None = None) -> dict:
    """Figures and verdict of one numeric output.

    `row_axis`: the token axis; each slice along it is a row, and up to `allowed_bad_rows` rows may
    exceed the limit (near-tie flips). Without it the whole tensor is one row.
    """
    if reference.shape != actual.shape:
        return {"passed": False, "reason": f"shape {list(actual.shape)} != reference {list(reference.shape)}",
                "max_abs": math.inf, "scale": float(np.abs(reference).max()) if reference.size else 0.0,
                "normalized": math.inf, "cosine": 0.0, "bad_rows": None}
    ref, act = reference.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(ref - act)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    limit = rtol * scale
    if row_axis is None:
        bad_rows = int(max_abs > limit)
    else:
        per_row = np.moveaxis(diff, row_axis, 0).reshape(diff.shape[row_axis], -1).max(axis=1) if diff.size else np.zeros(0)
        bad_rows = int((per_row > limit).sum())
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float((ref.ravel() @ act.ravel()) / denom) if denom > 0 else float(np.array_equal(ref, act))
    normalized = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = bool(np.isfinite(act).all()) and bad_rows <= allowed_bad_rows
    return {"passed": passed, "max_abs": max_abs, "scale": scale, "normalized": normalized, "cosine": cosine,
            "bad_rows": bad_rows, "allowed_bad_rows": allowed_bad_rows}


def token_agreement(reference: list[int], actual: list[int]) -> float:
    """Fraction of positions where two next-token sequences of equal length agree."""
    if len(reference) != len(actual):
        raise ValueError(f"token sequences differ in length: {len(reference)} vs {len(actual)}")
    return float(np.mean([a == b for a, b in zip(reference, actual)])) if reference else 1.0


# --------------------------------------------------------------------------- the record, for people


def failing_rows(record: dict) -> list[str]:
    """'graph.output' of every failing check, and 'end-to-end tokens'."""
    failed = [f"{g}.{o}" for g, r in record["graphs"].items() for o, f in r["outputs"].items() if not f["passed"]]
    if not record["end_to_end"]["passed"]:
        failed.append("end-to-end tokens")
    return failed


def report_lines(record: dict, every_output: bool = False) -> list[str]:
    """Human lines: every failing output marked FAIL, the other non-cache outputs, and one line per graph's caches."""
    lines = []
    for graph, result in record["graphs"].items():
        caches = [f for o, f in result["outputs"].items() if o.startswith("present.")]
        for output, f in result["outputs"].items():
            if output.startswith("present.") and f["passed"] and not every_output:
                continue
            lines.append(f"{graph}.{output:<22} {describe_figures(f)}")
        if caches and all(f["passed"] for f in caches) and not every_output:
            worst_cache = max(caches, key=lambda f: f["normalized"])
            lines.append(f"{graph}.present.* ({len(caches)}){'':<9} worst {describe_figures(worst_cache)}")
    e2e = record["end_to_end"]
    tf = e2e["teacher_forced"]
    lines.append(f"end to end: greedy tokens {'identical' if e2e['identical'] else 'DIFFERENT'} ({len(e2e['onnx_tokens'])}), "
                 f"teacher-forced agreement {tf['agreement']:.3f} over {tf['positions']} positions of {tf['prompts']} prompts  "
                 f"{'ok' if e2e['passed'] else 'FAIL'}")
    return lines


def describe_figures(f: dict) -> str:
    if "reason" in f:
        return f"FAIL ({f['reason']})"
    if "overlap" in f:
        return f"kept-set overlap {f['overlap']:.3f}  {'ok' if f['passed'] else 'FAIL'}"
    rows = f" bad rows {f['bad_rows']}/{f['allowed_bad_rows']}" if f.get("bad_rows") else ""
    return (f"max_abs {f['max_abs']:.1e} of {f['scale']:.1e} (normalized {f['normalized']:.1e})  "
            f"cosine {f['cosine']:.7f}{rows}  {'ok' if f['passed'] else 'FAIL'}")
