"""Exactly-once telemetry across replicas: a record that two replicas stored counts once.

The failure: replica A stores a tagged /score call's telemetry and dies before answering; the
client retries on replica B with the same `Idempotency-Key`, and B stores it too. Summing the
replicas' per-step totals counts it twice. The fix: replicas keep keyed records apart
(`GET /telemetry?by_key=true`) and the client merges by key (`merge_by_key`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import loopback
import numpy as np
import pytest
import torch

from gpm_server.app import create_app
from gpm_server.settings import Settings
from gpm_server.telemetry_store import TelemetryStore
from gprl_client import GPMClient
from gprl_client.telemetry import (
    RunTelemetry,
    StepStats,
    merge_by_key,
    merge_runs,
    stats_from_tensors,
)

TESTS = Path(__file__).resolve().parent


def _stats(seed: int, step: int, n: int = 3, g: int = 4, k: int = 3) -> StepStats:
    gen = torch.Generator().manual_seed(seed)
    eig = torch.rand(n, k, generator=gen, dtype=torch.float64)
    scores = torch.randn(n, g, k, generator=gen, dtype=torch.float64)
    tokens = torch.randint(1, 50, (n, g), generator=gen)
    return stats_from_tensors(eig, scores, tokens, step=step)


def _run(run_id: str, stats: list[StepStats]) -> RunTelemetry:
    out = RunTelemetry(run_id)
    for st in stats:
        out.add(st)
    return out


def _answer(run: str, anonymous: list[StepStats], records: dict[str, StepStats]) -> dict:
    body = _run(run, anonymous).to_dict()
    body["records"] = [{"key": key, **st.to_dict()} for key, st in records.items()]
    return body


def test_merge_by_key_counts_a_record_held_twice_once() -> None:
    shared, only_a, only_b, anon_a, anon_b = (_stats(i, step=i % 2) for i in range(5))
    a = _answer("r", [anon_a], {"k1": shared, "k2": only_a})
    b = _answer("r", [anon_b], {"k1": shared, "k3": only_b})
    merged = merge_by_key([a, b])
    union = _run("r", [shared, only_a, only_b, anon_a, anon_b])
    assert sorted(merged.steps) == sorted(union.steps) == [0, 1]
    for step in union.steps:
        assert merged.steps[step].allclose(union.steps[step])
    # summing totals (what a key-blind merge does) counts `shared` twice
    naive = merge_runs([_run("r", [shared, only_a, anon_a]), _run("r", [shared, only_b, anon_b])])
    assert naive.steps[0].n_responses == union.steps[0].n_responses + shared.n_responses


def test_merge_by_key_reads_old_answers_and_refuses_a_key_on_two_steps() -> None:
    st = _stats(0, step=2)
    legacy = RunTelemetry("r", {2: st}).to_dict()  # a server without keyed records
    assert merge_by_key([legacy, legacy]).steps[2].n_responses == 2 * st.n_responses
    with pytest.raises(ValueError, match="k1"):
        merge_by_key([_answer("r", [], {"k1": st}), _answer("r", [], {"k1": _stats(0, step=3)})])
    with pytest.raises(ValueError):
        merge_by_key([])


def test_store_keeps_keyed_records_apart_from_the_sums(tmp_path: Path) -> None:
    keyed, again, anon = _stats(1, step=0), _stats(2, step=0), _stats(3, step=0)
    with TelemetryStore(tmp_path / "t.sqlite3") as store:
        assert store.add("r", keyed, request_key="abc:0") is True
        assert store.add("r", again, request_key="abc:0") is False  # the key is known: ignored
        assert store.add("r", anon) is True
        split = store.query_by_key("r")
        assert list(split.records) == ["abc:0"] and split.records["abc:0"].allclose(keyed)
        assert split.anonymous.steps[0].allclose(anon)
        assert store.query("r").steps[0].allclose(keyed + anon)
        assert store.list_runs() == [
            {"run_id": "r", "k": 3, "steps": 1, "first_step": 0, "last_step": 0, "records": 2}
        ]
        with pytest.raises(ValueError, match="k="):
            store.add("r", _stats(4, step=1, k=2), request_key="other")
    with TelemetryStore(tmp_path / "t.sqlite3") as reopened:  # the rows are on disk
        assert reopened.query_by_key("r").to_dict() == split.to_dict()


# --- two real replicas: A stores a record and dies before answering --------------------------


def _groups(step: int) -> list[dict]:
    """Six groups of G = 2, 3, 4, 5, 2, 3 whose responses change with the step."""
    return [
        {
            "prompt": f"prompt {n}",
            "responses": [
                f"answer {n}.{i} at step {step}" + "!" * (i * n) for i in range(2 + n % 4)
            ],
        }
        for n in range(6)
    ]


def _spawn_dying_replica(model: Path, db: Path, port: int, die_at_step: int, log: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPM_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    script = TESTS / "replica_dies_after_commit.py"
    cmd = [sys.executable, str(script), str(model), str(db), str(port), str(die_at_step)]
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _app(tiny_gpm, db: Path):
    return create_app(Settings(telemetry_db=db, max_wait_ms=1.0), model=tiny_gpm)


@pytest.mark.slow  # a server process on the tiny model: imports torch + transformers
@pytest.mark.usefixtures("one_torch_thread")  # like replica A: one thread, the same kernels
def test_a_record_stored_by_a_replica_that_died_before_answering_counts_once(
    tiny_gprl_dir: Path, tiny_gpm, tmp_path: Path
) -> None:
    """Replica A (a real `create_app` process on the tiny model) commits the first telemetry
    record of step 1 and is SIGKILLed before it answers. The client fails over to replica B
    with the same Idempotency-Key; B stores that chunk's records too. A restarts on its file.
    The merged telemetry equals the union of the distinct records, which is the statistics of
    the groups the client got, each once."""
    db_a, db_b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    port = loopback.free_port()
    url_a = f"http://127.0.0.1:{port}"
    log = tmp_path / "a.log"
    proc = _spawn_dying_replica(tiny_gprl_dir, db_a, port, die_at_step=1, log=log)
    try:
        loopback.wait_ready(url_a, proc, timeout_s=240.0, log=log)
        with loopback.serve(_app(tiny_gpm, db_b), ready=True) as url_b:
            # Round robin, two groups a request: step 0 → A, B, A; step 1 → B, A (dies), B.
            client = GPMClient(
                [url_a, url_b], max_retries=3, backoff=0.01, max_groups_per_request=2
            )
            with client:
                results = [client.score(_groups(s), run_id="r", step=s) for s in range(4)]
            assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()
            assert client.failures == 0 and client.retries >= 1
            with TelemetryStore(db_a) as died:  # A stored the first record of the chunk only
                on_a = died.query_by_key("r", since_step=1).records
            assert len(on_a) == 1 and next(iter(on_a.values())).step == 1
            restarted = _app(tiny_gpm, db_a)  # A again, on its file
            with loopback.serve(restarted, ready=True) as url_a2:
                with GPMClient([url_a2, url_b]) as reader:
                    merged = reader.telemetry("r")
                raw = [
                    httpx.get(f"{u}/telemetry?run_id=r&by_key={by_key}").json()
                    for by_key in ("true", "false")
                    for u in (url_a2, url_b)
                ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    keyed_a, keyed_b, total_a, total_b = raw
    assert keyed_a["steps"] == keyed_b["steps"] == []  # every tagged call carried a key
    copies: dict[str, list[StepStats]] = {}
    for item in keyed_a["records"] + keyed_b["records"]:
        copies.setdefault(item["key"], []).append(StepStats.from_dict(item))
    (dup_key,) = (key for key, c in copies.items() if len(c) == 2)  # on both replicas
    assert dup_key in on_a and all(len(c) == 1 for k, c in copies.items() if k != dup_key)
    distinct = RunTelemetry("r")
    for c in copies.values():
        distinct.add(c[0])  # A's copy of the duplicated one, as the merge keeps the first
    assert sorted(merged.steps) == sorted(distinct.steps) == [0, 1, 2, 3]
    for step, res in enumerate(results):
        assert merged.steps[step].allclose(distinct.steps[step]), step
        # ... and that union is what the client was answered, every group once
        assert not res.failed.any()
        union = stats_from_tensors(res.eigenvalues, res.group_scores, res.response_tokens, step)
        got = merged.steps[step]
        assert (got.n_responses, got.n_eig_groups) == (union.n_responses, union.n_eig_groups)
        assert got.n_groups.tolist() == union.n_groups.tolist() == [6, 6, 6]
        # step 1 holds A's copy, computed in another process: equal up to float32 rounding
        assert got.allclose(union, rtol=1e-9 if step != 1 else 1e-5, atol=1e-9), step
    # A key-blind sum of the replicas' totals counts the duplicated record twice.
    naive = merge_runs(RunTelemetry.from_dict(t) for t in (total_a, total_b))
    twice = copies[dup_key][0]
    assert naive.steps[1].n_responses == merged.steps[1].n_responses + twice.n_responses
    np.testing.assert_allclose(
        naive.steps[1].sum_x, merged.steps[1].sum_x + twice.sum_x, rtol=1e-9, atol=1e-12
    )
