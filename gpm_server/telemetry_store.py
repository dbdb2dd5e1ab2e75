"""SQLite persistence of drift telemetry: one row per `(run_id, step, axis)`, updated by adding.

`record` builds `StepStats` for one `/score` call (gprl_client.telemetry) and adds them to the
stored rows in one transaction (an UPSERT that adds), committed before it returns: a `/score`
that was answered is on disk and survives a restart or `kill -9`. WAL mode keeps readers
(`GET /telemetry`) off the writers' lock. One connection guarded by a lock makes the store safe
to call from the worker threads the routes use.

Security note: telemetry is keyed by the `run_id` the caller sends. When the service has an API
key, every write (`/score`) and read (`/telemetry`) needs it, so only key holders can touch any
run. Without a key, anyone who can reach the service can add to any run's telemetry: run the
service without a key only on a trusted network.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

import torch

from gprl_client.telemetry import (
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
CREATE TABLE IF NOT EXISTS telemetry_requests (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, key)
);
"""


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


class TelemetryStore:
    """Thread-safe, durable telemetry store on one SQLite file (":memory:" for tests).

    `request_key` (optional, e.g. from an `Idempotency-Key` header) makes a record idempotent:
    a retried request whose first attempt was stored but never acknowledged (a lost response)
    is not counted twice. Keys are remembered for `dedup_window_s` seconds.
    """

    def __init__(
        self,
        path: str | Path,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        dedup_window_s: float = 24 * 3600.0,
    ) -> None:
        self.path = str(path)
        self.dedup_window_s = dedup_window_s
        self._keyed = 0
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
        """Add precomputed stats to `(run_id, stats.step)` atomically, committed on return.

        Returns False (and adds nothing) when `request_key` was recorded before.
        """
        _check_run_id(run_id)
        step_row = (run_id, stats.step, stats.k, 1, *(getattr(stats, f) for f in STEP_FIELDS))
        axis_rows = [
            (run_id, stats.step, axis, *(_item(getattr(stats, f)[axis]) for f in AXIS_FIELDS))
            for axis in range(stats.k)
        ]
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute(
                    "SELECT k FROM telemetry_step WHERE run_id = ? LIMIT 1", (run_id,)
                ).fetchone()
                if row is not None and row[0] != stats.k:
                    raise TelemetryConflictError(
                        f"run {run_id!r} has k={row[0]}, this record has k={stats.k}"
                    )
                if request_key is not None and not self._claim(cur, run_id, request_key):
                    cur.execute("COMMIT")
                    return False
                cur.execute(_STEP_UPSERT, step_row)
                cur.executemany(_AXIS_UPSERT, axis_rows)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return True

    def _claim(self, cur: sqlite3.Cursor, run_id: str, request_key: str) -> bool:
        """Remember the key (inside the caller's transaction); False if it was already there."""
        if len(request_key) > MAX_KEY_LEN:
            raise ValueError(f"request key longer than {MAX_KEY_LEN} characters")
        now = time.time()
        self._keyed += 1
        if self._keyed % 512 == 0:  # forget old keys now and then
            cur.execute(
                "DELETE FROM telemetry_requests WHERE created < ?", (now - self.dedup_window_s,)
            )
        cur.execute(
            "INSERT OR IGNORE INTO telemetry_requests (run_id, key, created) VALUES (?, ?, ?)",
            (run_id, request_key, now),
        )
        return cur.rowcount == 1

    # --- reads -------------------------------------------------------------------------------

    def query(self, run_id: str, since_step: int = 0) -> RunTelemetry:
        """All stored steps >= since_step of one run (empty when the run is unknown)."""
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
        return run

    def list_runs(self) -> list[dict[str, int | str]]:
        """`[{"run_id", "k", "steps", "first_step", "last_step", "records"}]`, by run_id."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, MAX(k), COUNT(*), MIN(step), MAX(step), SUM(n_records) "
                "FROM telemetry_step GROUP BY run_id ORDER BY run_id"
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


def _item(value: object) -> int | float:
    return value.item() if hasattr(value, "item") else value  # numpy scalar → Python


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_LEN:
        raise ValueError(f"run_id must be a non-empty string of at most {MAX_RUN_ID_LEN} chars")
