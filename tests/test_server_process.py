"""The real `gpm-server serve` process on a free localhost port, called over TCP, then SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import loopback
import pytest
import uvicorn
from fakes import FakeBackend

from gpm_server.app import create_app
from gpm_server.cli import build_parser, main, serve_settings
from gpm_server.settings import Settings


def _command() -> list[str]:
    script = Path(sys.executable).parent / "gpm-server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gpm_server.cli"]


@pytest.mark.slow
def test_serve_over_tcp_and_sigterm(tiny_gprl_dir: Path, tmp_path: Path) -> None:
    port = loopback.free_port()
    env = {
        **os.environ,
        "GPM_API_KEY": "",  # env_ignore_empty: no key unless we pass one
        "GPM_TELEMETRY_DB": str(tmp_path / "telemetry.sqlite3"),
        "TEST_GPM_KEY": "process-key",
        # This checkout's packages, not whatever an editable install elsewhere maps them to.
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    cmd = [
        *_command(),
        "serve",
        "--model",
        str(tiny_gprl_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-wait-ms",
        "2",
        "--api-key-env",
        "TEST_GPM_KEY",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        loopback.wait_ready(base, proc)
        auth = {"Authorization": "Bearer process-key"}
        body = {"groups": [{"prompt": "What is 2 + 2?", "responses": ["4", "5", "four"]}]}
        assert httpx.post(f"{base}/score", json=body, timeout=30).status_code == 401
        resp = httpx.post(f"{base}/score", json=body, headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text
        group = resp.json()["groups"][0]
        assert len(group["embeddings"]) == 3 and len(group["eigenvalues"]) == resp.json()["k"]
        info = httpx.get(f"{base}/info", timeout=5).json()
        assert info["model"] == str(tiny_gprl_dir) and info["auth_required"] is True
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log
    assert "process-key" not in log and "What is 2 + 2?" not in log


def test_serve_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("GPM_PORT", "9001")
    monkeypatch.setenv("MY_KEY", "k-123")
    args = build_parser().parse_args(
        ["serve", "--port", "9002", "--no-l2-normalize", "--api-key-env", "MY_KEY"]
    )
    s = serve_settings(args)
    assert (s.max_batch_size, s.port, s.l2_normalize) == (7, 9002, False)
    assert s.api_key is not None and s.api_key.get_secret_value() == "k-123"
    assert "k-123" not in repr(s)


def test_serve_without_model_or_default_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A build without the embedded default model: no --model is a clear error naming --model."""
    monkeypatch.delenv("GPM_MODEL", raising=False)
    # None in sys.modules makes `import gpm_server.default_model` fail as if it were absent.
    monkeypatch.setitem(sys.modules, "gpm_server.default_model", None)
    assert main(["serve", "--port", "0"]) == 2
    assert "--model" in capsys.readouterr().err


@contextlib.contextmanager
def _uvicorn_thread(backend: FakeBackend) -> Iterator[tuple[Any, Any, str]]:
    """The app around `backend` under a real uvicorn server (in a thread), ready."""
    app = create_app(Settings(telemetry_db=":memory:", max_wait_ms=0), model=backend)
    port = loopback.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    loopback.wait_ready(base, timeout_s=60, interval_s=0.05)
    try:
        yield app, server, base
    finally:
        backend.gate.set()
        server.should_exit = True
        thread.join(30)


def _post_in_thread(url: str, body: dict, out: list) -> threading.Thread:
    def post() -> None:
        out.append(httpx.post(url, json=body, timeout=60))

    t = threading.Thread(target=post)
    t.start()
    return t


def test_client_disconnect_over_tcp_drops_the_queued_work() -> None:
    """uvicorn + a client that times out: its sequences never reach the model."""
    backend = FakeBackend()
    with _uvicorn_thread(backend) as (app, _, base):
        backend.gate.clear()
        backend.entered.clear()
        done: list = []
        blocker = _post_in_thread(f"{base}/score", _body("blocker"), done)
        assert backend.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/score", json=_body("client gives up"), timeout=0.5)
        registry = app.state.metrics.registry
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if registry.get_sample_value("gpm_errors_total", {"reason": "client_gone"}):
                break
            time.sleep(0.05)
        assert registry.get_sample_value("gpm_errors_total", {"reason": "client_gone"}) == 1
        backend.gate.set()
        blocker.join(30)
        assert done[0].status_code == 200
        seen = {s.input_ids for batch in backend.batches for s in batch}
        (gone,) = backend.encode([("p", "client gives up")])
        assert gone.input_ids not in seen


def test_shutdown_lets_accepted_requests_finish() -> None:
    """What SIGTERM does (uvicorn's should_exit): in-flight and queued requests still get 200."""
    backend = FakeBackend()
    with _uvicorn_thread(backend) as (_, server, base):
        backend.gate.clear()
        backend.entered.clear()
        done: list = []
        first = _post_in_thread(f"{base}/score", _body("in flight"), done)
        assert backend.entered.wait(10)
        queued = _post_in_thread(f"{base}/score", _body("queued behind it"), done)
        time.sleep(0.3)  # let the second request reach the queue
        server.should_exit = True
        time.sleep(0.3)
        backend.gate.set()
        first.join(30)
        queued.join(30)
    assert [r.status_code for r in done] == [200, 200]
    served = {s.input_ids for batch in backend.batches for s in batch}
    assert backend.encode([("p", "queued behind it")])[0].input_ids in served


def _body(response: str) -> dict:
    return {"groups": [{"prompt": "p", "responses": [response]}]}


def test_serve_exits_1_when_the_model_fails_to_load(tmp_path: Path) -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    argv = ["serve", "--model", str(tmp_path / "missing"), "--port", str(loopback.free_port())]
    try:
        rc = main([*argv, "--telemetry-db", str(tmp_path / "t.sqlite3"), "--log-level", "error"])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert rc == 1
