"""SQLite persistence of drift telemetry, per `(run_id, step, axis)`.

`record` builds `StepStats` for one `/score` call (gprl_core.telemetry) and stores them in one
transaction, committed before it returns: a `/score` that was answered is on disk and survives a
restart or `kill -9`. WAL mode keeps readers (`GET /telemetry`) off the writers' lock. One
connection guarded by a lock makes the store safe to call from the worker threads the routes use.

Two kinds of record:
- **keyed** (the request carried an `Idempotency-Key`, as every tagged `GPMClient` call does):
  kept as its own row in `telemetry_record`, keyed by `(run_id, key)`. A second record with the
  same key on this replica is ignored, and because the row (not only a sum) is kept,
  `query(..., by_key=True)` can hand it out so that a learner merging several replicas counts a
  record stored on two of them (a retry that failed over after the first stored it and died
  before answering) once. Keys never expire: the row is the data.
- **anonymous** (no key): added to the per-step sums of `telemetry_step` / `telemetry_axis`.

`query(run_id)` answers the sum of both, per step.

Security note: telemetry is keyed by the `run_id` the caller sends. When the service has an API
key, every write (`/score`) and read (`/telemetry`) needs it, so only key holders can touch any
run. Without a key, anyone who can reach the service can add to any run's telemetry: run the
service without a key only on a trusted network.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from gprl_core.telemetry import (
    FLOAT_K_FIELDS,
    INT_K_FIELDS,
    SCALAR_FLOAT_FIELDS,
    SCALAR_INT_FIELDS,
    RunTelemetry,
    StepStats,
    stats_from_tensors,
)

AXIS_FIELDS = (*INT_K_FIELDS, *FLOAT_K_FIELDS)
STEP_FIELDS = (*SCALAR_INT_FIELDS, *SCALAR_FLOAT_FIELDS)
MAX_RUN_ID_LEN = 256
MAX_KEY_LEN = 300

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS telemetry_step (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    k INTEGER NOT NULL,
    n_records INTEGER NOT NULL DEFAULT 0,
    {
    ", ".join(
        f"{f} {'INTEGER' if f in SCALAR_INT_FIELDS else 'REAL'} NOT NULL DEFAULT 0"
        for f in STEP_FIELDS
    )
},
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS telemetry_axis (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    axis INTEGER NOT NULL,
    {
    ", ".join(
        f"{f} {'INTEGER' if f in INT_K_FIELDS else 'REAL'} NOT NULL DEFAULT 0" for f in AXIS_FIELDS
    )
},
    PRIMARY KEY (run_id, step, axis)
);
CREATE TABLE IF NOT EXISTS telemetry_record (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    k INTEGER NOT NULL,
    stats TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX IF NOT EXISTS telemetry_record_step ON telemetry_record (run_id, step);
"""
# `stats` is `StepStats.to_dict()` as JSON: Python's float repr round-trips exactly. Files
# written before keyed records existed have every record in the sums (and an unused
# `telemetry_requests` table); they read as anonymous records.


def _upsert_sql(table: str, keys: tuple[str, ...], conflict: tuple[str, ...], adds: tuple) -> str:
    """INSERT a row, or add its `adds` columns to the existing row with the same `conflict` key."""
    cols = (*keys, *adds)
    sets = ", ".join(f"{f} = {f} + excluded.{f}" for f in adds)
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {sets}"
    )


_STEP_UPSERT = _upsert_sql(
    "telemetry_step", ("run_id", "step", "k"), ("run_id", "step"), ("n_records", *STEP_FIELDS)
)
_AXIS_UPSERT = _upsert_sql(
    "telemetry_axis", ("run_id", "step", "axis"), ("run_id", "step", "axis"), AXIS_FIELDS
)


class TelemetryConflictError(ValueError):
    """A record whose K differs from the K already stored for that run."""


@dataclass
class KeyedTelemetry:
    """One replica's telemetry of a run, split for a merge across replicas.

    `anonymous`: the per-step sums of records stored without a key; `records`: every keyed
    record, `key -> StepStats`. Their sum is `TelemetryStore.query`.
    """

    anonymous: RunTelemetry
    records: dict[str, StepStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `GET /telemetry?by_key=true` body: `steps` (anonymous sums) and `records`."""
        out = self.anonymous.to_dict()
        out["records"] = [{"key": key, **st.to_dict()} for key, st in self.records.items()]
        return out

    def total(self) -> RunTelemetry:
        run = RunTelemetry(self.anonymous.run_id, dict(self.anonymous.steps))
        for stats in self.records.values():
            run.add(stats)
        return run


class TelemetryStore:
    """Thread-safe, durable telemetry store on one SQLite file (":memory:" for tests).

    `request_key` (optional; the route passes the `Idempotency-Key` header plus a suffix) makes a
    record idempotent on this replica and mergeable exactly across replicas (module docstring).
    """

    def __init__(self, path: str | Path, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced, so an acknowledged record survives even a power loss;
        # NORMAL survives a process kill but may lose the last commits on an OS crash.
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)

    # --- writes ------------------------------------------------------------------------------

    def record(
        self,
        *,
        run_id: str,
        step: int,
        eigenvalues: torch.Tensor,
        group_scores: torch.Tensor,
        response_tokens: torch.Tensor | None = None,
        request_key: str | None = None,
    ) -> StepStats:
        """Add one scored batch to `(run_id, step)`; blocking (call off the event loop).

        Shapes: eigenvalues `[N, K]`, group_scores `[N, G, K]`, response_tokens `[N, G]`.
        Returns the batch's own stats. Raises `TelemetryConflictError` when the run already
        has a different K.
        """
        stats = stats_from_tensors(eigenvalues, group_scores, response_tokens, step=step)
        self.add(run_id, stats, request_key)
        return stats

    def add(self, run_id: str, stats: StepStats, request_key: str | None = None) -> bool:
        """Store precomputed stats of `(run_id, stats.step)` atomically, committed on return.

        Returns False (and stores nothing) when `request_key` was stored before for this run.
        """
        _check_run_id(run_id)
        if request_key is not None and not 0 < len(request_key) <= MAX_KEY_LEN:
            raise ValueError(f"request key must have 1 to {MAX_KEY_LEN} characters")
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                known_k = cur.execute(
                    "SELECT k FROM telemetry_step WHERE run_id = ? UNION ALL "
                    "SELECT k FROM telemetry_record WHERE run_id = ? LIMIT 1",
                    (run_id, run_id),
                ).fetchone()
                if known_k is not None and known_k[0] != stats.k:
                    raise TelemetryConflictError(
                        f"run {run_id!r} has k={known_k[0]}, this record has k={stats.k}"
                    )
                if request_key is None:
                    self._add_to_sums(cur, run_id, stats)
                    stored = True
                else:
                    cur.execute(
                        "INSERT OR IGNORE INTO telemetry_record "
                        "(run_id, key, step, k, stats, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, request_key, stats.step, stats.k, _dumps(stats), time.time()),
                    )
                    stored = cur.rowcount == 1
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return stored

    @staticmethod
    def _add_to_sums(cur: sqlite3.Cursor, run_id: str, stats: StepStats) -> None:
        step_row = (run_id, stats.step, stats.k, 1, *(getattr(stats, f) for f in STEP_FIELDS))
        axis_rows = [
            (run_id, stats.step, axis, *(_item(getattr(stats, f)[axis]) for f in AXIS_FIELDS))
            for axis in range(stats.k)
        ]
        cur.execute(_STEP_UPSERT, step_row)
        cur.executemany(_AXIS_UPSERT, axis_rows)

    # --- reads -------------------------------------------------------------------------------

    def query(self, run_id: str, since_step: int = 0) -> RunTelemetry:
        """All stored steps >= since_step of one run, every record added (empty when unknown)."""
        return self.query_by_key(run_id, since_step).total()

    def query_by_key(self, run_id: str, since_step: int = 0) -> KeyedTelemetry:
        """Steps >= since_step of one run: anonymous sums and keyed records apart."""
        step_cols = ", ".join(("step", "k", *STEP_FIELDS))
        axis_cols = ", ".join(("step", "axis", *AXIS_FIELDS))
        with self._lock:
            steps = self._conn.execute(
                f"SELECT {step_cols} FROM telemetry_step WHERE run_id = ? AND step >= ? "
                "ORDER BY step",
                (run_id, since_step),
            ).fetchall()
            axes = self._conn.execute(
                f"SELECT {axis_cols} FROM telemetry_axis WHERE run_id = ? AND step >= ? "
                "ORDER BY step, axis",
                (run_id, since_step),
            ).fetchall()
            records = self._conn.execute(
                "SELECT key, stats FROM telemetry_record WHERE run_id = ? AND step >= ? "
                "ORDER BY step, key",
                (run_id, since_step),
            ).fetchall()
        per_step: dict[int, dict[str, list]] = {}
        for row in axes:
            cols = per_step.setdefault(row[0], {f: [] for f in AXIS_FIELDS})
            for name, value in zip(AXIS_FIELDS, row[2:], strict=True):
                cols[name].append(value)
        run = RunTelemetry(run_id)
        for row in steps:
            step, k = row[0], row[1]
            scalars = dict(zip(STEP_FIELDS, row[2:], strict=True))
            run.add(StepStats(step=step, k=k, **per_step.get(step, {}), **scalars))
        keyed = {key: StepStats.from_dict(json.loads(text)) for key, text in records}
        return KeyedTelemetry(run, keyed)

    def list_runs(self) -> list[dict[str, int | str]]:
        """`[{"run_id", "k", "steps", "first_step", "last_step", "records"}]`, by run_id."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, MAX(k), COUNT(DISTINCT step), MIN(step), MAX(step), SUM(n) FROM ("
                "SELECT run_id, k, step, n_records AS n FROM telemetry_step UNION ALL "
                "SELECT run_id, k, step, 1 AS n FROM telemetry_record"
                ") GROUP BY run_id ORDER BY run_id"
            ).fetchall()
        keys = ("run_id", "k", "steps", "first_step", "last_step", "records")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TelemetryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dumps(stats: StepStats) -> str:
    return json.dumps(stats.to_dict(), separators=(",", ":"))


def _item(value: object) -> int | float:
    return value.item() if hasattr(value, "item") else value  # numpy scalar → Python


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_LEN:
        raise ValueError(f"run_id must be a non-empty string of at most {MAX_RUN_ID_LEN} chars")
