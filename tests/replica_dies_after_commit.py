"""A real verifier replica that SIGKILLs itself right after committing one telemetry record.

    python tests/replica_dies_after_commit.py MODEL_DIR DB_PATH PORT DIE_AT_STEP

The real app (`create_app`, the model loaded from MODEL_DIR in its lifespan) under uvicorn on
127.0.0.1:PORT; telemetry in DB_PATH. The first record of step DIE_AT_STEP is committed to
SQLite, then the process kills itself with SIGKILL, before the `/score` answer is written: the
state a failover retry must not count twice (tests/test_telemetry_failover.py).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import uvicorn

from gpm_server.app import create_app
from gpm_server.settings import Settings
from gpm_server.telemetry_store import TelemetryStore
from gprl_client.telemetry import StepStats


class DiesAfterCommit(TelemetryStore):
    def __init__(self, path: str, die_at_step: int) -> None:
        super().__init__(path)
        self.die_at_step = die_at_step

    def add(self, run_id: str, stats: StepStats, request_key: str | None = None) -> bool:
        stored = super().add(run_id, stats, request_key)  # committed (and fsynced) here
        if stats.step == self.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return stored


def main(model: str, db: str, port: str, die_at_step: str) -> None:
    torch.set_num_threads(1)
    settings = Settings(model=model, device="cpu", telemetry_db=db, max_wait_ms=1.0)
    app = create_app(settings)
    app.state.telemetry.close()
    app.state.telemetry = DiesAfterCommit(db, int(die_at_step))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main(*sys.argv[1:])
