"""FiCoCo as pure tensor functions: filter, correlate, compress (arXiv 2411.17686).

Everything here is static-shape: the number of discarded tokens `r`, the span
of the visual tokens and every TopK size are Python ints fixed before a forward
(or a trace) starts. No `nonzero`, no boolean-mask indexing, no `.item()`, no
loop over tokens, no scatter with a reduction: the functions trace to TopK,
Gather/GatherElements, MatMul, Where and elementwise operators.

Notation (see `../shared/ficoco-spec.md`): `A` is the post-softmax attention
map averaged over heads, rows are queries and columns keys, so "token i
receives attention from j" is `A[j, i]`. At one step `n` reducible tokens hold,
`r` are discarded (source set S, the `r` highest redundancy scores) and
`m = n - r` are preserved (target set T, kept in their original order).

The model adapters in `ficoco.patch` call `vision_step` and `language_step`;
the smaller functions are public so that tests and the export can use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "VisionStepParams",
    "LanguageStepParams",
    "vision_redundancy",
    "language_redundancy",
    "window_penalty",
    "split_by_score",
    "gather_rows",
    "vision_correlation",
    "language_correlation",
    "quantile_threshold",
    "merge_weights",
    "compress",
    "vision_step",
    "language_step",
]


@dataclass(frozen=True)
class VisionStepParams:
    """Constants of one FiCoCo-V step (the paper's defaults)."""

    grid: tuple[int, int] = (24, 24)  # patch grid of one crop (rows, cols)
    lam: float = 0.35  # lambda of Eq. 1
    eps: float = 0.998  # quantile of the token-adaptive threshold
    window: tuple[int, int] = (2, 2)  # local-penalty window (rows, cols)
    scale: float = 2.0  # local-penalty factor
    penalty: bool = True


@dataclass(frozen=True)
class LanguageStepParams:
    """Constants of one FiCoCo-L step (the paper's defaults)."""

    beta: float = 0.6  # Eq. 3
    gamma: float = 0.6  # Eq. 4
    eps: float = 0.998


# --------------------------------------------------------------------------- filter


def vision_redundancy(attn: Tensor, lam: float) -> Tensor:
    """Eq. 1, `s_i = lam * v_i - (1 - lam) * c_i` for the patch tokens.

    attn: [B, N, N], token 0 is CLS. Returns [B, N-1] (patch tokens in order).
    """
    v = attn[:, 1:, 1:].mean(dim=1)  # [B, n] mean over patch queries of A[j, i]
    c = attn[:, 0, 1:]  # [B, n]    A[CLS, i]
    return lam * v - (1.0 - lam) * c


def language_redundancy(attn: Tensor, start: int, length: int, beta: float) -> Tensor:
    """Eq. 3, `s_i = beta * v_i - (1 - beta) * t_i` for the visual span.

    attn: [B, L, L] causal map of the whole prompt; the visual tokens are rows
    and columns `start .. start+length-1`, the instruction is every row after
    them (M = L - start - length queries; with M = 0 the text term is 0).
    Returns [B, length].
    """
    end = start + length
    v = attn[:, start:end, start:end].mean(dim=1)  # [B, n]
    text = attn[:, end:, start:end]  # [B, M, n]
    if text.shape[1] == 0:
        return beta * v
    return beta * v - (1.0 - beta) * text.mean(dim=1)


def window_penalty(
    scores: Tensor, positions: Tensor, grid: tuple[int, int], window: tuple[int, int], scale: float
) -> Tensor:
    """Local penalty: the highest score of each grid window is scaled.

    scores: [B, n] redundancy of the current tokens; positions: [B, n] int64,
    each token's original raster index on the `grid` (H, W). The scores are
    scattered into a dense padded grid pre-filled with the dtype's lowest value
    (cells of tokens discarded earlier can never win), the grid is cut into
    non-overlapping `window` cells (partial windows at the edge count as
    windows), and every token equal to its window's max is multiplied by
    `scale` if positive or divided by it if negative. Returns [B, n].
    """
    (h, w), (wh, ww) = grid, window
    nh, nw = -(-h // wh), -(-w // ww)  # windows per column / row (ceil)
    batch = scores.shape[0]
    row, col = positions // w, positions % w  # [B, n]
    padded = row * (nw * ww) + col  # raster index on the padded grid
    dense = torch.full((batch, nh * wh * nw * ww), torch.finfo(scores.dtype).min, dtype=scores.dtype)
    dense = dense.to(scores.device).scatter(1, padded, scores)  # [B, Hp*Wp]
    dense = dense.view(batch, nh, wh, nw, ww)
    window_max = dense.amax(dim=(2, 4)).reshape(batch, nh * nw)  # [B, windows]
    window_id = (row // wh) * nw + col // ww  # [B, n]
    is_max = scores == window_max.gather(1, window_id)
    scaled = torch.where(scores > 0, scores * scale, scores / scale)  # in the scores' dtype
    return torch.where(is_max, scaled, scores)


def split_by_score(scores: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """TopK filter: the `r` highest scores are discarded.

    scores: [B, n]. Returns src [B, r] (discarded, by descending score) and
    dst [B, n-r] (preserved, ascending index = raster order), both int64.
    """
    n = scores.shape[-1]
    order = scores.topk(n, dim=-1).indices  # [B, n] descending score
    src = order[:, :r]
    dst = order[:, r:].sort(dim=-1).values
    return src, dst


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [B, n, C], index: [B, k] -> [B, k, C] (rows of x, batched)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------- correlate


def _pick(matrix: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """matrix: [B, n, n], rows: [B, r], cols: [B, m] -> matrix[b, rows, cols]: [B, r, m]."""
    picked = gather_rows(matrix, rows)  # [B, r, n]
    return picked.gather(2, cols.unsqueeze(1).expand(-1, rows.shape[1], -1))


def vision_correlation(attn: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """FiCoCo-V correlation `C[i, j] = A[i, j]` between patch tokens.

    attn: [B, N, N] (CLS at 0); src: [B, r], dst: [B, m] index the N-1 patch
    tokens. Returns [B, r, m].
    """
    return _pick(attn[:, 1:, 1:], src, dst)


def language_correlation(
    attn: Tensor, start: int, length: int, src: Tensor, dst: Tensor, gamma: float
) -> Tensor:
    """Eq. 4, `C = gamma * D + (1 - gamma) * I` on the visual span.

    D[i, j] = A[i, j] + A[j, i] (direct; causal, so one term is 0) and
    I[i, j] = mean over instruction queries k of A[k, i] * A[k, j] (indirect).
    attn: [B, L, L]; src: [B, r], dst: [B, m] index the span. Returns [B, r, m].
    """
    end = start + length
    span = attn[:, start:end, start:end]  # [B, n, n]
    direct = _pick(span, src, dst) + _pick(span.transpose(1, 2), src, dst)
    text = attn[:, end:, start:end]  # [B, M, n]
    if text.shape[1] == 0:
        return gamma * direct
    t_src = text.gather(2, src.unsqueeze(1).expand(-1, text.shape[1], -1))  # [B, M, r]
    t_dst = text.gather(2, dst.unsqueeze(1).expand(-1, text.shape[1], -1))  # [B, M, m]
    indirect = t_src.transpose(1, 2) @ t_dst / text.shape[1]  # [B, r, m]
    return gamma * direct + (1.0 - gamma) * indirect


# --------------------------------------------------------------------------- compress


def _quantile_ranks(eps: float, m: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """Ranks (below, above) and weight of the eps-quantile of m values, as torch.quantile computes them."""
    rank = torch.tensor(eps, dtype=dtype) * (m - 1)  # same dtype and rounding as torch.quantile
    below, above = int(rank.floor()), int(rank.ceil())
    return below, above, float(rank - below)


def quantile_threshold(corr: Tensor, eps: float) -> Tensor:
    """tau_i, the eps-quantile of each row with linear interpolation (== torch.quantile).

    Only the top `m - floor(eps * (m - 1))` values of a row matter, so this is a
    TopK with a constant K. corr: [B, r, m]. Returns [B, r, 1].
    """
    m = corr.shape[-1]
    below, above, weight = _quantile_ranks(eps, m, corr.dtype)
    top = corr.topk(m - below, dim=-1).values  # [B, r, K] descending: ascending rank q is top[m-1-q]
    v_below = top[..., m - 1 - below : m - below]
    v_above = top[..., m - 1 - above : m - above]
    return torch.lerp(v_below, v_above, torch.tensor(weight, dtype=corr.dtype, device=corr.device))


def merge_weights(corr: Tensor, eps: float) -> Tensor:
    """alpha[i, j] = C[i, j] / sum over J_i, with J_i = {j : C[i, j] >= tau_i}, 0 elsewhere.

    corr: [B, r, m] (non-negative). Returns alpha [B, r, m]; each row sums to 1.
    """
    tau = quantile_threshold(corr, eps)
    picked = corr.masked_fill(corr < tau, 0.0)  # a scalar fill: no [B, r, m] zeros constant in the export
    return picked / picked.sum(dim=-1, keepdim=True)


def compress(x_src: Tensor, x_dst: Tensor, alpha: Tensor) -> Tensor:
    """Self-preserving fusion (Eq. 2): X_T <- (X_T + alpha^T X_S) / (1 + alpha^T 1).

    x_src: [B, r, C], x_dst: [B, m, C], alpha: [B, r, m]. Returns [B, m, C].
    """
    alpha_t = alpha.transpose(1, 2)  # [B, m, r]
    incoming = alpha_t.sum(dim=-1, keepdim=True)  # [B, m, 1]
    return (x_dst + alpha_t @ x_src) / (1.0 + incoming)


# --------------------------------------------------------------------------- steps


def vision_step(
    x: Tensor, attn: Tensor, positions: Tensor, r: int, params: VisionStepParams
) -> tuple[Tensor, Tensor]:
    """One FiCoCo-V step inside a ViT layer (after the attention residual).

    x: [B, N, C] with CLS at 0; attn: [B, N, N]; positions: [B, N-1] original
    grid index of each patch token. Returns x [B, N-r, C] (CLS, then the
    preserved patches merged and in raster order) and positions [B, N-1-r].
    """
    work = torch.promote_types(x.dtype, torch.float32)  # FiCoCo's own math in >= fp32, even in an fp16 model
    attn = attn.to(work)
    scores = vision_redundancy(attn, params.lam)  # [B, n]
    if params.penalty:
        scores = window_penalty(scores, positions, params.grid, params.window, params.scale)
    src, dst = split_by_score(scores, r)  # [B, r], [B, m]
    alpha = merge_weights(vision_correlation(attn, src, dst), params.eps)  # [B, r, m]
    patches = x[:, 1:].to(work)  # [B, n, C]
    merged = compress(gather_rows(patches, src), gather_rows(patches, dst), alpha).to(x.dtype)
    return torch.cat([x[:, :1], merged], dim=1), positions.gather(1, dst)


def language_step(
    x: Tensor, attn: Tensor, start: int, length: int, r: int, params: LanguageStepParams
) -> tuple[Tensor, Tensor]:
    """One FiCoCo-L step inside a decoder layer (after the attention residual).

    x: [B, L, C] the prompt; attn: [B, L, L]; the visual span is
    `start .. start+length-1`. Returns x [B, L-r, C] (text before, preserved
    visual tokens merged and in order, text after) and kept_rows [B, L-r]
    int64, the row of each output token in the input (for positions).
    """
    end = start + length
    work = torch.promote_types(x.dtype, torch.float32)  # FiCoCo's own math in >= fp32, even in an fp16 model
    attn = attn.to(work)
    scores = language_redundancy(attn, start, length, params.beta)  # [B, n]
    src, dst = split_by_score(scores, r)
    corr = language_correlation(attn, start, length, src, dst, params.gamma)
    alpha = merge_weights(corr, params.eps)  # [B, r, m]
    span = x[:, start:end].to(work)
    merged = compress(gather_rows(span, src), gather_rows(span, dst), alpha).to(x.dtype)
    out = torch.cat([x[:, :start], merged, x[:, end:]], dim=1)
    batch, total = x.shape[0], x.shape[1]
    before = torch.arange(start, device=x.device).expand(batch, -1)
    after = torch.arange(end, total, device=x.device).expand(batch, -1)
    return out, torch.cat([before, dst + start, after], dim=1)

