"""Mergeable per-run, per-step, per-dimension statistics of GPM group scores.

The service keeps the `StepStats` of every tagged `/score` call (one per `Idempotency-Key`, or
added to per-step sums without one); a learner that talks to several replicas fetches each
replica's stats and adds them, counting a keyed record once even when a failed-over retry left
it on two replicas (`merge_by_key`). Every field is a count or a sum, so merging is exact
addition (up to float64 rounding order) and the merged stats equal those of one server that saw
every distinct record.

Letters: N groups, G responses per group, K axes. Per response, x_l(i) = λ_l(x)·ŝ_l(i) (the
pre-normalisation group score on axis l, scaled by the prompt's eigenvalue).

Per step we keep:
- `n_groups` [K]: groups whose within-group variance on axis l is defined (≥ 2 scored responses),
- `sum_within_var` [K]: Σ over those groups of Var_i(x_l(i)) (ddof = 0, NaN-aware; computed by
  `gprl_core.advantages.axis_variance`), so `mean_within_variance()` is exactly the statistic
  behind the drift monitor's α(t),
- `n_responses`: scored responses (every x_l finite), and over them `sum_x`, `sum_x2` [K],
  token lengths `sum_len`, `sum_len2`, and `sum_len_x` [K] (Σ length·x_l, for the covariance of
  length with each axis),
- `n_eig_groups`, `sum_eigenvalues` [K]: groups with finite eigenvalues and their λ sums.

Pure stdlib/numpy/torch: no I/O, no HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gprl_core.advantages import axis_variance

# Per-dimension float sums and their JSON names (order is the SQLite column order too).
FLOAT_K_FIELDS = ("sum_x", "sum_x2", "sum_within_var", "sum_eigenvalues", "sum_len_x")
INT_K_FIELDS = ("n_groups",)
SCALAR_INT_FIELDS = ("n_responses", "n_eig_groups")
SCALAR_FLOAT_FIELDS = ("sum_len", "sum_len2")


def _zeros_f(k: int) -> np.ndarray:
    return np.zeros(k, dtype=np.float64)


def _zeros_i(k: int) -> np.ndarray:
    return np.zeros(k, dtype=np.int64)


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    """num / den with NaN (not inf, not a warning) where den == 0."""
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num_a, den_a).shape, np.nan)
    np.divide(num_a, den_a, out=out, where=den_a > 0)
    return out if out.ndim else float(out)


@dataclass
class StepStats:
    """Sums and counts of one `(run_id, step)`; all arrays have length K."""

    step: int
    k: int
    n_groups: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_x: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_x2: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_within_var: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_eigenvalues: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_len_x: np.ndarray = field(default=None)  # type: ignore[assignment]
    n_responses: int = 0
    n_eig_groups: int = 0
    sum_len: float = 0.0
    sum_len2: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        for name in INT_K_FIELDS:
            value = getattr(self, name)
            arr = _zeros_i(self.k) if value is None else np.asarray(value, dtype=np.int64)
            setattr(self, name, self._check_len(name, arr))
        for name in FLOAT_K_FIELDS:
            value = getattr(self, name)
            arr = _zeros_f(self.k) if value is None else np.asarray(value, dtype=np.float64)
            setattr(self, name, self._check_len(name, arr))
        self.step = int(self.step)
        self.n_responses = int(self.n_responses)
        self.n_eig_groups = int(self.n_eig_groups)
        self.sum_len = float(self.sum_len)
        self.sum_len2 = float(self.sum_len2)

    def _check_len(self, name: str, arr: np.ndarray) -> np.ndarray:
        if arr.shape != (self.k,):
            raise ValueError(f"{name} must have shape ({self.k},), got {arr.shape}")
        return arr.copy()

    # --- merging -----------------------------------------------------------------------------

    def merge(self, other: StepStats) -> StepStats:
        """Exact addition of two stats of the same step and K (a new object)."""
        if other.step != self.step or other.k != self.k:
            raise ValueError(
                f"cannot merge step {other.step} (k={other.k}) into step {self.step} (k={self.k})"
            )
        kwargs: dict[str, Any] = {"step": self.step, "k": self.k}
        for name in (*INT_K_FIELDS, *FLOAT_K_FIELDS, *SCALAR_INT_FIELDS, *SCALAR_FLOAT_FIELDS):
            kwargs[name] = getattr(self, name) + getattr(other, name)
        return StepStats(**kwargs)

    __add__ = merge

    # --- derived statistics --------------------------------------------------------------------

    def mean_within_variance(self) -> np.ndarray:
        """[K]: mean over groups of Var_i(λ_l·ŝ_l(i)) (the drift monitor's input; NaN if none)."""
        return _ratio(self.sum_within_var, self.n_groups)

    def x_mean(self) -> np.ndarray:
        """[K]: mean of λ_l·ŝ_l over all scored responses of the step."""
        return _ratio(self.sum_x, self.n_responses)

    def x_variance(self) -> np.ndarray:
        """[K]: variance (ddof = 0) of λ_l·ŝ_l over all scored responses (pooled, not within)."""
        mean = self.x_mean()
        return _ratio(self.sum_x2, self.n_responses) - mean * mean

    def mean_length(self) -> float:
        """Mean response length in tokens over scored responses."""
        return _ratio(self.sum_len, self.n_responses)

    def length_variance(self) -> float:
        mean = self.mean_length()
        return _ratio(self.sum_len2, self.n_responses) - mean * mean

    def length_covariance(self) -> np.ndarray:
        """[K]: Cov(length, λ_l·ŝ_l) over scored responses (ddof = 0)."""
        return _ratio(self.sum_len_x, self.n_responses) - self.mean_length() * self.x_mean()

    def length_correlation(self) -> np.ndarray:
        """[K]: Pearson correlation of length with each axis (NaN where a variance is 0)."""
        den = np.sqrt(np.clip(self.length_variance() * self.x_variance(), 0.0, None))
        return _ratio(self.length_covariance(), den)

    def eigenvalue_mean(self) -> np.ndarray:
        """[K]: mean eigenvalue λ_l over the step's groups."""
        return _ratio(self.sum_eigenvalues, self.n_eig_groups)

    # --- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "k": self.k}
        for name in INT_K_FIELDS:
            out[name] = [int(v) for v in getattr(self, name)]
        for name in FLOAT_K_FIELDS:
            out[name] = [float(v) for v in getattr(self, name)]
        for name in SCALAR_INT_FIELDS:
            out[name] = int(getattr(self, name))
        for name in SCALAR_FLOAT_FIELDS:
            out[name] = float(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepStats:
        names = ("step", "k", *INT_K_FIELDS, *FLOAT_K_FIELDS)
        names += SCALAR_INT_FIELDS + SCALAR_FLOAT_FIELDS
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"telemetry step is missing fields {missing}")
        return cls(**{n: data[n] for n in names})

    def allclose(self, other: StepStats, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
        """Same step, K and counts; sums equal up to float rounding (merge order differs)."""
        if (self.step, self.k, self.n_responses, self.n_eig_groups) != (
            other.step,
            other.k,
            other.n_responses,
            other.n_eig_groups,
        ) or not np.array_equal(self.n_groups, other.n_groups):
            return False
        pairs = [(getattr(self, n), getattr(other, n)) for n in FLOAT_K_FIELDS]
        pairs += [(getattr(self, n), getattr(other, n)) for n in SCALAR_FLOAT_FIELDS]
        return all(np.allclose(a, b, rtol=rtol, atol=atol) for a, b in pairs)


@dataclass
class RunTelemetry:
    """All steps of one run: `steps[step] -> StepStats`."""

    run_id: str
    steps: dict[int, StepStats] = field(default_factory=dict)

    def add(self, stats: StepStats) -> None:
        """Merge one step's stats in (exact addition when the step is already there)."""
        have = self.steps.get(stats.step)
        self.steps[stats.step] = stats if have is None else have.merge(stats)

    def merge(self, other: RunTelemetry) -> RunTelemetry:
        if other.run_id != self.run_id:
            raise ValueError(f"cannot merge run {other.run_id!r} into {self.run_id!r}")
        out = RunTelemetry(self.run_id, dict(self.steps))
        for stats in other.steps.values():
            out.add(stats)
        return out

    __add__ = merge

    def since(self, since_step: int) -> RunTelemetry:
        """Steps >= since_step."""
        kept = {s: st for s, st in self.steps.items() if s >= since_step}
        return RunTelemetry(self.run_id, kept)

    def ordered(self) -> list[StepStats]:
        return [self.steps[s] for s in sorted(self.steps)]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "steps": [st.to_dict() for st in self.ordered()]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunTelemetry:
        run = cls(str(data["run_id"]))
        for item in data.get("steps", []):
            run.add(StepStats.from_dict(item))
        return run

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> RunTelemetry:
        return cls.from_dict(json.loads(text))


def merge_runs(runs: Iterable[RunTelemetry]) -> RunTelemetry:
    """Exact merge of the same run's telemetry from several replicas."""
    runs = list(runs)
    if not runs:
        raise ValueError("merge_runs needs at least one RunTelemetry")
    out = RunTelemetry(runs[0].run_id)
    for run in runs:
        out = out.merge(run)
    return out


def merge_by_key(answers: Iterable[Mapping[str, Any]]) -> RunTelemetry:
    """Exact merge of several replicas' `GET /telemetry?by_key=true` answers of one run.

    Each answer has `steps` (sums of records stored without a key) and `records` (one entry per
    keyed record: `{"key", **StepStats fields}`). Unkeyed sums add; a keyed record counts once
    however many replicas hold it: a retry that failed over after the first replica stored the
    record but died before answering leaves the same key on two replicas. The first answer's
    copy is kept (replicas may differ in the last float bits: their batches differed). An
    answer without `records` (a server that predates keys) is all sums.
    """
    answers = list(answers)
    if not answers:
        raise ValueError("merge_by_key needs at least one answer")
    keyed: dict[str, StepStats] = {}
    for answer in answers:
        for item in answer.get("records") or []:
            stats = StepStats.from_dict(item)
            first = keyed.setdefault(str(item["key"]), stats)
            if (first.step, first.k) != (stats.step, stats.k):
                raise ValueError(
                    f"record {item['key']!r} is step {first.step} (k={first.k}) on one replica "
                    f"and step {stats.step} (k={stats.k}) on another"
                )
    out = merge_runs(RunTelemetry.from_dict(answer) for answer in answers)
    for stats in keyed.values():
        out.add(stats)
    return out


def stats_from_tensors(
    eigenvalues: torch.Tensor,
    group_scores: torch.Tensor,
    response_tokens: torch.Tensor | None = None,
    step: int = 0,
) -> StepStats:
    """Stats of one batch of groups.

    Shapes: eigenvalues `[N, K]`, group_scores (ŝ, before normalisation) `[N, G, K]`,
    response_tokens `[N, G]` (int; None counts every length as 0). NaN entries of ŝ or λ are
    left out: a response counts when all its x_l are finite; a group's within-group variance
    counts on axis l when it is finite (≥ 2 scored responses).
    """
    if group_scores.dim() != 3 or eigenvalues.dim() != 2:
        raise ValueError(
            f"need group_scores [N, G, K] and eigenvalues [N, K], got "
            f"{tuple(group_scores.shape)} and {tuple(eigenvalues.shape)}"
        )
    n, g, k = group_scores.shape
    if eigenvalues.shape != (n, k):
        raise ValueError(f"eigenvalues must be [{n}, {k}], got {tuple(eigenvalues.shape)}")
    scores = group_scores.detach().to("cpu", torch.float64)
    eig = eigenvalues.detach().to("cpu", torch.float64)
    if response_tokens is None:
        lengths = torch.zeros(n, g, dtype=torch.float64)
    else:
        if tuple(response_tokens.shape) != (n, g):
            raise ValueError(f"response_tokens must be [{n}, {g}]")
        lengths = response_tokens.detach().to("cpu", torch.float64)

    within = axis_variance(scores, eig)  # (N, K)
    within_ok = torch.isfinite(within)
    x = eig[:, None, :] * scores  # (N, G, K)
    scored = torch.isfinite(x).all(dim=-1) & torch.isfinite(lengths)  # (N, G)
    xs = torch.where(scored[..., None], x, torch.zeros_like(x))
    ls = torch.where(scored, lengths, torch.zeros_like(lengths))
    eig_ok = torch.isfinite(eig).all(dim=-1)  # (N,)
    eig_s = torch.where(eig_ok[:, None], eig, torch.zeros_like(eig))
    return StepStats(
        step=step,
        k=k,
        n_groups=within_ok.sum(dim=0).numpy(),
        sum_within_var=torch.where(within_ok, within, torch.zeros_like(within)).sum(0).numpy(),
        n_responses=int(scored.sum()),
        sum_x=xs.sum(dim=(0, 1)).numpy(),
        sum_x2=(xs * xs).sum(dim=(0, 1)).numpy(),
        sum_len=float(ls.sum()),
        sum_len2=float((ls * ls).sum()),
        sum_len_x=(ls[..., None] * xs).sum(dim=(0, 1)).numpy(),
        n_eig_groups=int(eig_ok.sum()),
        sum_eigenvalues=eig_s.sum(dim=0).numpy(),
    )
