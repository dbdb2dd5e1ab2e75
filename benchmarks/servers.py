"""Start the servers under test as subprocesses on free loopback ports; sample their memory.

- `start_service`: the real verifier, `gpm-server serve` (falls back to `create_app` under
  uvicorn when this build has no CLI module yet; both run the same app);
- `start_per_request`: `benchmarks.per_request_server`, the serve_rm.py-style peer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

_FALLBACK = (
    "import uvicorn; from gpm_server.app import create_app; from gpm_server.settings import "
    "Settings; s = Settings(); uvicorn.run(create_app(s), host=s.host, port=s.port, "
    "log_level='warning')"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `url` is its base URL. Stop with `stop()` (SIGTERM, then kill)."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=os.getcwd()
        )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s; see {self.log}")

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` in MiB (Linux /proc; None elsewhere or when gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


@contextlib.contextmanager
def rss_sampler(server: Server, every_s: float = 0.2) -> Iterator[list[float]]:
    """Collect the server's RSS (MiB) every `every_s` while the block runs."""
    samples: list[float] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            value = server.rss_mb()
            if value is not None:
                samples.append(value)
            done.wait(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


THREADS: int | None = None  # torch threads of every server (OMP_NUM_THREADS); None: default


def _env(extra: dict[str, str], threads: int | None = None) -> dict[str, str]:
    # Settings come only from here (a stray GPM_API_KEY would turn every answer into a 401);
    # the backbone cache location is kept.
    env = {k: v for k, v in os.environ.items() if k == "GPM_CACHE_DIR" or not k.startswith("GPM_")}
    env.update(extra)
    threads = threads or THREADS
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_service(
    model: str | None,
    workdir: Path,
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    max_wait_ms: float,
    model_workers: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    ready_timeout_s: float = 900.0,
) -> Server:
    """`gpm-server serve` on a free port (model None: the embedded default), ready to serve.

    `model_workers` batches run at once, each on a model thread with `THREADS` torch threads.
    """
    port = free_port()
    settings = {
        "GPM_HOST": "127.0.0.1",
        "GPM_PORT": str(port),
        "GPM_MAX_BATCH_TOKENS": str(max_batch_tokens),
        "GPM_MAX_BATCH_SIZE": str(max_batch_size),
        "GPM_MAX_WAIT_MS": str(max_wait_ms),
        "GPM_MAX_QUEUE": "100000",
        "GPM_MODEL_WORKERS": str(model_workers),
        "GPM_DEVICE": device,
        "GPM_DTYPE": dtype,
        "GPM_TELEMETRY_DB": str(workdir / "telemetry.sqlite3"),
        "GPM_LOG_LEVEL": "warning",
    }
    if model is not None:
        settings["GPM_MODEL"] = model
    if importlib.util.find_spec("gpm_server.cli") is not None:
        flags = ["--host", "127.0.0.1", "--port", str(port)]
        flags += ["--max-batch-tokens", str(max_batch_tokens)]
        flags += ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
        flags += [] if model is None else ["--model", model]
        script = Path(sys.executable).with_name("gpm-server")
        cmd = [str(script), "serve", *flags] if script.exists() else []
        cmd = cmd or [sys.executable, "-m", "gpm_server.cli", "serve", *flags]
    else:
        cmd = [sys.executable, "-c", _FALLBACK]
    return _started(Server(cmd, port, _env(settings), workdir / "service.log"), ready_timeout_s)


def start_per_request(
    model: str,
    workdir: Path,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    ready_timeout_s: float = 900.0,
) -> Server:
    """The serve_rm.py-style peer (`benchmarks.per_request_server`) on a free port, with
    `threads` torch threads (default `THREADS`)."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.per_request_server", "--model", model]
    cmd += ["--port", str(port), "--device", device, "--dtype", dtype]
    env = _env({}, threads)
    return _started(Server(cmd, port, env, workdir / "per_request.log"), ready_timeout_s)


def _started(server: Server, ready_timeout_s: float) -> Server:
    """`server` once `/ready` answers; stopped (and the error raised) if it never does."""
    try:
        server.wait_ready(ready_timeout_s)
    except Exception:
        server.stop()
        raise
    return server
