"""benchmarks/lm_compare/advantage_length.py against plain-Python correlations and advantages."""

from __future__ import annotations

import math

import torch

from benchmarks.lm_compare.advantage_length import advantages, grouped
from gprl_core.advantages import gprl_advantages


def test_advantages_are_each_arms_first_step_advantage() -> None:
    """The drop arm is the per-dimension advantage with the length axis's weight 0 and the
    others K/(K−1); axis rows are the raw group scores, whose correlation ignores λ."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(3, 4, 6, generator=gen), dim=-1)
    eig = torch.softmax(torch.randn(3, 3, generator=gen), dim=-1)
    got = advantages(emb, eig, axis=2)
    assert torch.equal(got["gprl"], gprl_advantages(emb, eig).advantages)
    want = gprl_advantages(emb, eig, torch.tensor([1.5, 1.5, 0.0])).advantages
    assert torch.allclose(got["gprl_drop"], want)
    scalar = gprl_advantages(emb, eig, normalization="global").advantages
    assert torch.equal(got["scalar_grpo"], scalar)
    a, b = emb[0, 1, 4:6], emb[0, 3, 4:6]  # axis 2 of answers 1 and 3 of group 0
    s13 = float(a[0] * b[1] - a[1] * b[0])  # s_2(1, 3): the 2×2 skew form
    pairs = [emb[0, j, 4:6] for j in (0, 2, 3)]
    mean = sum(float(a[0] * p[1] - a[1] * p[0]) for p in pairs) / 3
    assert math.isclose(float(got["axis 2"][0, 1]), mean, rel_tol=1e-5) and s13 != 0


def test_grouped_keeps_prompt_order() -> None:
    rows = [{"prompt_index": p} for p in (4, 1, 4, 1, 9)]
    assert grouped(rows) == [[1, 3], [0, 2], [4]]
    assert grouped(rows, "even") == [[1, 3], [4]] and grouped(rows, "odd") == [[0, 2]]


def test_length_free_rows_are_orthogonal_to_the_within_group_covariance() -> None:
    """length_free_verifier.py: c written out as a double loop; after orthogonalising, every
    row's scores V'_r · h are uncorrelated with y inside the groups, and a row already
    orthogonal to c is unchanged."""
    from benchmarks.lm_compare.length_free_verifier import orthogonalise, within_group_cov

    gen = torch.Generator().manual_seed(2)
    h, y = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, generator=gen)
    c = within_group_cov(h, y)
    for d in range(5):
        want = 0.0
        for g in range(3):
            hm = sum(float(h[g, i, d]) for i in range(4)) / 4
            ym = sum(float(y[g, i]) for i in range(4)) / 4
            want += sum((float(h[g, i, d]) - hm) * (float(y[g, i]) - ym) for i in range(4))
        assert math.isclose(float(c[d]), want, rel_tol=1e-9, abs_tol=1e-12)
    value = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    free = orthogonalise(value, c)
    scores = h.double() @ free.T  # (3, 4, 6)
    yc = y.double() - y.double().mean(1, keepdim=True)
    sc = scores - scores.mean(1, keepdim=True)
    assert torch.allclose(
        torch.einsum("ngr,ng->r", sc, yc), torch.zeros(6, dtype=torch.float64), atol=1e-10
    )
    ortho = free[0:1]
    assert torch.allclose(orthogonalise(ortho, c), ortho, atol=1e-12)
