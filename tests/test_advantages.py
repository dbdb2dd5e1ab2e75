"""GPRL advantages against explicit slow references (double loops over groups and responses)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gprl_client.advantages import (
    axis_variance,
    gpm_scalar_reward,
    gprl_advantages,
    scalar_grpo_advantages,
)
from gprl_client.gpm_math import group_scores, per_dimension_scores

# --- slow references: plain Python loops, one group and one response at a time -------------------


def slow_group_scores(emb: torch.Tensor) -> list[list[list[float]]]:
    """ŝ_l(i) = 1/(G'−1) Σ_{j≠i, j valid} s_l(i, j); NaN for invalid rows or G' < 2."""
    n, g, d = emb.shape
    out = []
    for x in range(n):
        valid = [i for i in range(g) if bool(torch.isfinite(emb[x, i]).all())]
        rows = []
        for i in range(g):
            if i not in valid or len(valid) < 2:
                rows.append([math.nan] * (d // 2))
                continue
            total = [0.0] * (d // 2)
            for j in valid:
                if j != i:
                    s = per_dimension_scores(emb[x, i], emb[x, j]).tolist()
                    total = [t + v for t, v in zip(total, s, strict=True)]
            rows.append([t / (len(valid) - 1) for t in total])
        out.append(rows)
    return out


def slow_normalize(values: list[float], ddof: int, flat: bool) -> list[float]:
    """(x − mean) / std over the finite entries (ddof given); 0 for NaN entries or when flat."""
    live = [v for v in values if not math.isnan(v)]
    if len(live) < 2 or flat:
        return [0.0] * len(values)
    mean = sum(live) / len(live)
    std = math.sqrt(sum((v - mean) ** 2 for v in live) / (len(live) - ddof))
    return [0.0 if math.isnan(v) else (v - mean) / std for v in values]


def slow_advantages(emb, lam, m, ddof=0, normalization="per_dimension"):
    """The GPRL (or the global-normalisation) advantage with loops; data chosen non-flat."""
    s_hat = slow_group_scores(emb)
    n, g, k = len(s_hat), len(s_hat[0]), len(s_hat[0][0])
    adv = []
    for x in range(n):
        coef = [m[ell] * lam[x][ell] for ell in range(k)]
        if normalization == "per_dimension":
            cols = [
                slow_normalize([s_hat[x][i][ell] for i in range(g)], ddof, False)
                for ell in range(k)
            ]
            adv.append([sum(coef[ell] * cols[ell][i] for ell in range(k)) for i in range(g)])
        else:
            u = [sum(coef[ell] * s_hat[x][i][ell] for ell in range(k)) for i in range(g)]
            adv.append(slow_normalize(u, ddof, False))
    return torch.tensor(adv, dtype=torch.float64)


def random_batch(seed: int, n: int = 4, g: int = 6, k: int = 3, nan_rows: int = 2):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, g, 2 * k, generator=gen, dtype=torch.float64)
    lam = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), dim=-1)
    m = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
    for r in range(nan_rows):  # unscored responses in different groups
        emb[r % n, (3 * r + 1) % g] = math.nan
    return emb, lam, m


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_group_scores_equal_double_loop(seed: int) -> None:
    emb, _, _ = random_batch(seed, nan_rows=3)
    fast = group_scores(emb)
    slow = torch.tensor(slow_group_scores(emb), dtype=torch.float64)
    torch.testing.assert_close(fast, slow, equal_nan=True)
    # Σ_i ŝ_l(i) = 0 over the valid responses of each group.
    torch.testing.assert_close(torch.nansum(fast, dim=1), torch.zeros(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("normalization", ["per_dimension", "global"])
def test_advantages_equal_slow_reference(ddof: int, normalization: str) -> None:
    emb, lam, m = random_batch(3)
    out = gprl_advantages(emb, lam, m, ddof=ddof, normalization=normalization)
    ref = slow_advantages(emb, lam.tolist(), m.tolist(), ddof, normalization)
    torch.testing.assert_close(out.advantages, ref)
    # Both modes aggregate the same way: Â = Σ_l m_l λ_l normalized_l.
    torch.testing.assert_close(out.advantages, (out.normalized * m * lam[:, None, :]).sum(-1))
    torch.testing.assert_close(
        out.group_scores, torch.tensor(slow_group_scores(emb), dtype=torch.float64), equal_nan=True
    )


def test_per_dimension_normalisation_is_per_axis() -> None:
    """Each axis of each group has mean 0 and (ddof = 0) unit variance over the valid responses,
    and obeys Samuelson's bound |Â_l| ≤ √(G'−1)."""
    emb, lam, _ = random_batch(4, n=5, g=7)
    out = gprl_advantages(emb, lam)
    for x in range(5):
        live = out.valid[x]
        z = out.normalized[x][live]  # (G', K)
        torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(z.pow(2).mean(0), torch.ones(3, dtype=torch.float64))
        assert bool((z.abs() <= math.sqrt(int(live.sum()) - 1) + 1e-12).all())


@pytest.mark.parametrize("c", [0.3, 2.0, 17.0])
def test_k1_bradley_terry_equals_grpo(c: float) -> None:
    """K = 1, v(i) = (r_i, c) with c > 0: s(i, j) = c (r_i − r_j), so
    ŝ(i) = c/(G−1) Σ_{j≠i} (r_i − r_j) = c G/(G−1) · (r_i − r̄), a positive multiple of r − r̄ with
    μ = 0 and σ(ŝ) = c G/(G−1) σ(r). Hence Â = (r − r̄)/σ(r): GRPO's group normalisation, exactly
    (no additive ε; ddof = 0 on both sides). λ = softmax of one logit = 1."""
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(6, 8, generator=gen, dtype=torch.float64) * 3 + 1
    emb = torch.stack([r, torch.full_like(r, c)], dim=-1)  # (N, G, 2)
    lam = torch.softmax(torch.randn(6, 1, generator=gen, dtype=torch.float64), dim=-1)
    out = gprl_advantages(emb, lam)
    grpo = (r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out.advantages, grpo)
    torch.testing.assert_close(scalar_grpo_advantages(r), grpo)
    torch.testing.assert_close(out.group_scores[..., 0], c * 8 / 7 * (r - r.mean(1, keepdim=True)))


def test_common_factor_cancels() -> None:
    """Scaling an axis of one group by a positive factor (embedding scale, which is what λ_l or
    1/τ would be before normalisation) leaves Â_l unchanged; λ enters only after normalisation."""
    emb, lam, m = random_batch(6, nan_rows=0)
    base = gprl_advantages(emb, lam, m)
    gen = torch.Generator().manual_seed(7)
    factor = torch.exp(3 * torch.randn(4, 3, generator=gen, dtype=torch.float64))  # (N, K)
    scaled = emb * factor.repeat_interleave(2, dim=-1).sqrt()[:, None, :]  # s_l scales by factor
    out = gprl_advantages(scaled, lam, m)
    torch.testing.assert_close(out.normalized, base.normalized)
    torch.testing.assert_close(out.advantages, base.advantages)
    torch.testing.assert_close(out.group_scores, base.group_scores * factor[:, None, :])
    # Â is linear in λ: per-axis normalised values do not depend on λ at all.
    lam2 = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(gprl_advantages(emb, lam2, m).normalized, base.normalized)
    # Scalar GRPO on the GPM score: 1/τ cancels.
    r1, r2 = gpm_scalar_reward(emb, lam, tau=0.1), gpm_scalar_reward(emb, lam, tau=2.5)
    torch.testing.assert_close(scalar_grpo_advantages(r1), scalar_grpo_advantages(r2))


def test_nan_rows_are_left_out() -> None:
    emb, lam, m = random_batch(8, nan_rows=0)
    emb[1, 2] = math.nan
    emb[2, :5] = math.nan  # one valid response left: dead group
    emb[3] = math.nan  # nothing scored
    out = gprl_advantages(emb, lam, m)
    assert not torch.isnan(out.advantages).any() and not torch.isnan(out.normalized).any()
    assert out.advantages[1, 2] == 0 and (out.advantages[2:] == 0).all()
    assert out.valid_count.tolist() == [6, 5, 1, 0]
    # Group 1 equals the same group with the unscored response removed.
    keep = [0, 1, 3, 4, 5]
    alone = gprl_advantages(emb[1:2, keep], lam[1:2], m)
    torch.testing.assert_close(out.advantages[1, keep], alone.advantages[0])
    assert torch.isnan(out.axis_variance[2:]).all() and not torch.isnan(out.axis_variance[:2]).any()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_zero_variance_axis_gives_zero(scale: float) -> None:
    """An axis on which every response of a group has the same (a_l, b_l) has ŝ_l = 0 up to
    round-off; it must give Â_l = 0 at any embedding scale, not amplified round-off."""
    emb, lam, m = random_batch(9, nan_rows=0)
    emb = emb * scale
    emb[0, :, 2:4] = emb[0, 0, 2:4] + 0.1  # group 0, axis 1: identical, not exactly representable
    emb[1, :, 4] = 0.0  # group 1, axis 2: every a_2 = 0, so s_2 = 0 exactly
    emb = emb.float()
    out = gprl_advantages(emb, lam.float(), m.float())
    assert (out.normalized[0, :, 1] == 0).all() and bool(out.flat[0, 1])
    assert (out.normalized[1, :, 2] == 0).all() and bool(out.flat[1, 2])
    assert int(out.flat.sum()) == 2
    # The flat axis is simply dropped from the sum.
    expected = (out.normalized * m.float() * lam.float()[:, None, :]).sum(-1)
    torch.testing.assert_close(out.advantages, expected)


def test_global_variant_zero_when_group_flat() -> None:
    emb, lam, _ = random_batch(10, nan_rows=0)
    emb[2] = emb[2, 0]  # every response of group 2 identical
    out = gprl_advantages(emb, lam, normalization="global")
    assert (out.advantages[2] == 0).all() and bool(out.flat[2].all())
    assert not out.flat[:2].any()


def test_scalar_grpo_against_slow_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    r = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    r[0, 3] = math.nan
    r[1, :6] = math.nan
    r[2] = 4.0  # flat
    for ddof in (0, 1):
        flat = [False, False, True, False, False]
        ref = torch.tensor(
            [slow_normalize(row, ddof, f) for row, f in zip(r.tolist(), flat, strict=True)]
        )
        torch.testing.assert_close(scalar_grpo_advantages(r, ddof=ddof), ref.double())


def test_axis_variance_against_loop() -> None:
    emb, lam, _ = random_batch(12, nan_rows=3)
    s_hat = group_scores(emb)
    fast = axis_variance(s_hat, lam)
    n, g, k = s_hat.shape
    for x in range(n):
        for ell in range(k):
            vals = [float(lam[x, ell] * s_hat[x, i, ell]) for i in range(g)]
            vals = [v for v in vals if not math.isnan(v)]
            mean = sum(vals) / len(vals)
            ref = sum((v - mean) ** 2 for v in vals) / len(vals)
            assert math.isclose(float(fast[x, ell]), ref, rel_tol=1e-9, abs_tol=1e-15)
    # Ungated: λ = 1.
    torch.testing.assert_close(
        axis_variance(s_hat), axis_variance(s_hat, torch.ones(n, k).double())
    )


def test_low_precision_inputs_are_upcast() -> None:
    emb, lam, m = random_batch(13, nan_rows=1)
    out = gprl_advantages(emb.bfloat16(), lam.bfloat16(), m.bfloat16())
    assert out.advantages.dtype == torch.float32
    ref = gprl_advantages(emb.bfloat16().float(), lam.bfloat16().float(), m.bfloat16().float())
    torch.testing.assert_close(out.advantages, ref.advantages)


def test_shape_errors() -> None:
    emb, lam, m = random_batch(14)
    with pytest.raises(ValueError):
        gprl_advantages(emb[0], lam)
    with pytest.raises(ValueError):
        gprl_advantages(emb, lam[:, :2])
    with pytest.raises(ValueError):
        gprl_advantages(emb, lam, m[:2])
    with pytest.raises(ValueError):
        gprl_advantages(emb, lam, normalization="sum")  # type: ignore[arg-type]


def test_math_imports_with_heavy_packages_blocked() -> None:
    """The math modules import with httpx, ray, openrlhf, transformers, fastapi unimportable."""
    code = textwrap.dedent(
        """
        import sys
        BLOCKED = {"httpx", "ray", "openrlhf", "transformers", "fastapi", "deepspeed", "vllm"}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import gprl_client
        from gprl_client import gprl_advantages, DriftMonitor, DriftController, NoOpDriftController
        import gprl_client.advantages, gprl_client.drift, gprl_client.gpm_math
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_log_dict_per_axis_figures() -> None:
    emb, lam, m = random_batch(15, n=3, g=5, nan_rows=0)
    emb[0, 0] = math.nan
    emb[1, :, 0] = 0.0  # group 1, axis 0 flat
    emb[2, 1:] = math.nan  # dead group
    out = gprl_advantages(emb, lam, m)
    logs = out.log_dict()
    assert logs["adv/unscored_frac"] == pytest.approx(5 / 15)
    assert logs["adv/flat_frac_0"] == pytest.approx(0.5) and logs["adv/flat_frac_1"] == 0.0
    for ell in range(3):
        vals = [abs(float(out.normalized[x, i, ell])) for x in (0, 1) for i in range(5)]
        vals.pop(0)  # the unscored response of group 0
        assert logs[f"adv/mean_abs_norm_{ell}"] == pytest.approx(sum(vals) / len(vals))
        assert logs[f"adv/mean_axis_var_{ell}"] == pytest.approx(
            float(out.axis_variance[:2, ell].mean())
        )


@pytest.mark.parametrize("normalization", ["per_dimension", "global"])
def test_failed_group_with_nan_eigenvalues(normalization: str) -> None:
    """The client returns a failed group as NaN embeddings *and* NaN eigenvalues: it must give
    advantage 0, not NaN (0 · NaN), and leave the other groups untouched."""
    emb, lam, m = random_batch(16, nan_rows=0)
    ok = gprl_advantages(emb[1:], lam[1:], m, normalization=normalization)
    emb[0], lam[0] = math.nan, math.nan
    out = gprl_advantages(emb, lam, m, normalization=normalization)
    assert (out.advantages[0] == 0).all() and not out.valid[0].any()
    torch.testing.assert_close(out.advantages[1:], ok.advantages)
    assert torch.isnan(out.axis_variance[0]).all()
    lam[0] = 0.2  # finite λ but NaN embeddings: still 0
    emb[1, :, 0] = math.nan  # a single response group
    assert not torch.isnan(gprl_advantages(emb, lam, m).advantages).any()
    r = gpm_scalar_reward(emb, lam)
    assert torch.isnan(r[0]).all() and (scalar_grpo_advantages(r)[0] == 0).all()
    with pytest.raises(ValueError):
        gprl_advantages(emb, lam, torch.full_like(m, math.nan))


def test_single_response_groups() -> None:
    emb, lam, _ = random_batch(17, g=1, nan_rows=0)
    out = gprl_advantages(emb, lam)
    assert (out.advantages == 0).all() and torch.isnan(out.group_scores).all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 7),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
    st.floats(-6.0, 6.0),
    st.floats(0.0, 0.6),
)
def test_invariants_hold_for_any_batch(
    n: int, g: int, k: int, seed: int, log_scale: float, nan_frac: float
) -> None:
    """Finite output; 0 where unscored; every live, non-flat axis standardised (mean 0, unit
    variance, |Â_l| ≤ √(G'−1)); Â = Σ_l m_l λ_l Â_l."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, g, 2 * k, generator=gen, dtype=torch.float64) * 10**log_scale
    emb[torch.rand(n, g, generator=gen) < nan_frac] = math.nan
    lam = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), dim=-1)
    m = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
    out = gprl_advantages(emb, lam, m)
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.normalized).all()
    assert (out.advantages[~out.valid] == 0).all()
    torch.testing.assert_close(out.advantages, (out.normalized * m * lam[:, None, :]).sum(-1))
    for x in range(n):
        live = out.valid[x]
        gv = int(live.sum())
        for ell in range(k):
            z = out.normalized[x, live, ell]
            if gv < 2 or bool(out.flat[x, ell]):
                assert (out.normalized[x, :, ell] == 0).all()
                continue
            assert abs(float(z.mean())) < 1e-9 and abs(float(z.pow(2).mean()) - 1) < 1e-9
            assert float(z.abs().max()) <= math.sqrt(gv - 1) + 1e-9


def test_global_with_unit_weights_is_scalar_grpo_on_the_gpm_reward() -> None:
    """The scalar-GRPO arm of benchmarks/lm_compare.py: normalization="global" with m = 1 equals
    GRPO's group normalisation of the service's `rewards` field Σ_l λ_l ŝ_l / τ."""
    gen = torch.Generator().manual_seed(11)
    emb = torch.nn.functional.normalize(torch.randn(5, 4, 6, generator=gen), dim=-1)
    lam = torch.softmax(torch.randn(5, 3, generator=gen), dim=-1)
    emb[1, 2] = float("nan")  # one unscored response
    scalar = scalar_grpo_advantages(gpm_scalar_reward(emb, lam, tau=0.1))
    globl = gprl_advantages(emb, lam, normalization="global").advantages
    assert torch.allclose(globl, scalar, atol=1e-5)
