"""gprl_core.length_audit against plain-Python statistics, the axis prior in DriftConfig and
DriftLoop, and `gprl audit-length` end to end over HTTP."""

from __future__ import annotations

import json
import math
import statistics

import loopback
import pytest
import torch

from gprl_client.audit import audit_main, read_groups
from gprl_client.client import GPMClient
from gprl_client.client_core import GPMUnavailableError, ScoreResult
from gprl_core.advantages import gprl_advantages
from gprl_core.drift import drift_config
from gprl_core.drift_loop import DriftLoop, GPRLState
from gprl_core.length_audit import length_audit, prior_weights, within_group_corr


def test_within_group_corr_is_pearson_per_row_over_the_finite_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    x, n = torch.randn(6, 5, generator=gen), torch.randint(10, 200, (6, 5), generator=gen).double()
    n[3] = 7  # every answer the same length
    x[4] = 0.25  # a flat term
    x[5, 1], n[5, 3] = math.nan, math.nan  # an unscored answer and a padded slot
    r = within_group_corr(x, n)
    for i in range(3):
        want = statistics.correlation(x[i].tolist(), n[i].tolist())
        assert math.isclose(float(r[i]), want, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isnan(float(r[3])) and math.isnan(float(r[4]))
    keep = [0, 2, 4]
    want = statistics.correlation(x[5, keep].tolist(), n[5, keep].tolist())
    assert math.isclose(float(r[5]), want, rel_tol=1e-9)


def test_prior_weights_zero_the_dropped_axes_and_keep_mean_one() -> None:
    assert prior_weights(4, [3]) == [4 / 3, 4 / 3, 4 / 3, 0.0]
    assert prior_weights(4, [0, 2]) == [0.0, 2.0, 0.0, 2.0]
    for k, drop in ((1, [0]), (3, [3]), (3, [-1]), (3, []), (3, [0, 1, 2])):
        with pytest.raises(ValueError, match="axes"):
            prior_weights(k, drop)


def _reference(s, lam, n, threshold, min_groups):
    """The audit written out with loops and the statistics module."""
    n_groups, g, k = s.shape
    axes = []
    for axis in range(k):
        rs = []
        for x in range(n_groups):
            pts = [
                (float(lam[x, axis] * s[x, i, axis]), float(n[x, i]))
                for i in range(g)
                if not math.isnan(float(s[x, i, axis])) and float(n[x, i]) >= 0
            ]
            a, b = [p[0] for p in pts], [p[1] for p in pts]
            if len(pts) >= 2 and len(set(a)) > 1 and len(set(b)) > 1:
                rs.append(statistics.correlation(a, b))
        mean = statistics.fmean(rs)
        ci = 1.96 * statistics.stdev(rs) / math.sqrt(len(rs))
        var = statistics.fmean(
            statistics.pvariance(
                [
                    float(lam[x, axis] * s[x, i, axis])
                    for i in range(g)
                    if not math.isnan(float(s[x, i, axis]))
                ]
            )
            for x in range(n_groups)
        )
        axes.append((mean, ci, len(rs), var))
    total = sum(a[3] for a in axes)
    flagged = [
        i
        for i, (m, c, used, _) in enumerate(axes)
        if used >= min_groups and m >= threshold and m - c > 0
    ]
    return [(m, c, used, v / total) for m, c, used, v in axes], flagged


def test_length_audit_matches_a_slow_reference_and_flags_the_length_axis() -> None:
    """Axis 2's scores follow length (plus a little noise); axes 0 and 1 do not."""
    gen = torch.Generator().manual_seed(3)
    n_groups, g = 12, 4
    n = torch.randint(20, 300, (n_groups, g), generator=gen).double()
    s = torch.randn(n_groups, g, 3, generator=gen, dtype=torch.float64)
    s[..., 2] = torch.log1p(n) + 0.05 * torch.randn(n_groups, g, generator=gen, dtype=torch.float64)
    s[0, 3, :] = math.nan  # an unscored answer
    n[1, 2] = -1  # a padded slot
    s[1, 2, :] = math.nan
    lam = torch.softmax(torch.randn(n_groups, 3, generator=gen, dtype=torch.float64), dim=-1)
    audit = length_audit(s, lam, n, threshold=0.7, min_groups=4)
    want, flagged = _reference(s, lam, n, 0.7, 4)
    for got, (mean, ci, used, share) in zip(audit.axes, want, strict=True):
        assert got.groups == used
        assert math.isclose(got.corr, mean, rel_tol=1e-9)
        assert math.isclose(got.ci95, ci, rel_tol=1e-9)
        assert math.isclose(got.share, share, rel_tol=1e-9)
    assert audit.flagged == flagged == [2]
    assert audit.prior == [1.5, 1.5, 0.0]
    assert math.isclose(audit.share_dropped, want[2][3])
    assert json.loads(json.dumps(audit.to_dict()))["flagged"] == [2]
    # nothing flagged at a threshold above every axis; every axis flagged gives no prior
    assert length_audit(s, lam, n, threshold=1.0).prior is None
    ones = s.clone()
    ones[..., 0] = ones[..., 1] = ones[..., 2]
    every = length_audit(ones, None, n)
    assert every.flagged == [0, 1, 2] and every.prior is None
    with pytest.raises(ValueError, match="tokens"):
        length_audit(s, lam, n[:, :3])
    with pytest.raises(ValueError, match="eigenvalues"):
        length_audit(s, lam[:, :2], n)


def test_drift_config_axis_prior_is_scaled_to_mean_one_and_checked() -> None:
    c = drift_config("paper", axis_prior=[1, 1, 1, 0])
    assert c.axis_prior == (4 / 3, 4 / 3, 4 / 3, 0.0)
    assert drift_config("project").axis_prior is None
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, math.nan], ["a", 1.0], 3):
        with pytest.raises(ValueError, match="axis_prior"):
            drift_config("project", axis_prior=bad)


def test_drift_loop_trains_every_step_with_the_prior_times_the_controller() -> None:
    """The first step already has the prior; afterwards m = the controller's m × the prior
    (the paper controller acting on a drift written into the variances), logged as such, and
    it survives a state_dict round trip."""
    gen = torch.Generator().manual_seed(0)
    config = drift_config("paper", baseline_steps=1, ema_rate=0.5, axis_prior=(1.0, 1.0, 0.0))
    state = GPRLState()
    loop = DriftLoop(state, config, enabled=True)
    assert state.weights.tolist() == [1.5, 1.5, 0.0]
    lam = torch.full((2, 3), 1 / 3)
    for step in range(1, 5):
        emb = torch.randn(2, 4, 6, generator=gen)
        emb[..., 0:2] *= step  # axis 0's spread grows: the paper rule corrects it
        state.last = gprl_advantages(emb, lam, state.weights)
        _, status = loop.update(step)
        ctl = loop.controller.weights
        assert torch.equal(state.weights, ctl * torch.tensor([1.5, 1.5, 0.0]))
        assert [status[f"gprl/m_{i}"] for i in range(3)] == state.weights.tolist()
    assert loop.controller.state.corrections > 0 and float(ctl[0]) < 1
    again = DriftLoop(GPRLState(), config)
    again.load_state_dict(loop.state_dict())
    assert torch.equal(again.state.weights, state.weights)
    wrong = DriftLoop(GPRLState(), drift_config("paper", axis_prior=(1.0, 0.0)))
    wrong.state.weights = None
    wrong.state.last = gprl_advantages(torch.randn(2, 4, 6, generator=gen), lam)
    with pytest.raises(ValueError, match="axis_prior has 2 factors"):
        wrong.update(1)


def _score_result(s: torch.Tensor, tokens: torch.Tensor) -> ScoreResult:
    n_groups, g, k = s.shape
    nan = torch.full((n_groups, g), math.nan)
    return ScoreResult(
        embeddings=torch.full((n_groups, g, 2 * k), math.nan),
        eigenvalues=torch.full((n_groups, k), 1 / k),
        group_scores=s,
        rewards=nan,
        truncated=torch.zeros(n_groups, g, dtype=torch.bool),
        response_tokens=tokens,
        valid=torch.ones(n_groups, g, dtype=torch.bool),
        failed=torch.zeros(n_groups, dtype=torch.bool),
        errors=[None] * n_groups,
        ids=[None] * n_groups,
        model="fake",
        k=k,
    )


class _Client:
    def __init__(self, result: ScoreResult) -> None:
        self.result, self.calls = result, []

    def score(self, groups):
        self.calls.append(groups)
        return self.result


def _write_groups(path, n_groups: int, g: int) -> None:
    rows = [
        {"prompt": f"p{x}", "responses": [f"r{x}.{i}" for i in range(g)]} for x in range(n_groups)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_audit_length_command_flags_the_axis_that_follows_length(tmp_path, capsys) -> None:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(20, 300, (8, 4), generator=gen)
    s = torch.randn(8, 4, 4, generator=gen)
    s[..., 3] = torch.log1p(tokens.float())
    _write_groups(tmp_path / "g.jsonl", 8, 4)
    client = _Client(_score_result(s, tokens))
    rc = audit_main(
        ["--groups", str(tmp_path / "g.jsonl"), "--json", str(tmp_path / "a.json")], client
    )
    out = capsys.readouterr().out
    assert rc == 0 and len(client.calls[0]) == 8
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["flagged"] == [3] and report["prior"] == pytest.approx([4 / 3] * 3 + [0.0])
    assert "--drift.axis-prior 1.33333,1.33333,1.33333,0" in out


def test_audit_length_prefers_the_files_token_counts(tmp_path, capsys) -> None:
    """Axis 3 follows the policy's token counts given in the file; the service's counts (cut at
    its max_length) do not: the file's are the ones used."""
    gen = torch.Generator().manual_seed(2)
    policy_tokens = torch.randint(20, 600, (8, 4), generator=gen)
    s = torch.randn(8, 4, 4, generator=gen)
    s[..., 3] = torch.log1p(policy_tokens.float())
    service_tokens = torch.randint(20, 600, (8, 4), generator=gen)  # unrelated to axis 3
    rows = [
        {"prompt": f"p{x}", "responses": [f"r{i}" for i in range(4)], "tokens": t}
        for x, t in enumerate(policy_tokens.tolist())
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    client = _Client(_score_result(s, service_tokens))
    assert audit_main(["--groups", str(path), "--json", str(tmp_path / "a.json")], client) == 0
    assert "lengths: the file's tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["flagged"] == [3]
    assert all("tokens" not in g for g in client.calls[0])  # not sent to the service
    rows[0]["tokens"] = [1, 2]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=":1: tokens must be one integer"):
        read_groups(path)
    del rows[0]["tokens"]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="every group or for none"):
        read_groups(path)


def test_audit_length_refuses_bad_input_with_the_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "responses": ["x", "y"]}\n{"prompt": "b", "responses": "xy"}\n')
    assert audit_main(["--groups", str(bad)], _Client(None)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    bad.write_text('{"prompt": "a", "responses": ["only one"]}\n')
    with pytest.raises(ValueError, match="at least 2 responses"):
        read_groups(bad)
    bad.write_text('{"prompt": "a", "responses": ["x", "y"]}\n{"prompt": "b",\n')
    assert audit_main(["--groups", str(bad)], _Client(None)) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    assert audit_main(["--groups", str(tmp_path / "missing.jsonl")], _Client(None)) == 2
    capsys.readouterr()

    class Down:
        def score(self, groups):
            raise GPMUnavailableError("ReadTimeout: timed out", 5)

    bad.write_text('{"prompt": "a", "responses": ["x", "y"]}\n')
    assert audit_main(["--groups", str(bad)], Down()) == 2
    assert "could not score the groups" in capsys.readouterr().err


def test_audit_length_over_http_equals_the_audit_of_the_scores(tmp_path, capsys) -> None:
    """Real service (fake backend) over HTTP: the command's JSON is `length_audit` of what
    `GPMClient.score` returns for the same groups, token counts included."""
    groups = [
        {"prompt": f"question {x}", "responses": ["a " * (3 + 5 * i + x) for i in range(4)]}
        for x in range(6)
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(g) for g in groups))
    with loopback.serve(loopback.make_app(tmp_path)) as url:
        client = GPMClient(url, seed=0)
        client.wait_ready(timeout=30, interval=0.05)
        res = client.score(groups)
        rc = audit_main(["--groups", str(path), "--url", url, "--json", str(tmp_path / "a.json")])
        client.close()
    assert rc == 0
    report = json.loads((tmp_path / "a.json").read_text())
    want = length_audit(res.group_scores, res.eigenvalues, res.response_tokens.double())
    assert report["flagged"] == want.flagged and report["groups"] == 6
    for got, ref in zip(report["axes"], want.axes, strict=True):
        assert got["groups"] == ref.groups
        assert (got["corr"] is None) == math.isnan(ref.corr)
        assert got["corr"] is None or got["corr"] == pytest.approx(ref.corr)
    assert int(res.response_tokens[0, 3]) > int(res.response_tokens[0, 0])
