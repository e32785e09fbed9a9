"""ficoco/core.py (static-shape FiCoCo) against the plain reference in tests/reference.py
and against properties stated in the paper (arXiv 2411.17686) / /work/shared/ficoco-spec.md.

All random inputs are seeded and float64, so the discarded sets must match exactly.
Readings of the spec shared by both implementations are listed in tests/reference.py.
The spec sentence "every preserved token keeps at least half of its own content" is only
true when the weights it receives sum to <= 1; the tests check Eq. 2 as written.
"""

import pytest
import torch

from ficoco.core import (
    LanguageStepParams,
    VisionStepParams,
    compress,
    language_correlation,
    language_redundancy,
    language_step,
    merge_weights,
    quantile_threshold,
    split_by_score,
    vision_correlation,
    vision_redundancy,
    vision_step,
    window_penalty,
)

try:
    from tests.reference import (ref_compress, ref_language_correlation, ref_language_scores,
                                 ref_language_step, ref_merge_weights, ref_vision_scores,
                                 ref_vision_step, ref_window_penalty)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from reference import (ref_compress, ref_language_correlation, ref_language_scores,
                           ref_language_step, ref_merge_weights, ref_vision_scores,
                           ref_vision_step, ref_window_penalty)

F64 = torch.float64
GRID = (24, 24)
N_VIT = 577  # CLS + 24 x 24 patches


# ----------------------------------------------------------------------------- inputs

def attention(n, gen, temp=4.0, causal=False, batch=2):
    """Row-softmax of random logits; a high temperature gives peaked rows."""
    logits = torch.randn(batch, n, n, generator=gen, dtype=F64) * temp
    if causal:
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(upper, float("-inf"))
    return logits.softmax(dim=-1)


def hidden(n, gen, channels=16, batch=2):
    return torch.randn(batch, n, channels, generator=gen, dtype=F64)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=0)


def check_vision_components(A, pos, r, params, ref):
    """Every stage of the static V step for one batch row against the reference."""
    s = vision_redundancy(A[None], params.lam)
    if params.penalty:
        s = window_penalty(s, pos[None], params.grid, params.window, params.scale)
    close(s[0], ref["scores"], atol=1e-12)
    src, dst = split_by_score(s, r)
    assert sorted(src[0].tolist()) == ref["discard"]
    assert dst[0].tolist() == ref["keep"]  # ascending index order
    # reorder the reference rows (ascending) to the static src order
    perm = [ref["discard"].index(i) for i in src[0].tolist()]
    corr = vision_correlation(A[None], src, dst)
    close(corr[0], ref["corr"][perm], atol=1e-12)
    close(merge_weights(corr, params.eps)[0], ref["alpha"][perm], atol=1e-12)


def run_vision_and_compare(x, A, pos, r, params, components=True):
    x_out, pos_out = vision_step(x, A, pos, r, params)
    B, N, C = x.shape
    assert x_out.shape == (B, N - r, C)
    assert pos_out.shape == (B, N - 1 - r) and pos_out.dtype == torch.int64
    refs = []
    for b in range(B):
        ref = ref_vision_step(x[b], A[b], pos[b], r, grid=params.grid, lam=params.lam,
                              eps=params.eps, window=params.window, scale=params.scale,
                              penalty=params.penalty)
        assert pos_out[b].tolist() == ref["positions"].tolist()
        close(x_out[b], ref["x"])
        if components:
            check_vision_components(A[b], pos[b], r, params, ref)
        refs.append(ref)
    return x_out, pos_out, refs


# ----------------------------------------------------------------------------- FiCoCo-V

@pytest.mark.parametrize("penalty", [True, False], ids=["penalty", "no_penalty"])
@pytest.mark.parametrize("r", [1, 42, 200, 575])
def test_vision_step_matches_reference(r, penalty):
    gen = torch.Generator().manual_seed(100 + r + 7 * penalty)
    x, A = hidden(N_VIT, gen), attention(N_VIT, gen)
    pos = torch.arange(N_VIT - 1).expand(2, -1).contiguous()
    params = VisionStepParams(penalty=penalty)
    _, _, refs = run_vision_and_compare(x, A, pos, r, params)
    # the two batch rows use different maps, so they must not reduce alike
    assert refs[0]["discard"] != refs[1]["discard"]


@pytest.mark.parametrize("penalty", [True, False], ids=["penalty", "no_penalty"])
@pytest.mark.parametrize("r1,r2", [(42, 42), (300, 100)])
def test_vision_two_step_chain_matches_reference(r1, r2, penalty):
    """Positions carried from step 1 to step 2, so the penalty in step 2 sees holes."""
    gen = torch.Generator().manual_seed(200 + r1 + r2 + penalty)
    params = VisionStepParams(penalty=penalty)
    x, A = hidden(N_VIT, gen), attention(N_VIT, gen)
    pos = torch.arange(N_VIT - 1).expand(2, -1).contiguous()
    x1, pos1, _ = run_vision_and_compare(x, A, pos, r1, params, components=False)
    A2 = attention(N_VIT - r1, gen)
    x2, pos2, _ = run_vision_and_compare(x1, A2, pos1, r2, params)
    assert x2.shape[1] == N_VIT - r1 - r2
    assert set(pos2[0].tolist()) < set(pos1[0].tolist())


def test_vision_step_properties():
    gen = torch.Generator().manual_seed(3)
    x, A = hidden(N_VIT, gen), attention(N_VIT, gen)
    pos = torch.arange(N_VIT - 1).expand(2, -1).contiguous()
    params = VisionStepParams()
    for r in (42, 42, 42):
        N = x.shape[1]
        x_new, pos_new = vision_step(x, A, pos, r, params)
        assert x_new.shape[1] == N - r and pos_new.shape[1] == N - 1 - r
        assert torch.equal(x_new[:, 0], x[:, 0])  # CLS untouched
        assert bool((pos_new[:, 1:] > pos_new[:, :-1]).all())  # raster order kept
        for b in range(2):
            assert set(pos_new[b].tolist()) <= set(pos[b].tolist())
        x, pos, A = x_new, pos_new, attention(N - r, gen)


def test_vision_redundancy_eq1_by_hand():
    # N = 3: CLS + 2 patches; v_i = mean over the 2 patch queries, c_i = A[CLS, i]
    A = torch.tensor([[[0.2, 0.5, 0.3],
                       [0.1, 0.6, 0.3],
                       [0.3, 0.3, 0.4]]], dtype=F64)
    lam = 0.35
    expected = torch.tensor([[lam * (0.6 + 0.3) / 2 - (1 - lam) * 0.5,
                              lam * (0.3 + 0.4) / 2 - (1 - lam) * 0.3]], dtype=F64)
    close(vision_redundancy(A, lam), expected, atol=1e-12)
    close(ref_vision_scores(A[0], lam), expected[0], atol=1e-12)


def test_split_by_score_highest_and_ascending_rest():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=F64)
    src, dst = split_by_score(s, 2)
    assert src.dtype == torch.int64 and dst.dtype == torch.int64
    assert sorted(src[0].tolist()) == [1, 3] and dst[0].tolist() == [0, 2, 4, 5]
    assert sorted(src[1].tolist()) == [0, 1] and dst[1].tolist() == [2, 3, 4, 5]


# ----------------------------------------------------------------------------- local penalty

def _penalty_both(scores, positions, grid, window, scale=2.0):
    """(static, reference) penalised scores for a [B, n] batch."""
    static = window_penalty(scores, positions, grid, window, scale)
    ref = torch.stack([ref_window_penalty(scores[b], positions[b], grid, window, scale)
                       for b in range(scores.shape[0])])
    return static, ref


def test_penalty_spreads_discards_across_windows():
    """4x4 grid, 2x2 windows, r=4: without the penalty the 4 discards fill one window;
    with it they land in 4 different windows. Row 0 positive scores, row 1 negative."""
    window_of = lambda cell: (cell // 4 // 2, cell % 4 // 2)
    pos_scores = {0: 10, 1: 9.5, 4: 9, 5: 8.5, 2: 6, 3: 1.0, 6: 1.1, 7: 1.2,
                  8: 5.5, 9: 1.3, 12: 1.4, 13: 1.5, 10: 5, 11: 1.6, 14: 1.7, 15: 1.8}
    neg_scores = {0: -1.0, 1: -1.1, 4: -1.2, 5: -1.3, 3: -1.5, 2: -3.0, 6: -3.1, 7: -3.2,
                  9: -1.6, 8: -3.3, 12: -3.4, 13: -3.5, 15: -1.7, 10: -3.6, 11: -3.7, 14: -3.8}
    scores = torch.tensor([[d[c] for c in range(16)] for d in (pos_scores, neg_scores)], dtype=F64)
    positions = torch.arange(16).expand(2, -1).contiguous()
    expected = scores.clone()
    expected[0, [0, 2, 8, 10]] *= 2  # positive window maxima doubled
    expected[1, [0, 3, 9, 15]] /= 2  # negative window maxima halved
    static, ref = _penalty_both(scores, positions, (4, 4), (2, 2))
    close(static, expected, atol=0)
    close(ref, expected, atol=0)
    src_plain, _ = split_by_score(scores, 4)
    src_pen, _ = split_by_score(static, 4)
    for b, winners in ((0, {0, 2, 8, 10}), (1, {0, 3, 9, 15})):
        assert set(src_plain[b].tolist()) == {0, 1, 4, 5}
        assert len({window_of(c) for c in src_plain[b].tolist()}) == 1
        assert set(src_pen[b].tolist()) == winners
        assert len({window_of(c) for c in src_pen[b].tolist()}) == 4


def test_penalty_with_holes_ties_and_negative_windows():
    """Cells absent from the current tokens never win a window, even when every present
    score is negative; tied maxima are all scaled."""
    cells = [1, 2, 3, 6, 7, 9, 10, 11, 14, 15]  # holes at 0, 4, 5, 8, 12, 13
    by_cell = {1: -3.0, 2: 0.5, 3: 0.7, 6: 0.7, 7: 0.1, 9: -0.2,
               10: -1.0, 11: -2.0, 14: -0.5, 15: -4.0}
    expected_cell = {**by_cell, 1: -1.5, 3: 1.4, 6: 1.4, 9: -0.1, 14: -0.25}
    scores = torch.tensor([[by_cell[c] for c in cells]], dtype=F64)
    positions = torch.tensor([cells])
    expected = torch.tensor([[expected_cell[c] for c in cells]], dtype=F64)
    static, ref = _penalty_both(scores, positions, (4, 4), (2, 2))
    close(static, expected, atol=0)
    close(ref, expected, atol=0)


def test_penalty_partial_edge_windows():
    """5x5 grid with 2x2 windows: 3x3 windows, the last row/column windows are partial."""
    scores = (torch.arange(25, dtype=F64) + 1)[None]  # positive, increasing in raster order
    positions = torch.arange(25)[None]
    maxima = [6, 8, 9, 16, 18, 19, 21, 23, 24]  # largest cell of every window, by hand
    expected = scores.clone()
    expected[0, maxima] *= 2
    static, ref = _penalty_both(scores, positions, (5, 5), (2, 2))
    close(static, expected, atol=0)
    close(ref, expected, atol=0)


def test_penalty_scale_parameter():
    scores = torch.tensor([[1.0, 0.5, -2.0, -3.0]], dtype=F64)
    positions = torch.tensor([[0, 1, 2, 3]])  # 1x4 grid, 1x2 windows
    static, ref = _penalty_both(scores, positions, (1, 4), (1, 2), scale=3.0)
    expected = torch.tensor([[3.0, 0.5, -2.0 / 3.0, -3.0]], dtype=F64)
    close(static, expected, atol=1e-12)  # float64 scores must get a float64 factor
    close(ref, expected, atol=1e-12)


# ----------------------------------------------------------------------------- correlate

def _rows_with_forced_lengths(gen, lengths, rows=3):
    for m in lengths:
        yield m, torch.rand(2, rows, m, generator=gen, dtype=F64)
        # ties: values from a small integer range
        yield m, torch.randint(0, 4, (2, rows, m), generator=gen).to(F64)


def test_quantile_threshold_equals_torch_quantile():
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 701, (40,), generator=gen).tolist()
    lengths += [1, 2, 3, 500, 501, 502, 577, 700, 1001]  # m - 1 multiple of 500: 1, 501, 1001
    for m, corr in _rows_with_forced_lengths(gen, lengths):
        for dtype in (F64, torch.float32):
            c = corr.to(dtype)
            got = quantile_threshold(c, 0.998)
            assert got.shape == (2, 3, 1)
            want = torch.quantile(c, 0.998, dim=-1, keepdim=True)
            torch.testing.assert_close(got, want, atol=0 if dtype == F64 else 1e-6, rtol=1e-12,
                                       msg=f"m={m} dtype={dtype}")


@pytest.mark.parametrize("eps", [0.998, 0.9, 0.5])
def test_quantile_threshold_other_eps(eps):
    gen = torch.Generator().manual_seed(12)
    for m in (1, 2, 7, 50, 301):
        corr = torch.rand(1, 4, m, generator=gen, dtype=F64)
        close(quantile_threshold(corr, eps), torch.quantile(corr, eps, dim=-1, keepdim=True), 1e-15)


def test_number_of_targets_follows_quantile():
    """With distinct values, |J_i| = m - ceil(0.998 (m - 1)): 1 target up to m = 500,
    2 targets for 501 <= m <= 1000 (the paper's 'usually 1-2'), never 0."""
    gen = torch.Generator().manual_seed(13)
    for m in (1, 2, 100, 500, 501, 534, 1000, 1001):
        corr = torch.rand(1, 5, m, generator=gen, dtype=F64)
        alpha = merge_weights(corr, 0.998)
        expected = m - (-(-998 * (m - 1) // 1000))  # exact integer ceil
        assert ((alpha > 0).sum(-1) == expected).all(), m
        close(alpha[0], ref_merge_weights(corr[0], 0.998), atol=1e-15)


def test_merge_weights_properties():
    gen = torch.Generator().manual_seed(14)
    for m in (1, 5, 300, 501, 534, 650):
        corr = torch.rand(2, 7, m, generator=gen, dtype=F64) ** 3
        alpha = merge_weights(corr, 0.998)
        assert alpha.shape == corr.shape
        assert bool((alpha >= 0).all())
        close(alpha.sum(-1), torch.ones(2, 7, dtype=F64), atol=1e-12)  # one token's weights sum to 1
        tau = torch.quantile(corr, 0.998, dim=-1, keepdim=True)
        assert torch.equal(alpha > 0, corr >= tau)  # support is exactly J_i
        # on J_i the weights are proportional to C[i, j]
        ratio = torch.where(alpha > 0, alpha / corr, torch.zeros_like(alpha))
        inv_sum = 1.0 / torch.where(corr >= tau, corr, torch.zeros_like(corr)).sum(-1, keepdim=True)
        close(ratio, torch.where(alpha > 0, inv_sum.expand_as(alpha), torch.zeros_like(alpha)), 1e-12)
        for b in range(2):
            close(alpha[b], ref_merge_weights(corr[b], 0.998), atol=1e-15)
        # float32 too: the support must be J_i of torch.quantile in that dtype
        c32 = corr.float()
        tau32 = torch.quantile(c32, 0.998, dim=-1, keepdim=True)
        assert torch.equal(merge_weights(c32, 0.998) > 0, c32 >= tau32), m


def test_adaptive_k_differs_from_fixed_k1():
    """Ablation: a row with two near-equal maxima (m = 600, so J_i has 2 elements) splits
    the discarded token between both; fixed K = 1 (ToMe-like) sends it all to the argmax."""
    gen = torch.Generator().manual_seed(15)
    m = 600
    corr = torch.rand(1, 1, m, generator=gen, dtype=F64) * 0.1
    corr[0, 0, 7], corr[0, 0, 300] = 0.5, 0.49
    alpha = merge_weights(corr, 0.998)
    assert (alpha[0, 0] > 0).nonzero().flatten().tolist() == [7, 300]
    close(alpha[0, 0, [7, 300]], torch.tensor([0.5 / 0.99, 0.49 / 0.99], dtype=F64), 1e-15)
    k1 = torch.zeros_like(alpha)
    k1[0, 0, 7] = 1.0
    x_src = torch.ones(1, 1, 1, dtype=F64)
    x_dst = torch.zeros(1, m, 1, dtype=F64)
    adaptive, fixed = compress(x_src, x_dst, alpha), compress(x_src, x_dst, k1)
    a7, a300 = 0.5 / 0.99, 0.49 / 0.99
    close(adaptive[0, [7, 300], 0], torch.tensor([a7 / (1 + a7), a300 / (1 + a300)], dtype=F64), 1e-15)
    close(fixed[0, [7, 300], 0], torch.tensor([0.5, 0.0], dtype=F64), 1e-15)
    assert not torch.allclose(adaptive, fixed)


# ----------------------------------------------------------------------------- compress

def _coefficients(alpha):
    """Run compress on basis vectors: out[b, j, :m] are the weights of the preserved tokens,
    out[b, j, m:] those of the discarded ones, in the merged state of preserved token j."""
    B, r, m = alpha.shape
    eye = torch.eye(m + r, dtype=alpha.dtype).expand(B, -1, -1)
    return compress(eye[:, m:], eye[:, :m], alpha)


def test_compress_matches_reference():
    gen = torch.Generator().manual_seed(21)
    corr = torch.rand(2, 40, 200, generator=gen, dtype=F64) ** 4
    alpha = merge_weights(corr, 0.9)  # several targets per row, many shared targets
    x_src, x_dst = hidden(40, gen), hidden(200, gen)
    out = compress(x_src, x_dst, alpha)
    for b in range(2):
        close(out[b], ref_compress(x_src[b], x_dst[b], alpha[b]), atol=1e-12)


def test_compress_self_preserving_weights():
    """Eq. 2: the merged state is a convex combination; the preserved token's own weight is
    1 / (1 + sum_i alpha[i, j]) and is never below any single discarded token's weight.
    It is >= 1/2 exactly when the incoming weights sum to <= 1."""
    gen = torch.Generator().manual_seed(22)
    for eps in (0.998, 0.9):
        corr = torch.rand(2, 60, 80, generator=gen, dtype=F64) ** 4
        alpha = merge_weights(corr, eps)
        coef = _coefficients(alpha)
        m = alpha.shape[-1]
        incoming = alpha.sum(1)  # [B, m]
        own = coef[:, torch.arange(m), torch.arange(m)]
        close(coef.sum(-1), torch.ones(2, m, dtype=F64), atol=1e-12)
        close(own, 1.0 / (1.0 + incoming), atol=1e-12)
        close(coef[:, :, m:], alpha.transpose(1, 2) / (1.0 + incoming)[..., None], atol=1e-12)
        assert bool((own[..., None] >= coef[:, :, m:] - 1e-15).all())
        assert torch.equal(own >= 0.5 - 1e-12, incoming <= 1 + 1e-12)
        # preserved tokens that receive nothing keep their state exactly
        free = incoming == 0
        assert bool((own[free] == 1).all())
        if eps == 0.998:  # 1 target per row, 60 rows, 80 columns: some columns are free
            assert bool(free.any())


def test_compress_half_claim_fails_with_two_full_sources():
    """Counter-example to the spec sentence 'every preserved token keeps at least half of
    its own content': two discarded tokens that both merge fully into the same target
    leave it 1/3 of its own content (the formula is what the paper's Eq. 2 says)."""
    alpha = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=F64)  # r=2 sources -> target 0
    coef = _coefficients(alpha)
    close(coef[0, 0], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3], dtype=F64), atol=1e-15)
    close(coef[0, 1], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64), atol=0)


# ----------------------------------------------------------------------------- FiCoCo-L

def test_language_eq3_eq4_by_hand():
    # L = 5: text row 0, visual span rows 1..2 (start=1, length=2), text after rows 3..4 (M=2)
    A = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0],
                       [0.4, 0.6, 0.0, 0.0, 0.0],
                       [0.2, 0.3, 0.5, 0.0, 0.0],
                       [0.1, 0.2, 0.3, 0.4, 0.0],
                       [0.1, 0.1, 0.2, 0.2, 0.4]]], dtype=F64)
    # v = [(0.6 + 0.3) / 2, (0 + 0.5) / 2], t = [(0.2 + 0.1) / 2, (0.3 + 0.2) / 2]
    expected = torch.tensor([[0.6 * 0.45 - 0.4 * 0.15, 0.6 * 0.25 - 0.4 * 0.25]], dtype=F64)
    close(language_redundancy(A, 1, 2, 0.6), expected, atol=1e-15)
    close(ref_language_scores(A[0], 1, 2, 0.6), expected[0], atol=1e-15)
    # D = A[1, 2] + A[2, 1] = 0.3; I = (0.2 * 0.3 + 0.1 * 0.2) / 2 = 0.04
    c = 0.6 * 0.3 + 0.4 * 0.04
    i0, i1 = torch.tensor([[0]]), torch.tensor([[1]])
    close(language_correlation(A, 1, 2, i0, i1, 0.6), torch.tensor([[[c]]], dtype=F64), 1e-15)
    close(language_correlation(A, 1, 2, i1, i0, 0.6), torch.tensor([[[c]]], dtype=F64), 1e-15)
    close(ref_language_correlation(A[0], 1, 2, [0], [1], 0.6), torch.tensor([[c]], dtype=F64), 1e-15)


def check_language_components(A, start, length, r, params, ref):
    s = language_redundancy(A[None], start, length, params.beta)
    close(s[0], ref["scores"], atol=1e-12)
    src, dst = split_by_score(s, r)
    assert sorted(src[0].tolist()) == ref["discard"]
    assert dst[0].tolist() == ref["keep"]
    perm = [ref["discard"].index(i) for i in src[0].tolist()]
    corr = language_correlation(A[None], start, length, src, dst, params.gamma)
    close(corr[0], ref["corr"][perm], atol=1e-12)
    close(merge_weights(corr, params.eps)[0], ref["alpha"][perm], atol=1e-12)


@pytest.mark.parametrize("start,length,M,r", [
    (5, 576, 60, 1), (5, 576, 60, 100), (5, 576, 60, 288), (5, 576, 60, 575),
    (5, 576, 3, 1), (5, 576, 3, 100), (5, 576, 3, 288), (5, 576, 3, 575),
    (0, 50, 10, 20),   # span at the start of the prompt
    (3, 40, 0, 10),    # no text after the image: text terms are 0
])
def test_language_step_matches_reference(start, length, M, r):
    gen = torch.Generator().manual_seed(300 + start + length + M + r)
    L = start + length + M
    x, A = hidden(L, gen), attention(L, gen, causal=True)
    params = LanguageStepParams()
    x_out, kept = language_step(x, A, start, length, r, params)
    assert x_out.shape == (2, L - r, x.shape[-1])
    assert kept.shape == (2, L - r) and kept.dtype == torch.int64
    refs = []
    for b in range(2):
        ref = ref_language_step(x[b], A[b], start, length, r)
        assert kept[b].tolist() == ref["kept_rows"].tolist()
        close(x_out[b], ref["x"])
        check_language_components(A[b], start, length, r, params, ref)
        refs.append(ref)
    # text before and after the image is untouched; kept rows ascending
    assert torch.equal(x_out[:, :start], x[:, :start])
    assert torch.equal(x_out[:, L - r - M:], x[:, start + length:])
    assert bool((kept[:, 1:] > kept[:, :-1]).all())
    if 1 < r < length - 1:
        assert refs[0]["discard"] != refs[1]["discard"]


def test_language_redundancy_without_text_after():
    gen = torch.Generator().manual_seed(31)
    A = attention(20, gen, causal=True)
    s = language_redundancy(A, 4, 16, 0.6)  # span runs to the end: M = 0
    assert bool(torch.isfinite(s).all())
    close(s, 0.6 * A[:, 4:, 4:].mean(1), atol=1e-15)
