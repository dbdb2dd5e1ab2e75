"""`make compose-smoke` (scripts/compose_smoke.py), offline: the podman override file changes only
what the local engine needs, and the smoke's verdict names every failed target.

The real run (image build, containers) is too slow for `make test`; docs/deployment.md has it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_deploy import COMPOSE, _compose_command

ROOT = Path(__file__).resolve().parents[1]
OVERRIDE = ROOT / "docker" / "compose.podman.yaml"
# What the override may change, per service; anything else must come from docker/compose.yaml.
OVERRIDDEN = {"image", "pull_policy", "ports"}


def _render(tmp_path: Path, *files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd, base_env = _compose_command(Path(tempfile.mkdtemp(dir=tmp_path)))
    args = [x for f in files for x in ("-f", str(f))]
    run = subprocess.run(
        [*cmd, *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**base_env, **(env or {})},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_override_changes_only_image_and_loopback_port(tmp_path: Path) -> None:
    env = {"GPM_PUBLISH_PORT": "18123", "GPRL_IMAGE": "localhost/gprl:test"}
    base = _render(tmp_path, COMPOSE, env=env)
    merged = _render(tmp_path, COMPOSE, OVERRIDE, env=env)
    assert set(merged["services"]) == set(base["services"])
    for name, service in merged["services"].items():
        assert service["image"] == "localhost/gprl:test"
        assert service["pull_policy"] == "never", "no registry: never try to pull"
        rest = {k: v for k, v in service.items() if k not in OVERRIDDEN}
        expected = {k: v for k, v in base["services"][name].items() if k not in OVERRIDDEN}
        assert rest == expected, f"{name}: the override changed more than {OVERRIDDEN}"
    (port,) = merged["services"]["gpm"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "18123", 8000)
    assert merged["volumes"] == base["volumes"]


def test_compose_runs_hardened_like_kubernetes(tmp_path: Path) -> None:
    services = _render(tmp_path, COMPOSE)["services"]
    for name in ("gpm", "learner"):
        assert services[name]["read_only"] is True, f"{name}: root filesystem must be read-only"
        assert "/tmp" in services[name]["tmpfs"], f"{name}: needs a writable /tmp"


@pytest.fixture()
def smoke_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.delitem(sys.modules, "compose_smoke", raising=False)
    import compose_smoke

    return compose_smoke


def _passing_summary() -> dict[str, Any]:
    return {
        "run": {
            "learner_exit_code": 0,
            "gpm_exit_code_after_stop": 0,
            "down_exit_code": 0,
            "left_after_down": {"volumes": 0},
        },
        "service_checks": {
            "health": "healthy",
            "ready": 200,
            "score_shapes_ok": True,
            "metrics_ready_gauge": True,
            "metrics_scored": 3.0,
            "uid_in_container": "10001",
            "read_only_rootfs": True,
        },
        "report_checks": {
            "steps_ok": True,
            "telemetry_every_step": True,
            "failed_groups": 0,
            "png": True,
        },
    }


def test_verdict_names_each_failed_target(smoke_module: Any) -> None:
    assert smoke_module.verdict(_passing_summary()) == []
    cases = [
        (("run", "learner_exit_code", 1), "learner exited 0"),
        (("service_checks", "health", "starting"), "service healthy"),
        (("service_checks", "uid_in_container", "0"), "service runs as uid 10001"),
        (("report_checks", "telemetry_every_step", False), "monitor fed by service telemetry"),
        (("run", "left_after_down", {"volumes": 1}), "teardown left nothing"),
    ]
    for (section, key, value), target in cases:
        summary = copy.deepcopy(_passing_summary())
        summary[section][key] = value
        assert smoke_module.verdict(summary) == [target]
    assert "learner exited 0" in smoke_module.verdict({}), "a run that never started fails"
