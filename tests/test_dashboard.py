"""GET /dashboard: its data (the drift replay, the load summary), its auth rule, and the page
itself rendered in headless Chromium against a real `gpm-server serve` process."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

import httpx
import loopback
import pytest
import torch
from apptools import serve
from fakes import FakeBackend
from test_server_process import _command

from gpm_server.dashboard_data import drift_series, metrics_summary
from gpm_server.metrics import Metrics
from gpm_server.routes_dashboard import STATIC_DIR
from gpm_server.telemetry_store import TelemetryStore
from gprl_client.drift import DriftConfig, DriftController, DriftMonitor, drift_config
from gprl_client.telemetry import RunTelemetry, stats_from_tensors

ROOT = Path(__file__).resolve().parents[1]
KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --- the data behind the page ---------------------------------------------------------------


def _drifting_run(steps: int, k: int = 3, seed: int = 0) -> tuple[RunTelemetry, list]:
    """Telemetry of a run whose axis 0 spreads out after step 12, and the raw batches."""
    gen = torch.Generator().manual_seed(seed)
    run, batches = RunTelemetry("r"), []
    f64 = torch.float64  # the telemetry sums in float64; so must the reference
    for step in range(steps):
        eig = torch.softmax(torch.randn(4, k, generator=gen, dtype=f64), dim=-1)
        scores = torch.randn(4, 5, k, generator=gen, dtype=f64)
        if step >= 12:
            scores[..., 0] *= 1.0 + 0.5 * (step - 11)
        run.add(stats_from_tensors(eig, scores, step=step))
        batches.append((eig, scores))
    return run, batches


def test_drift_series_is_the_learners_monitor_and_controller_on_the_raw_scores() -> None:
    config = DriftConfig(baseline_steps=8)
    run, batches = _drifting_run(30)
    out = drift_series(run, config)
    monitor, controller = DriftMonitor(3, config), DriftController(3, config)
    for t, (eig, scores) in enumerate(batches):
        m = monitor.update_from_group_scores(scores, eig)
        c = controller.update(m)
        if t < config.baseline_steps - 1:  # no baseline yet: D is undefined, sent as null
            assert out["drift"][t] is None and out["threshold"][t] is None
            continue
        assert out["drift"][t] == pytest.approx(m.drift, rel=1e-9)
        assert out["threshold"][t] == pytest.approx(c.threshold, rel=1e-9)
        assert [w[t] for w in out["weights"]] == pytest.approx(list(c.weights), rel=1e-9)
        assert [a[t] for a in out["alpha"]] == pytest.approx(list(m.alpha), rel=1e-9)
        assert (out["beta"][t], out["clip_eps"][t]) == pytest.approx((c.beta, c.clip_eps))
        assert (out["active"][t], out["corrections"][t]) == (c.active, c.corrections)
    assert out["steps"] == list(range(30)) and out["k"] == 3
    assert out["corrections"][-1] > 0  # the spreading axis was corrected ...
    assert out["weights"][0][-1] < 1.0  # ... by weighting it down
    assert all(len(series) == 30 for name in ("variance", "growth") for series in out[name])
    assert out["baseline"] is not None and sum(out["baseline"]) == pytest.approx(1.0)


def test_drift_series_of_an_unknown_run_is_empty() -> None:
    out = drift_series(RunTelemetry("nobody"))
    assert out["steps"] == [] and out["k"] == 0 and out["baseline"] is None


def test_metrics_summary_counts_inference_requests_only() -> None:
    m = Metrics()
    m.requests.labels(route="/score", status="200").inc(5)
    m.requests.labels(route="/compare", status="429").inc(2)
    m.requests.labels(route="/score", status="500").inc(1)
    m.requests.labels(route="/score", status="422").inc(1)
    m.requests.labels(route="/telemetry/drift", status="200").inc(40)  # the page's own polls
    m.batch_size.observe(4)
    m.batch_size.observe(8)
    m.queue_depth.set(3)
    for seconds in (0.003, 0.02, 0.02, 0.7):
        m.latency.labels(stage="total").observe(seconds)
    out = metrics_summary(m.registry)
    assert out["requests"] == 9
    assert out["by_status"] == {"2xx": 5, "4xx": 1, "429": 2, "5xx": 1}
    assert (out["batches"], out["sequences"], out["queue_depth"]) == (2, 12, 3)
    buckets = dict((le, c) for le, c in out["latency"]["buckets"])
    assert (buckets[0.005], buckets[0.025], buckets[1.0], buckets[None]) == (1, 3, 4, 4)
    assert out["latency"]["count"] == 4 and math.isclose(out["latency"]["sum"], 0.743)


# --- routes and auth --------------------------------------------------------------------------


async def test_page_is_open_its_data_needs_the_key(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.sqlite3")
    async with serve(FakeBackend(k=2), telemetry=store, api_key=KEY) as (_, client):
        page = await client.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="(dashboard/static/[^"]+)"', page.text):
            assert (await client.get("/" + asset)).status_code == 200, asset
        assert (await client.get("/telemetry/drift", params={"run_id": "r"})).status_code == 401
        assert (await client.get("/metrics/summary")).status_code == 200  # open, like /metrics
        body = {
            "groups": [{"prompt": "p", "responses": ["a", "bb", "ccc"]}],
            "run_id": "r",
            "step": 0,
        }
        assert (await client.post("/score", json=body, headers=AUTH)).status_code == 200
        drift = await client.get("/telemetry/drift", params={"run_id": "r"}, headers=AUTH)
        assert drift.status_code == 200
        assert drift.json()["steps"] == [0] and drift.json()["k"] == 2
        assert drift.json()["drift"] == [None]  # one step: no baseline, no D


async def test_drift_replay_takes_the_runs_own_config(tmp_path: Path) -> None:
    """`/telemetry/drift?config=` replays under the learner's knobs (its `state_dict()['config']`,
    rule included), equal to `drift_series` with that config; a bad query is a 422 naming the
    problem and stores nothing."""
    import json as _json

    store = TelemetryStore(tmp_path / "t.sqlite3")
    run, _ = _drifting_run(30)
    for stats in run.steps.values():
        store.add("r", stats)
    learner = drift_config("paper", baseline_steps=4, ema_rate=0.25, threshold=0.01)
    as_sent = _json.dumps(asdict(learner))
    async with serve(FakeBackend(k=3), telemetry=store, api_key=KEY) as (_, client):
        got = await client.get(
            "/telemetry/drift", params={"run_id": "r", "config": as_sent}, headers=AUTH
        )
        assert got.status_code == 200
        assert got.json() == _json.loads(_json.dumps(drift_series(store.query("r"), learner)))
        assert got.json()["config"]["rule"] == "paper"
        default = await client.get("/telemetry/drift", params={"run_id": "r"}, headers=AUTH)
        assert default.json()["config"] == asdict(DriftConfig())
        assert default.json()["corrections"] != got.json()["corrections"]
        bad = {
            "{not json": "not JSON",
            "[1, 2]": "JSON object",
            '{"baseline_step": 4}': "unknown DriftConfig fields ['baseline_step']",
            '{"ema_rate": 2}': "0 < ema_rate <= 1",
            '{"rule": "paper", "noise_multiplier": 10}': "noise_multiplier must be 0",
        }
        for config, message in bad.items():
            r = await client.get(
                "/telemetry/drift", params={"run_id": "r", "config": config}, headers=AUTH
            )
            assert r.status_code == 422 and message in r.json()["error"]["message"], config
        clash = {"run_id": "r", "preset": "project", "config": as_sent}
        r = await client.get("/telemetry/drift", params=clash, headers=AUTH)
        assert r.status_code == 422 and "config's rule is 'paper'" in r.json()["error"]["message"]
        # a learner with an axis prior: the replayed m is the controller's times the prior
        with_prior = _json.dumps({**asdict(learner), "axis_prior": [1, 1, 0]})
        primed = {"run_id": "r", "config": with_prior}
        r = await client.get("/telemetry/drift", params=primed, headers=AUTH)
        assert r.status_code == 200 and r.json()["config"]["axis_prior"] == [1.5, 1.5, 0.0]
        plain = got.json()["weights"]
        assert r.json()["weights"][2] == [0.0] * 30
        assert r.json()["weights"][0] == pytest.approx([1.5 * w for w in plain[0]])
        wrong = {"run_id": "r", "config": '{"axis_prior": [1, 0]}'}
        r = await client.get("/telemetry/drift", params=wrong, headers=AUTH)
        assert r.status_code == 422 and "K=3" in r.json()["error"]["message"]
        assert len(store.query("r").steps) == 30


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN: every script and stylesheet the page names is a file shipped in the package."""
    html = (STATIC_DIR / "index.html").read_text()
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', html) if a != "data:,"]
    assert assets and all(a.startswith("dashboard/static/") for a in assets)
    assert all((STATIC_DIR / a.removeprefix("dashboard/static/")).is_file() for a in assets)
    js = (STATIC_DIR / "dashboard.js").read_text()
    assert "http://" not in js and "https://" not in js


# --- the page in a real browser ---------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: scripts/install.sh installs Debian's package as root")
    return path


@pytest.fixture
def live_server(tiny_gprl_dir: Path, tmp_path: Path) -> Iterator[str]:
    """`gpm-server serve` on the tiny model with an API key; yields the base URL."""
    port = loopback.free_port()
    env = {
        **os.environ,
        "GPM_API_KEY": KEY,
        "GPM_TELEMETRY_DB": str(tmp_path / "telemetry.sqlite3"),
        "OMP_NUM_THREADS": "1",
        # The checkout under test, even where the installed package is another (editable) copy.
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [*_command(), "serve", "--model", str(tiny_gprl_dir), "--port", str(port)]
    cmd += ["--device", "cpu", "--max-wait-ms", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        loopback.wait_ready(base, proc, timeout_s=300)  # generous: a busy 2-core CI machine
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROMPTS = ["What is 2 + 2?", "Name a prime number.", "Say hello."]
_HEADS, _TAILS = ["four", "4", "yes", "maybe", "two", "seven"], ["hello", "prime", "answer", "sure"]
POOL = [f"{a} {b}." for a in _HEADS for b in _TAILS]  # 24 candidate responses


class ExploitingRun:
    """A policy that exploits axis 0 from step 20 on, played with real scores.

    The pool is scored once (untagged) to rank its responses by ŝ_0 per prompt. Steps < 20 pick
    4 random responses per group (the baseline); later steps pick 2 from each end of the ranking,
    the ends narrowing every step, so axis 0's within-group spread grows as a policy pushing
    that axis would make it, and the drift controller corrects it.
    """

    def __init__(self, client: httpx.Client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        body = {"groups": [{"prompt": p, "responses": POOL} for p in PROMPTS]}
        groups = self._post(body)["groups"]
        self.ranked = [
            sorted(range(len(POOL)), key=lambda i, g=g: g["group_scores"][i][0]) for g in groups
        ]

    def _post(self, body: dict) -> dict:
        resp = self.client.post("/score", json=body, headers=AUTH, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def steps(self, steps: range) -> None:
        for step in steps:
            rng = random.Random(step)
            groups = []
            for prompt, ranked in zip(PROMPTS, self.ranked, strict=True):
                if step < 20:
                    picks = rng.sample(range(len(POOL)), 4)
                else:
                    end = max(2, 12 - (step - 20))
                    picks = rng.sample(ranked[:end], 2) + rng.sample(ranked[-end:], 2)
                groups.append({"prompt": prompt, "responses": [POOL[i] for i in picks]})
            self._post({"groups": groups, "run_id": self.run_id, "step": step})


@pytest.mark.slow
def test_dashboard_in_headless_chromium(live_server: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    chromium = _chromium()
    run_id = "demo-run"
    with httpx.Client(base_url=live_server) as client, sync_api.sync_playwright() as pw:
        run = ExploitingRun(client, run_id)
        run.steps(range(28))
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        elsewhere, failed, errors = [], [], []
        page.on("request", lambda r: r.url.startswith(live_server) or elsewhere.append(r.url))
        # 401s are expected until the key is entered; nothing else may fail.
        page.on("response", lambda r: r.status in (200, 401) or failed.append((r.status, r.url)))
        page.on("pageerror", lambda e: errors.append(str(e)))
        console_error = lambda m: m.type == "error" and "Failed to load resource" not in m.text  # noqa: E731
        page.on("console", lambda m: console_error(m) and errors.append(m.text))
        page.goto(f"{live_server}/dashboard?poll=0.5")

        # Without the key the telemetry reads are refused and the page says so.
        refused = "() => document.getElementById('status').textContent.includes('401')"
        page.wait_for_function(refused)
        page.fill("#key", KEY)
        page.click("#key-form button")
        # Function predicates only: Playwright evaluates a bare expression with eval, which the
        # page's CSP (script-src 'self') refuses.
        points = "([id, n]) => document.getElementById(id).dataset.points === String(n)"
        page.wait_for_function(points, arg=["chart-drift", 28])

        def value(selector: str) -> float:
            return float(page.get_attribute(selector, "data-value") or "nan")

        def drift() -> dict:
            params = {"run_id": run_id}
            return client.get("/telemetry/drift", params=params, headers=AUTH).json()

        assert page.locator(f'#runs button[data-run-id="{run_id}"]').count() == 1
        assert page.locator("#run .uplot canvas").count() == 6  # one canvas per uPlot chart
        served = drift()
        assert served["drift"][-1] is not None and value("#stat-drift") == served["drift"][-1]
        assert page.text_content("#stat-steps") == "28"

        # Live: the run goes on without a reload; its corrections and the load show up.
        run.steps(range(28, 36))
        page.wait_for_function(points, arg=["chart-drift", 36])
        served = drift()
        assert value("#stat-drift") == served["drift"][-1]
        assert value("#stat-threshold") == served["threshold"][-1]
        assert value("#stat-corrections") == served["corrections"][-1] > 0
        assert value("#stat-beta") == served["beta"][-1] > served["config"]["beta"]
        assert page.text_content("#stat-last-step") == "35"
        at_least = "([id, n]) => Number(document.getElementById(id).dataset.value) >= n"
        page.wait_for_function(at_least, arg=["load-total", 37])
        for tile in ("load-rps", "load-p50", "load-p99"):
            page.wait_for_function(at_least, arg=[tile, 1e-9])

        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        if os.environ.get("GPRL_DASHBOARD_SCREENSHOT"):  # regenerate docs/dashboard.png
            page.screenshot(path=os.environ["GPRL_DASHBOARD_SCREENSHOT"], full_page=True)

        # The page's own ?config= reaches the replay (the key stays in the tab's session).
        config = '{"threshold": 0.5, "noise_multiplier": 0}'
        page.goto(f"{live_server}/dashboard?poll=0.5&config={quote(config)}")
        equals = "([id, v]) => Number(document.getElementById(id).dataset.value) === v"
        page.wait_for_function(equals, arg=["stat-threshold", 0.5])
        params = {"run_id": run_id, "config": config}
        replay = client.get("/telemetry/drift", params=params, headers=AUTH).json()
        assert replay["threshold"][-1] == 0.5 and replay["config"]["threshold"] == 0.5
        browser.close()
    assert not elsewhere, f"the page reached beyond the service: {elsewhere}"
    assert not failed and not errors, (failed, errors)
