"""The length-controlled judge win rate (benchmarks/lm_compare/length_control.py): the GLM fit
against a slow reference, and what it must give on judges whose behaviour is known."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.lm_compare.length_control import design, fit_glm, length_controlled


def slow_fit(x: torch.Tensor, y: torch.Tensor, steps: int = 200_000, lr: float = 0.5) -> list:
    """Plain gradient descent on the mean soft-target cross-entropy, one coordinate at a time
    written out: the reference for Newton's method."""
    w = [0.0] * x.shape[1]
    rows = x.tolist()
    ys = y.tolist()
    for _ in range(steps):
        grad = [0.0] * len(w)
        for row, t in zip(rows, ys, strict=True):
            p = 1 / (1 + math.exp(-sum(a * b for a, b in zip(row, w, strict=True))))
            for j, a in enumerate(row):
                grad[j] += (p - t) * a / len(rows)
        w = [wj - lr * gj for wj, gj in zip(w, grad, strict=True)]
        if max(abs(g) for g in grad) < 1e-11:
            break
    return w


def test_newton_fit_matches_gradient_descent() -> None:
    gen = torch.Generator().manual_seed(3)
    gaps = torch.randn(24, generator=gen, dtype=torch.float64) * 40 + 10
    arm_of = [i % 2 for i in range(24)]
    x = design(arm_of, 2, gaps, float(gaps.std()))
    y = torch.sigmoid(torch.randn(24, generator=gen, dtype=torch.float64) * 2 + 0.5)
    got = fit_glm(x, y).tolist()
    assert got == pytest.approx(slow_fit(x, y, steps=20_000), abs=1e-6)


def test_a_judge_of_pure_length_is_a_coin_toss_once_length_is_controlled() -> None:
    gaps = {"a": [90.0, 120.0, 60.0, -10.0, 150.0, 30.0], "b": [5.0, 0.0, -40.0, 20.0, 70.0, 10.0]}
    s = float(torch.tensor(gaps["a"] + gaps["b"]).std())
    theta = {"a": 0.0, "b": -0.7}  # arm b is worse than base at equal length, a is as good
    margins = {k: [theta[k] + 1.8 * math.tanh(d / s) for d in v] for k, v in gaps.items()}
    res = length_controlled(margins, gaps)
    assert res["length_coef"] == pytest.approx(1.8, abs=1e-4)
    assert res["arms"]["a"]["lc_win_rate"] == pytest.approx(0.5, abs=1e-4)
    assert res["arms"]["b"]["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(0.7)), abs=1e-4)
    assert res["arms"]["a"]["soft_win_rate"] > 0.7  # what the uncontrolled judge reports
    lo, hi = res["arms"]["a"]["lc_ci95"]
    assert lo == pytest.approx(0.5, abs=1e-4) and hi == pytest.approx(0.5, abs=1e-4)  # no noise


def test_without_a_length_effect_it_is_the_judges_soft_win_rate() -> None:
    # every margin appears once with a longer and once with a shorter answer: no length effect
    m = [1.5, -0.4, 0.9, 2.2, 0.1]
    margins = {"a": m + m}
    gaps = {"a": [30.0] * 5 + [-30.0] * 5}
    res = length_controlled(margins, gaps)
    assert res["length_coef"] == pytest.approx(0.0, abs=1e-8)
    soft = sum(1 / (1 + math.exp(-v)) for v in m) / len(m)
    assert res["arms"]["a"]["lc_win_rate"] == pytest.approx(soft, abs=1e-6)
    assert res["arms"]["a"]["soft_win_rate"] == pytest.approx(soft)


def test_bootstrap_is_seeded_and_pairs_must_line_up() -> None:
    margins = {"a": [0.3, 1.2, -0.5, 0.8], "b": [0.1, 0.4, 0.0, -0.2]}
    gaps = {"a": [10.0, 50.0, -5.0, 20.0], "b": [0.0, 3.0, -8.0, 1.0]}
    assert length_controlled(margins, gaps) == length_controlled(margins, gaps)
    with pytest.raises(ValueError, match="same pairs"):
        length_controlled({"a": [0.1, 0.2]}, {"a": [1.0]})
    with pytest.raises(ValueError, match="same pairs"):
        length_controlled({"a": [0.1]}, {"b": [1.0]})
