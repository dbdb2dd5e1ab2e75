"""Service telemetry: mergeable stats, the SQLite store, the drift monitor on both inputs.

The reference for every statistic is an explicit loop over groups and responses.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gpm_server.telemetry_store import TelemetryConflictError, TelemetryStore
from gprl_client.telemetry import RunTelemetry, StepStats, merge_runs, stats_from_tensors


def _batch(seed: int, n: int = 5, g: int = 4, k: int = 3, nan_rows: int = 1):
    """Random (eigenvalues [N,K], group_scores [N,G,K], response_tokens [N,G]) with NaN rows."""
    gen = torch.Generator().manual_seed(seed)
    eig = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)
    scores = torch.randn(n, g, k, generator=gen)
    tokens = torch.randint(1, 200, (n, g), generator=gen)
    for r in range(nan_rows):  # unscored responses: NaN rows (row 0 of group r)
        scores[r % n, 0] = float("nan")
    return eig, scores, tokens


def _reference(eig, scores, tokens) -> dict[str, np.ndarray | float]:
    """Explicit loops: what every field of StepStats must hold."""
    n, g, k = scores.shape
    ref = {
        "n_groups": np.zeros(k),
        "sum_within_var": np.zeros(k),
        "sum_x": np.zeros(k),
        "sum_x2": np.zeros(k),
        "sum_len_x": np.zeros(k),
        "sum_eigenvalues": np.zeros(k),
        "n_responses": 0,
        "n_eig_groups": 0,
        "sum_len": 0.0,
        "sum_len2": 0.0,
    }
    for a in range(n):
        lam = [float(eig[a, ax]) for ax in range(k)]
        ref["n_eig_groups"] += 1
        for ax in range(k):
            ref["sum_eigenvalues"][ax] += lam[ax]
        rows = [
            i for i in range(g) if not any(np.isnan(float(scores[a, i, ax])) for ax in range(k))
        ]
        for i in rows:
            length = float(tokens[a, i])
            ref["n_responses"] += 1
            ref["sum_len"] += length
            ref["sum_len2"] += length * length
            for ax in range(k):
                x = lam[ax] * float(scores[a, i, ax])
                ref["sum_x"][ax] += x
                ref["sum_x2"][ax] += x * x
                ref["sum_len_x"][ax] += length * x
        if len(rows) >= 2:
            for ax in range(k):
                xs = [lam[ax] * float(scores[a, i, ax]) for i in rows]
                mean = sum(xs) / len(xs)
                ref["n_groups"][ax] += 1
                ref["sum_within_var"][ax] += sum((x - mean) ** 2 for x in xs) / len(xs)
    return ref


def _assert_matches(stats: StepStats, ref: dict) -> None:
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-9, atol=1e-9, err_msg=name)


def test_stats_equal_explicit_loops() -> None:
    eig, scores, tokens = _batch(0, nan_rows=2)
    scores[4, :3] = float("nan")  # a group with one scored response: no within-group variance
    stats = stats_from_tensors(eig, scores, tokens, step=7)
    assert stats.step == 7 and stats.k == 3
    _assert_matches(stats, _reference(eig, scores, tokens))
    assert stats.n_groups.tolist() == [4, 4, 4]


def test_derived_statistics_against_numpy() -> None:
    eig, scores, tokens = _batch(1, n=6, g=5, nan_rows=0)
    stats = stats_from_tensors(eig, scores, tokens)
    x = (eig.double()[:, None, :] * scores.double()).reshape(-1, 3).numpy()
    length = tokens.double().reshape(-1).numpy()
    np.testing.assert_allclose(stats.x_mean(), x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.x_variance(), x.var(0), rtol=1e-8)
    assert stats.mean_length() == pytest.approx(length.mean(), rel=1e-12)
    assert stats.length_variance() == pytest.approx(length.var(), rel=1e-10)
    cov = [np.cov(length, x[:, ax], bias=True)[0, 1] for ax in range(3)]
    np.testing.assert_allclose(stats.length_covariance(), cov, rtol=1e-8, atol=1e-12)
    corr = [np.corrcoef(length, x[:, ax])[0, 1] for ax in range(3)]
    np.testing.assert_allclose(stats.length_correlation(), corr, rtol=1e-7)
    np.testing.assert_allclose(stats.eigenvalue_mean(), eig.double().mean(0).numpy(), rtol=1e-12)
    within = [np.mean([x.reshape(6, 5, 3)[a, :, ax].var() for a in range(6)]) for ax in range(3)]
    np.testing.assert_allclose(stats.mean_within_variance(), within, rtol=1e-9)


def test_empty_stats_give_nan_not_errors() -> None:
    stats = StepStats(step=0, k=2)
    assert np.isnan(stats.mean_within_variance()).all()
    assert np.isnan(stats.mean_length())
    assert np.isnan(stats.length_covariance()).all()


def test_merge_of_parts_equals_stats_of_union() -> None:
    eig, scores, tokens = _batch(2, n=8, nan_rows=3)
    whole = stats_from_tensors(eig, scores, tokens, step=3)
    parts = [
        stats_from_tensors(eig[s], scores[s], tokens[s], step=3)
        for s in (slice(0, 3), slice(3, 4), slice(4, 8))
    ]
    merged = parts[0].merge(parts[1]) + parts[2]
    assert merged.allclose(whole)
    np.testing.assert_allclose(merged.mean_within_variance(), whole.mean_within_variance())
    with pytest.raises(ValueError):
        merged.merge(stats_from_tensors(eig, scores, tokens, step=4))


def test_merge_detects_a_difference() -> None:
    eig, scores, tokens = _batch(3)
    a = stats_from_tensors(eig, scores, tokens)
    b = stats_from_tensors(eig[:-1], scores[:-1], tokens[:-1])
    assert not a.allclose(b)


def test_json_round_trip_is_exact() -> None:
    run = RunTelemetry("r1")
    for step in (0, 2, 1):
        run.add(stats_from_tensors(*_batch(step), step=step))
    back = RunTelemetry.from_json(run.to_json())
    assert [s.step for s in back.ordered()] == [0, 1, 2]
    for step, stats in run.steps.items():
        assert back.steps[step].to_dict() == stats.to_dict()
    assert [s.step for s in back.since(1).ordered()] == [1, 2]
    with pytest.raises(ValueError):
        StepStats.from_dict({"step": 0, "k": 1})


def test_merge_runs_across_replicas() -> None:
    a, b = RunTelemetry("r"), RunTelemetry("r")
    a.add(stats_from_tensors(*_batch(0), step=0))
    b.add(stats_from_tensors(*_batch(1), step=0))
    b.add(stats_from_tensors(*_batch(2), step=1))
    merged = merge_runs([a, b])
    assert sorted(merged.steps) == [0, 1]
    assert merged.steps[0].n_responses == a.steps[0].n_responses + b.steps[0].n_responses
    with pytest.raises(ValueError):
        a.merge(RunTelemetry("other"))


# --- the SQLite store ----------------------------------------------------------------------


def test_store_adds_records_and_survives_reopen(tmp_path) -> None:
    path = tmp_path / "t.sqlite3"
    eig, scores, tokens = _batch(4, n=6)
    store = TelemetryStore(path)
    store.record(
        run_id="run",
        step=0,
        eigenvalues=eig[:2],
        group_scores=scores[:2],
        response_tokens=tokens[:2],
    )
    store.record(
        run_id="run",
        step=0,
        eigenvalues=eig[2:],
        group_scores=scores[2:],
        response_tokens=tokens[2:],
    )
    store.record(run_id="run", step=5, eigenvalues=eig, group_scores=scores, response_tokens=tokens)
    store.record(run_id="other", step=0, eigenvalues=eig, group_scores=scores)
    store.close()

    reopened = TelemetryStore(path)
    run = reopened.query("run")
    whole = stats_from_tensors(eig, scores, tokens, step=0)
    assert sorted(run.steps) == [0, 5]
    assert run.steps[0].allclose(whole)
    assert sorted(reopened.query("run", since_step=1).steps) == [5]
    assert reopened.query("missing").steps == {}
    runs = {r["run_id"]: r for r in reopened.list_runs()}
    assert runs["run"]["steps"] == 2 and runs["run"]["records"] == 3
    assert runs["other"]["k"] == 3
    reopened.close()


def test_store_rejects_a_different_k_atomically(tmp_path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite3")
    store.record(
        run_id="r", step=0, eigenvalues=torch.ones(1, 2), group_scores=torch.randn(1, 3, 2)
    )
    before = store.query("r").to_dict()
    with pytest.raises(TelemetryConflictError):
        store.record(
            run_id="r", step=0, eigenvalues=torch.ones(1, 3), group_scores=torch.randn(1, 3, 3)
        )
    assert store.query("r").to_dict() == before
    with pytest.raises(ValueError):
        store.record(
            run_id="", step=0, eigenvalues=torch.ones(1, 2), group_scores=torch.randn(1, 3, 2)
        )
    store.close()


def test_store_is_thread_safe(tmp_path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite3", synchronous="NORMAL")
    batches = [_batch(s, n=2) for s in range(16)]

    def work(i: int) -> None:
        store.record(
            run_id="r",
            step=i % 2,
            eigenvalues=batches[i][0],
            group_scores=batches[i][1],
            response_tokens=batches[i][2],
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run = store.query("r")
    for step in (0, 1):
        expected = [stats_from_tensors(*batches[i], step=step) for i in range(step, 16, 2)]
        total = expected[0]
        for e in expected[1:]:
            total = total + e
        assert run.steps[step].allclose(total)
        assert run.steps[step].n_responses == total.n_responses
    store.close()


# --- issue 3 part 5: the drift monitor on local scores or on telemetry --------------------------


def test_monitor_from_telemetry_equals_monitor_from_local_scores(tmp_path) -> None:
    from gprl_client.drift import DriftConfig, DriftMonitor

    config = DriftConfig(baseline_steps=3)
    local, remote = DriftMonitor(3, config), DriftMonitor(3, config)
    stores = [TelemetryStore(tmp_path / f"{r}.sqlite3") for r in ("a", "b")]
    for step in range(8):
        eig, scores, tokens = _batch(100 + step, n=6, g=5, nan_rows=2)
        scores[:, :, 0] *= 1 + 0.3 * step  # axis 0 drifts: the monitor has something to see
        local.update_from_group_scores(scores, eig)
        for store, part in zip(stores, (slice(0, 2), slice(2, 6)), strict=True):
            store.record(
                run_id="r",
                step=step,
                eigenvalues=eig[part],
                group_scores=scores[part],
                response_tokens=tokens[part],
            )
    merged = merge_runs(store.query("r") for store in stores)
    for stats in merged.ordered():
        remote.update_from_variance_sums(stats.sum_within_var, stats.n_groups)
    a, b = local.state, remote.state
    assert a.step == b.step == 8 and a.ready and a.drift > 0
    np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-6)
    np.testing.assert_allclose(a.baseline, b.baseline, rtol=1e-6)
    assert b.drift == pytest.approx(a.drift, rel=1e-5)
    assert a.over_exploited == b.over_exploited == 0
    for store in stores:
        store.close()


def test_request_key_makes_a_retried_record_count_once(tmp_path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite3")
    eig, scores, tokens = _batch(9)
    batch = {"eigenvalues": eig, "group_scores": scores, "response_tokens": tokens}
    store.record(run_id="r", step=0, request_key="abc", **batch)
    store.record(run_id="r", step=0, request_key="abc", **batch)  # the retry of a lost answer
    assert store.query("r").steps[0].allclose(stats_from_tensors(eig, scores, tokens))
    store.record(run_id="r", step=0, request_key="def", **batch)
    store.record(run_id="other", step=0, request_key="abc", **batch)  # keys are per run
    assert store.query("r").steps[0].n_responses == 2 * stats_from_tensors(*_batch(9)).n_responses
    assert store.query("other").steps[0].n_responses > 0
    store.close()


# --- through the service over loopback HTTP -------------------------------------------------


def _groups(step: int) -> list[dict]:
    """Six groups (G = 2..5, never 1) whose responses change with the step."""
    return [
        {
            "prompt": f"prompt {n}",
            "responses": [
                f"answer {n}.{i} at step {step}" + "!" * (i * n) for i in range(2 + n % 4)
            ],
        }
        for n in range(6)
    ]


def _ready_client(urls):
    from gprl_client import GPMClient

    client = GPMClient(urls, max_retries=1)
    client.wait_ready(timeout=30, interval=0.05, all_urls=True)
    return client


def test_two_servers_merged_equal_one_server_with_everything(tmp_path) -> None:
    import loopback

    from gprl_client.drift import DriftConfig, DriftMonitor

    config = DriftConfig(baseline_steps=2)
    local = DriftMonitor(3, config)
    with (
        loopback.serve(loopback.make_app(tmp_path, "a")) as url_a,
        loopback.serve(loopback.make_app(tmp_path, "b")) as url_b,
        loopback.serve(loopback.make_app(tmp_path, "all")) as url_all,
    ):
        only_a, only_b, one = _ready_client(url_a), _ready_client(url_b), _ready_client(url_all)
        for step in range(4):
            groups = _groups(step)
            only_a.score(groups[:2], run_id="r", step=step)
            only_b.score(groups[2:], run_id="r", step=step)
            res = one.score(groups, run_id="r", step=step)
            local.update_from_group_scores(res.group_scores, res.eigenvalues)
            if step == 0:  # the server's stats equal stats of the tensors the client got
                mine = stats_from_tensors(res.eigenvalues, res.group_scores, res.response_tokens)
        merged = _ready_client([url_a, url_b]).telemetry("r")
        whole = one.telemetry("r")
        assert sorted(merged.steps) == sorted(whole.steps) == [0, 1, 2, 3]
        assert sorted(_ready_client(url_a).telemetry("r", since_step=2).steps) == [2, 3]
    for step in range(4):
        assert merged.steps[step].allclose(whole.steps[step])
        assert merged.steps[step].n_groups.tolist() == [6, 6, 6]
    assert whole.steps[0].allclose(mine)
    assert whole.steps[0].mean_length() > 0

    remote = DriftMonitor(3, config)
    for stats in merged.ordered():
        remote.update_from_variance_sums(stats.sum_within_var, stats.n_groups)
    assert remote.state.ready and remote.state.step == local.state.step == 4
    np.testing.assert_allclose(remote.state.alpha, local.state.alpha, rtol=1e-6)
    assert remote.state.drift == pytest.approx(local.state.drift, rel=1e-4, abs=1e-9)


def test_telemetry_survives_a_restart_on_the_same_file(tmp_path) -> None:
    import loopback

    with loopback.serve(loopback.make_app(tmp_path, "a")) as url:
        client = _ready_client(url)
        client.score(_groups(0), run_id="r", step=0)
        client.score(_groups(1), run_id="r", step=1)
        before = client.telemetry("r")
    with loopback.serve(loopback.make_app(tmp_path, "a")) as url:
        after = _ready_client(url).telemetry("r")
    assert after.to_dict() == before.to_dict() and sorted(after.steps) == [0, 1]


@pytest.mark.slow
def test_acknowledged_telemetry_survives_kill_9(tmp_path) -> None:
    """A server process killed with SIGKILL right after answering loses nothing it answered."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import loopback

    url = loopback.dead_url()  # a free port
    port = int(url.rsplit(":", 1)[1])
    code = (
        f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import loopback, uvicorn; "
        f"app = loopback.make_app(pathlib.Path({str(tmp_path)!r}), 'k'); "
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        loopback.wait_ready(url, proc)  # a cold start imports torch: can take > 30 s on a busy CPU
        client = _ready_client(url)
        results = [client.score(_groups(s), run_id="r", step=s) for s in (0, 1)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = TelemetryStore(tmp_path / "k.sqlite3")
    run = store.query("r")
    for step, res in enumerate(results):
        mine = stats_from_tensors(res.eigenvalues, res.group_scores, res.response_tokens, step)
        assert run.steps[step].allclose(mine)
    store.close()


def test_create_app_wires_the_store_and_routes(tmp_path) -> None:
    import loopback

    app = loopback.make_app(tmp_path, "w")
    assert isinstance(app.state.telemetry, TelemetryStore)
    assert app.state.telemetry.path == str(tmp_path / "w.sqlite3")
    assert {"/telemetry", "/telemetry/runs"} <= set(app.openapi()["paths"])
    with loopback.serve(app) as url:
        client = _ready_client(url)
        client.score(_groups(0), run_id="run-1", step=3)
        import httpx

        runs = httpx.get(url + "/telemetry/runs").json()["runs"]
        bad = httpx.get(url + "/telemetry", params={"since_step": 0})  # run_id missing
    assert runs[0].pop("records") >= 1
    assert runs == [{"run_id": "run-1", "k": 3, "steps": 1, "first_step": 3, "last_step": 3}]
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "run_id"


def test_a_retried_request_with_the_same_key_counts_once(tmp_path) -> None:
    import httpx
    import loopback

    body = {"groups": _groups(0), "run_id": "r", "step": 0}
    with loopback.serve(loopback.make_app(tmp_path, "i")) as url:
        client = _ready_client(url)
        for key in ("k1", "k1", "k2"):  # k1 twice: a retry after a lost answer
            resp = httpx.post(url + "/score", json=body, headers={"Idempotency-Key": key})
            assert resp.status_code == 200
        httpx.post(url + "/score", json=body).raise_for_status()  # no key: always counted
        stats = client.telemetry("r").steps[0]
        once = _ready_client(url).score(_groups(0))
    single = stats_from_tensors(once.eigenvalues, once.group_scores, once.response_tokens)
    assert stats.n_responses == 3 * single.n_responses
    assert stats.allclose(single + single + single)
