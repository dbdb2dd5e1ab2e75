"""The real `gpm-server serve` process on a free localhost port, called over TCP, then SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gpm_server.cli import build_parser, main, serve_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "gpm-server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gpm_server.cli"]


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@pytest.mark.slow
def test_serve_over_tcp_and_sigterm(tiny_gprl_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "GPM_API_KEY": "",  # env_ignore_empty: no key unless we pass one
        "GPM_TELEMETRY_DB": str(tmp_path / "telemetry.sqlite3"),
        "TEST_GPM_KEY": "process-key",
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
        _wait_ready(base, proc)
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


def test_client_disconnect_over_tcp_drops_the_queued_work() -> None:
    """uvicorn + a client that times out: its sequences never reach the model."""
    import threading

    import uvicorn
    from fakes import FakeBackend

    from gpm_server.app import create_app
    from gpm_server.settings import Settings

    backend = FakeBackend()
    app = create_app(Settings(telemetry_db=":memory:", max_wait_ms=0), model=backend)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        backend.gate.clear()
        backend.entered.clear()
        body = {"groups": [{"prompt": "p", "responses": ["blocker"]}]}
        blocker = threading.Thread(
            target=httpx.post, args=(f"{base}/score",), kwargs={"json": body, "timeout": 60}
        )
        blocker.start()
        assert backend.entered.wait(10)
        gone = {"groups": [{"prompt": "p", "responses": ["client gives up"]}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/score", json=gone, timeout=0.5)
        registry = app.state.metrics.registry
        while time.monotonic() < deadline:
            if registry.get_sample_value("gpm_errors_total", {"reason": "client_gone"}):
                break
            time.sleep(0.05)
        assert registry.get_sample_value("gpm_errors_total", {"reason": "client_gone"}) == 1
        backend.gate.set()
        blocker.join(30)
        responses = {s.input_ids for batch in backend.batches for s in batch}
        (gone_seq,) = backend.encode([("p", "client gives up")])
        assert gone_seq.input_ids not in responses
    finally:
        backend.gate.set()
        server.should_exit = True
        thread.join(30)
