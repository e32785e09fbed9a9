"""Parity gates: when an exported graph counts as the PyTorch model it came from.

Pure numpy; `export.trace.verify` runs the graphs and feeds their outputs here.

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
`depth` layers the errors add, giving one element's typical error

    sigma = depth * (u_store + sqrt(K) * u_acc)          (relative to max|ref|)

The gate looks at the largest error of an output of `n` elements; for
independent, roughly normal errors that is about `sqrt(2 ln n)` sigmas (4.9
for a 125k-element KV output), so

    rtol = sqrt(2 ln n) * sigma

SmolLM2-135M (31 with the head, K = 1536): sigma fp32 7.4e-5, fp16 1.5e-2;
LLaVA-1.5-7B's Vicuna (33, K = 11008): fp32 2.1e-4, fp16 1.6e-2. Measured on
SmolLM2 in fp32 (README): the worst KV output is at 0.65 sigma (4.8e-5), 7x
inside the limit; one weight tensor (the down projection of decoder layer 15)
scaled by 1 + 1e-3 puts the KV outputs after it at 2.4e-4 .. 3.7e-3, up to 10x
outside it. So in fp32 the gate separates rounding from a 1e-3 weight error.
In fp16 the rounding itself is ~5e-4 per operation and a 1e-3 weight error
is not separable from it; fp16 gates catch structural defects (positions,
heads, counts, spans). Half precision is judged by the relative RMS error
instead of the largest one: a real LLM's residual stream carries outlier
channels hundreds of times larger than the rest, and rounding them to fp16
puts errors of up to 12% of max|ref| into single KV elements of the late
layers (SmolLM2, fp16: up to 5 rows per output past the max limit) while the
relative RMS error stays at or below 2.4e-2 = 1.6 sigma (cosine >= 0.9995).
The limit is `RMS_SIGMAS = 6` sigmas: about 4x the measured rounding, while a
structural defect (a rotated, swapped or shifted cache) moves the RMS error by
O(1), over 30 sigmas.

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
NORM = {"fp32": "max", "fp16": "rms", "bf16": "rms"}
RMS_SIGMAS = 6.0


@dataclass(frozen=True)
class Limits:
    """The gate of one graph family (vision tower or LLM) at one precision."""

    precision: str
    depth: int  # layers an output has passed through (upper bound)
    reduction: int  # longest reduction length K
    sigma: float  # one element's typical relative error, depth * (u_store + sqrt(K) * u_acc)
    kept: float  # minimum kept-set overlap
    tokens: float  # minimum teacher-forced next-token agreement
    greedy_exact: bool  # greedy tokens must be identical
    row_slack: float  # share of token rows that may differ (correlate-stage flips), on top of kept-set flips
    norm: str  # "max": largest error per row (fp32); "rms": relative RMS error (half precision)

    def rtol(self, size: int) -> float:
        """The limit of an output of `size` elements: max|a-b| <= rtol * max|ref|."""
        return math.sqrt(2.0 * math.log(max(size, 3))) * self.sigma

    def allowed_rows(self, flips: int, rows: int) -> int:
        """Token rows of one output that may exceed the limit: 2 per kept-set flip + the slack."""
        return ROWS_PER_FLIP * flips + math.ceil(self.row_slack * rows)

    def to_dict(self) -> dict:
        return asdict(self)


KEPT_OVERLAP = {"fp32": 0.99, "fp16": 0.95, "bf16": 0.9}
TOKEN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.8}


def limits(precision: str, depth: int, reduction: int) -> Limits:
    """sigma = depth * (u_store + sqrt(K) * u_acc), see the module docstring."""
    if precision not in STORE_ROUNDOFF:
        raise ValueError(f"no parity limits for precision {precision!r}; known: {sorted(STORE_ROUNDOFF)}")
    if depth < 1 or reduction < 1:
        raise ValueError(f"depth and reduction length must be >= 1, got depth={depth}, reduction={reduction}")
    sigma = depth * (STORE_ROUNDOFF[precision] + math.sqrt(reduction) * ACCUMULATOR_ROUNDOFF)
    return Limits(precision, depth, reduction, sigma, KEPT_OVERLAP[precision], TOKEN_AGREEMENT[precision],
                  precision == "fp32", ROW_SLACK[precision], NORM[precision])


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


def judge(reference: np.ndarray, actual: np.ndarray, limits: Limits, allowed_bad_rows: int = 0, row_axis: int | None = None) -> dict:
    """Figures and verdict of one numeric output.

    fp32 (`limits.norm == "max"`): every row's largest error within `limits.rtol(size) * max|ref|`,
    except up to `allowed_bad_rows` rows (near-tie flips). Half precision (`"rms"`): leave out the
    `allowed_bad_rows` worst rows, then `||a - b|| / ||ref|| <= RMS_SIGMAS * sigma` over the rest.
    `row_axis`: the token axis (each slice along it is a row); without it the tensor is one row.
    """
    rtol = limits.rtol(reference.size)
    if reference.shape != actual.shape:
        return {"passed": False, "reason": f"shape {list(actual.shape)} != reference {list(reference.shape)}",
                "max_abs": math.inf, "rtol": rtol, "scale": float(np.abs(reference).max()) if reference.size else 0.0,
                "normalized": math.inf, "cosine": 0.0, "bad_rows": None}
    ref, act = reference.astype(np.float64), actual.astype(np.float64)
    rows = np.moveaxis(ref - act, row_axis, 0) if row_axis is not None else (ref - act)[None]
    rows = rows.reshape(rows.shape[0], -1)
    ref_rows = (np.moveaxis(ref, row_axis, 0) if row_axis is not None else ref[None]).reshape(rows.shape[0], -1)
    per_row = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(per_row.max()) if per_row.size else 0.0
    bad_rows = int((per_row > rtol * scale).sum())
    keep = np.argsort(per_row)[: max(len(per_row) - allowed_bad_rows, 0)]  # all but the worst allowed rows
    ref_norm = float(np.linalg.norm(ref_rows[keep]))
    relative_rms = float(np.linalg.norm(rows[keep]) / ref_norm) if ref_norm > 0 else float(np.abs(rows[keep]).max(initial=0.0))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float((ref.ravel() @ act.ravel()) / denom) if denom > 0 else float(np.array_equal(ref, act))
    normalized = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    within = bad_rows <= allowed_bad_rows if limits.norm == "max" else relative_rms <= RMS_SIGMAS * limits.sigma
    return {"passed": bool(np.isfinite(act).all()) and within, "norm": limits.norm, "max_abs": max_abs, "scale": scale,
            "normalized": normalized, "rtol": rtol, "relative_rms": relative_rms, "rms_limit": RMS_SIGMAS * limits.sigma,
            "cosine": cosine, "bad_rows": bad_rows, "allowed_bad_rows": allowed_bad_rows}


def severity(figures: dict) -> float:
    """How close one output's figures are to failing, in units of its own limit (older records: max_abs)."""
    if figures.get("norm") == "rms":
        return figures["relative_rms"] / figures["rms_limit"]
    if "rtol" in figures and figures.get("normalized") is not None:
        return figures["normalized"] / figures["rtol"] if figures["rtol"] > 0 else math.inf
    return figures.get("max_abs", 0.0)


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
    if record.get("quantization") and not record["quantization"]["passed"]:
        q = record["quantization"]
        failed.append(f"{q['weights']} quality (agreement {q['agreement']:.3f}, cosine {q['cosine']:.4f}; "
                      f"gate {q['gate']['agreement']}, {q['gate']['cosine']})")
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
            worst_cache = max(caches, key=severity)
            lines.append(f"{graph}.present.* ({len(caches)}){'':<9} worst {describe_figures(worst_cache)}")
    e2e = record["end_to_end"]
    tf = e2e.get("teacher_forced")  # absent in records written before it
    identical = e2e.get("identical", e2e["onnx_tokens"] == e2e["torch_tokens"])
    forced = (f"teacher-forced agreement {tf['agreement']:.3f} over {tf['positions']} positions of {tf['prompts']} prompts"
              if tf else f"not run: {e2e['error']}" if "error" in e2e else "no teacher-forced figures")
    lines.append(f"end to end: greedy tokens {'identical' if identical else 'DIFFERENT'} ({len(e2e['onnx_tokens'])}), "
                 f"{forced}  {'ok' if e2e['passed'] else 'FAIL'}")
    return lines


def describe_figures(f: dict) -> str:
    if "reason" in f:
        return f"FAIL ({f['reason']})"
    if "overlap" in f:
        return f"kept-set overlap {f['overlap']:.3f}  {'ok' if f['passed'] else 'FAIL'}"
    if "scale" not in f:  # a record written before relative limits (older builds)
        return f"max_abs {f.get('max_abs', math.nan):.1e}  cosine {f.get('cosine', math.nan):.7f}  {'ok' if f.get('passed') else 'FAIL'}"
    rows = f" bad rows {f['bad_rows']}/{f['allowed_bad_rows']}" if f.get("bad_rows") else ""
    if f.get("norm") == "rms":
        rows += f"  relative rms {f['relative_rms']:.1e} (limit {f['rms_limit']:.1e})"
    return (f"max_abs {f['max_abs']:.1e} of {f['scale']:.1e} (normalized {f['normalized']:.1e}, limit {f['rtol']:.1e})  "
            f"cosine {f['cosine']:.7f}{rows}  {'ok' if f['passed'] else 'FAIL'}")
