"""A deliberately plain reference implementation of FiCoCo, used only by the tests.

Written from /work/shared/ficoco-spec.md (arXiv 2411.17686, Eq. 1-4), independently of
ficoco/core.py. One example at a time (no batch dimension), per-token Python loops,
``torch.quantile`` for the threshold. Use float64 inputs for comparisons.

Index conventions
-----------------
* FiCoCo-V: ``x``/``A`` rows are [CLS, patch 0, patch 1, ...]; "patch index" p is the
  0-based index among the current patch tokens, i.e. sequence row ``p + 1``.
* FiCoCo-L: "span index" p is the 0-based index inside the visual span, i.e. sequence
  row ``start + p``; the text queries "after the image" are rows ``start + length .. L-1``.

Readings taken where the spec leaves room:
* v_i (Eq. 1, Eq. 3) is a plain mean over *all* current patch / visual queries, the token
  itself included, and for FiCoCo-L including the causally masked (zero) entries.
* The r highest scores are discarded; ties (not expected with random inputs) are broken
  towards the lower index.
* A window max equal to 0 is left unchanged (neither positive nor negative).
* FiCoCo-L correlation uses sequence coordinates: D[i, j] = A[start+i, start+j] +
  A[start+j, start+i], and the indirect term averages over the M text-after queries only.
"""
import torch


# ----------------------------------------------------------------------------- filter

def ref_vision_scores(A, lam):
    """Eq. 1: s_i = lam * v_i - (1 - lam) * c_i for every current patch token i."""
    N = A.shape[0]
    scores = []
    for i in range(1, N):                      # sequence row of patch token i-1
        v_i = A[1:N, i].mean()                 # mean over patch queries j of A[j, i]
        c_i = A[0, i]                          # attention from CLS to i
        scores.append(lam * v_i - (1 - lam) * c_i)
    return torch.stack(scores)


def ref_language_scores(A, start, length, beta):
    """Eq. 3: s_i = beta * v_i - (1 - beta) * t_i for every visual token i of the span."""
    L = A.shape[0]
    text_after = list(range(start + length, L))   # the M instruction queries
    scores = []
    for p in range(length):
        i = start + p
        v_i = A[start:start + length, i].mean()   # mean over visual queries j of A[j, i]
        if text_after:
            t_i = A[text_after, i].mean()         # mean over text queries k of A[k, i]
        else:
            t_i = torch.zeros((), dtype=A.dtype)  # M == 0: text term is 0
        scores.append(beta * v_i - (1 - beta) * t_i)
    return torch.stack(scores)


def ref_window_penalty(scores, positions, grid, window, scale):
    """Local penalty: the max of each non-overlapping window (on the original grid) is
    multiplied by ``scale`` if positive, divided by ``scale`` if negative. Only the tokens
    present count; ties for a window's max are all scaled; edge windows may be partial."""
    H, W = grid
    h, w = window
    out = scores.clone()
    window_of = []                             # window id of every current token
    for p in positions.tolist():
        row, col = p // W, p % W
        window_of.append((row // h, col // w))
    for wy in range((H + h - 1) // h):
        for wx in range((W + w - 1) // w):
            members = [t for t in range(len(window_of)) if window_of[t] == (wy, wx)]
            if not members:                    # only padding (holes) in this window
                continue
            best = max(float(scores[t]) for t in members)
            for t in members:
                if float(scores[t]) == best:
                    if best > 0:
                        out[t] = scores[t] * scale
                    elif best < 0:
                        out[t] = scores[t] / scale
    return out


def ref_split(scores, r):
    """Discard the r highest scores. Returns (discard, keep), both ascending lists."""
    order = sorted(range(len(scores)), key=lambda t: (-float(scores[t]), t))
    discard = sorted(order[:r])
    keep = sorted(order[r:])
    return discard, keep


# ----------------------------------------------------------------------------- correlate

def ref_vision_correlation(A, discard, keep):
    """C[i, j] = A[i, j]: discarded patch query i attending to preserved patch key j."""
    C = torch.zeros(len(discard), len(keep), dtype=A.dtype)
    key_rows = [j + 1 for j in keep]           # +1: skip the CLS row/column
    for a, i in enumerate(discard):
        C[a] = A[i + 1, key_rows]
    return C


def ref_language_correlation(A, start, length, discard, keep, gamma):
    """Eq. 4: C = gamma * (A[i, j] + A[j, i]) + (1 - gamma) * mean_k A[k, i] * A[k, j]."""
    L = A.shape[0]
    text_after = list(range(start + length, L))
    kept_rows = [start + j for j in keep]
    text_to_kept = A[text_after][:, kept_rows]   # [M, m]: A[k, j] for the kept j
    C = torch.zeros(len(discard), len(keep), dtype=A.dtype)
    for a, p in enumerate(discard):
        i = start + p
        direct = A[i, kept_rows] + A[kept_rows, i]
        if text_after:
            indirect = (A[text_after, i][:, None] * text_to_kept).mean(0)  # mean over k
        else:
            indirect = torch.zeros(len(keep), dtype=A.dtype)
        C[a] = gamma * direct + (1 - gamma) * indirect
    return C


def ref_merge_weights(C, eps):
    """tau_i = eps-quantile of row i; J_i = {j : C[i, j] >= tau_i}; alpha normalised over J_i."""
    alpha = torch.zeros_like(C)
    for a in range(C.shape[0]):
        row = C[a]
        tau = float(torch.quantile(row, eps))  # linear interpolation
        values = row.tolist()
        targets = [b for b in range(len(values)) if values[b] >= tau]
        total = sum(values[b] for b in targets)
        for b in targets:
            alpha[a, b] = values[b] / total
    return alpha


# ----------------------------------------------------------------------------- compress

def ref_compress(x_src, x_dst, alpha):
    """Eq. 2: X_T[j] <- (X_T[j] + sum_i alpha[i, j] X_S[i]) / (1 + sum_i alpha[i, j])."""
    out = torch.empty_like(x_dst)
    weights = alpha.tolist()
    for j in range(x_dst.shape[0]):
        num = x_dst[j].clone()
        den = 1.0
        for i in range(x_src.shape[0]):
            a = weights[i][j]
            if a != 0.0:
                num = num + a * x_src[i]
                den = den + a
        out[j] = num / den
    return out


# ----------------------------------------------------------------------------- steps

def ref_vision_step(x, A, positions, r, grid=(24, 24), lam=0.35, eps=0.998, window=(2, 2),
                    scale=2.0, penalty=True):
    """One FiCoCo-V reduction step on one example (see module docstring)."""
    scores = ref_vision_scores(A, lam)
    if penalty:
        scores = ref_window_penalty(scores, positions, grid, window, scale)
    discard, keep = ref_split(scores, r)
    C = ref_vision_correlation(A, discard, keep)
    alpha = ref_merge_weights(C, eps)
    x_src = x[[i + 1 for i in discard]]
    x_dst = x[[j + 1 for j in keep]]
    merged = ref_compress(x_src, x_dst, alpha)
    new_x = torch.cat([x[:1], merged], dim=0)  # CLS first, then kept patches in raster order
    return dict(discard=discard, keep=keep, x=new_x, positions=positions[keep],
                alpha=alpha, scores=scores, corr=C)


def ref_language_step(x, A, start, length, r, beta=0.6, gamma=0.6, eps=0.998):
    """One FiCoCo-L reduction step on one example (see module docstring)."""
    L = x.shape[0]
    scores = ref_language_scores(A, start, length, beta)
    discard, keep = ref_split(scores, r)
    C = ref_language_correlation(A, start, length, discard, keep, gamma)
    alpha = ref_merge_weights(C, eps)
    x_src = x[[start + i for i in discard]]
    x_dst = x[[start + j for j in keep]]
    merged = ref_compress(x_src, x_dst, alpha)
    new_x = torch.cat([x[:start], merged, x[start + length:]], dim=0)
    kept_rows = torch.tensor(list(range(start)) + [start + j for j in keep]
                             + list(range(start + length, L)), dtype=torch.int64)
    return dict(discard=discard, keep=keep, x=new_x, kept_rows=kept_rows,
                alpha=alpha, scores=scores, corr=C)
