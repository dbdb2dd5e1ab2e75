"""examples/demo_learner.py (the compose file's learner) against the real app with a fake backend.

Two replicas on loopback, each with its own telemetry database: the learner must merge their
telemetry to feed the drift monitor (round-robin sends each step's scores to one replica only).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import fakes
import loopback

ROOT = Path(__file__).resolve().parents[1]


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_learner", ROOT / "examples/demo_learner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _app(tmp_path: Path, name: str):
    from gpm_server.app import create_app
    from gpm_server.settings import Settings

    settings = Settings(telemetry_db=tmp_path / f"{name}.sqlite3", max_wait_ms=1.0)
    return create_app(settings, model=fakes.FakeBackend(k=3))


def _telemetry(url: str, run_id: str) -> dict:
    import httpx

    response = httpx.get(f"{url}/telemetry", params={"run_id": run_id}, timeout=30)
    response.raise_for_status()
    return response.json()


def test_demo_learner_writes_a_drift_report_from_merged_telemetry(tmp_path: Path) -> None:
    demo = _demo_module()
    out = tmp_path / "out"
    steps, baseline = 6, 2
    with (
        loopback.serve(_app(tmp_path, "a")) as url_a,
        loopback.serve(_app(tmp_path, "b")) as url_b,
    ):
        argv = ["--url", url_a, "--url", url_b, "--steps", str(steps), "--group-size", "4"]
        argv += ["--baseline-steps", str(baseline), "--wait-ready", "60", "--out", str(out)]
        assert demo.main([*argv, "--run-id", "merge-test"]) == 0
        per_replica = [
            {st["step"] for st in _telemetry(url, "merge-test")["steps"]} for url in (url_a, url_b)
        ]
    # each replica saw only part of the run: only the merge has every step
    assert all(0 < len(seen) < steps for seen in per_replica)
    assert per_replica[0] | per_replica[1] == set(range(steps))

    report = json.loads((out / "drift_report.json").read_text())
    assert report["urls"] == [url_a, url_b]
    assert report["service"]["k"] == 3
    assert [s["step"] for s in report["steps"]] == list(range(steps))
    for s in report["steps"]:
        assert s["failed_groups"] == 0
        assert s["monitor_source"] == "telemetry"  # every step found in the merged telemetry
        assert len(s["weights"]) == len(s["alpha"]) == 3
        assert math.isclose(sum(s["alpha"]), 1.0, rel_tol=1e-9)
        assert math.isclose(sum(s["weights"]) / 3, 1.0, rel_tol=1e-6)  # mean(m) = 1
        # D(t) is undefined until the baseline is in, defined and >= 0 after
        if s["step"] < baseline - 1:
            assert s["drift"] is None and s["threshold"] is None and not s["correction"]
        else:
            assert s["drift"] is not None and s["drift"] >= 0
            if s["correction"]:  # the controller acts only above its threshold
                assert s["drift"] > s["threshold"]
    for table in report["final_policy"].values():
        assert math.isclose(sum(table.values()), 1.0, abs_tol=1e-3)
    png = out / "drift_report.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppo_update_moves_probability_toward_positive_advantages() -> None:
    torch = pytest.importorskip("torch")
    demo = _demo_module()
    policy = demo.ToyPolicy(num_prompts=1, num_candidates=3)
    actions = torch.tensor([[0, 1, 2, 0]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    kl = policy.ppo_update(actions, advantages, lr=0.5, epochs=1, clip_eps=0.2, beta=0.0)
    probs = policy.probs()[0]
    assert probs[0] > 1 / 3 > probs[1]
    assert math.isclose(float(probs[1]), float(probs[2]), rel_tol=1e-6)
    # KL(π‖π_ref) from the explicit sum over candidates (π_ref uniform)
    ref = sum(float(p) * math.log(float(p) * 3) for p in probs)
    assert math.isclose(kl, ref, rel_tol=1e-5)


def test_clip_stops_the_update_once_the_ratio_leaves_the_trust_region() -> None:
    torch = pytest.importorskip("torch")
    demo = _demo_module()
    actions = torch.tensor([[0, 0, 1, 2]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    probs = []
    for clip in (0.01, 10.0):
        policy = demo.ToyPolicy(num_prompts=1, num_candidates=3)
        policy.ppo_update(actions, advantages, lr=2.0, epochs=5, clip_eps=clip, beta=0.0)
        probs.append(float(policy.probs()[0, 0]))
    # a tight clip freezes the gradient after the first epoch; a loose one keeps pushing
    assert probs[0] < probs[1]


def test_replica_urls_lists_one_url_per_resolved_address() -> None:
    demo = _demo_module()
    assert demo.replica_urls("127.0.0.1:8000") == ["http://127.0.0.1:8000"]
    assert demo.replica_urls("::1:8000") == ["http://[::1]:8000"]
    with pytest.raises(ValueError):
        demo.replica_urls("no-port")
