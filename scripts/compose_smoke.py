"""`make compose-smoke`: `docker compose up` for real, with podman, on a machine without Docker.

    python scripts/compose_smoke.py [--steps 4] [--port 18000] [--timeout 3600] [--no-cache]

1. installs podman and what it needs from Debian's packages if missing (scripts/podman_engine.py);
2. makes the base image locally (no registry is reachable): Debian + python3 + venv;
3. builds docker/Dockerfile with that base (`--network host`, so pip reaches PyPI);
4. runs Docker Compose v2 against `podman system service`'s Docker API (DOCKER_HOST) with the
   real docker/compose.yaml plus docker/compose.podman.yaml (local image name, loopback port);
5. waits for the demo learner to exit, checks its drift report, and the service's /ready, /score
   and /metrics from the host; checks the container's user, health and read-only root;
6. tears everything down (containers, network, volume) and checks nothing is left;
7. writes a JSON summary (default benchmarks/results/compose_smoke.json); exits 1 if a check failed.

Every step runs against one overall deadline. Traffic: loopback, plus the package registries
during the install and the build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import podman_engine as engine

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker" / "compose.yaml", ROOT / "docker" / "compose.podman.yaml"]
DEMO_OUT = ROOT / "docker" / "demo-out"
BASE_IMAGE = "localhost/gprl-base:bookworm"
IMAGE = "localhost/gprl:cpu"
PROJECT = "gprl-smoke"
SCORE_BODY = {
    "groups": [
        {
            "prompt": "What is the capital of France?",
            "responses": ["The capital of France is Paris.", "London.", "Paris."],
            "id": "q1",
        }
    ],
    "return_matrix": True,
}


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop waiting, but still tear down and write the summary."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("compose smoke ran out of time")
        return left if cap is None else min(left, cap)


def http(port: int, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def build(env: dict[str, str], args: argparse.Namespace, dl: Deadline) -> dict[str, Any]:
    find_links = args.wheels if args.wheels and any(args.wheels.glob("torch-*+cpu*.whl")) else None
    info: dict[str, Any] = {"base_image": BASE_IMAGE, "torch_wheel_dir": str(find_links or "")}
    t0 = time.monotonic()
    if args.no_cache or not engine.image_exists(BASE_IMAGE, env):
        engine.make_base_image(BASE_IMAGE, args.work, env, find_links, dl.left())
        info["base_image_s"] = round(time.monotonic() - t0, 1)
    info["base_image_bytes"] = engine.image_size(BASE_IMAGE, env)
    cmd = [
        "podman", "build", "--network", "host", "-f", "docker/Dockerfile",
        "--ignorefile", "docker/Dockerfile.dockerignore", "-t", IMAGE,
        # podman's default, the OCI format, has no HEALTHCHECK: it would drop the image's check.
        "--format", "docker",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        # podman 4.3 does not see through `FROM base-${VARIANT}` when it skips unused stages,
        # so every stage is built, and the CUDA stage must not pull a CUDA base from a registry.
        "--skip-unused-stages=false", "--build-arg", f"CUDA_IMAGE={BASE_IMAGE}",
    ]  # fmt: skip
    if find_links is not None:
        # The host's CPU torch wheel (the base image points pip at it); PyPI for the rest.
        cmd += ["-v", f"{find_links}:{find_links}:ro"]
        cmd += ["--build-arg", "TORCH_INDEX_URL_CPU=https://pypi.org/simple"]
    if args.no_cache:
        cmd.append("--no-cache")
    t1 = time.monotonic()
    log = args.work / "build.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [*cmd, "."], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=dl.left()
        )
    if proc.returncode != 0:
        raise RuntimeError(f"podman build exited {proc.returncode}; see {log}")
    info["image_build_s"] = round(time.monotonic() - t1, 1)
    info["image_bytes"] = engine.image_size(IMAGE, env)
    info["cached_layers"] = log.read_text().count("Using cache")
    return info


def inspect(name: str, env: dict[str, str], fmt: str) -> str:
    return engine.run(["podman", "inspect", name, "--format", fmt], 60, env).strip()


def up_and_wait(
    compose: list[str], env: dict[str, str], port: int, dl: Deadline, log_dir: Path
) -> dict[str, Any]:
    """`compose up -d`; meanwhile run the service's health check, time /ready from the host."""
    gpm = f"{PROJECT}-gpm-1"
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    up_log = log_dir / "compose-up.log"
    with up_log.open("w") as f:
        up = subprocess.Popen(
            [*compose, "up", "-d", "--no-build"], env=env, stdout=f, stderr=subprocess.STDOUT
        )
    last_check = 0.0
    while up.poll() is None:
        dl.left()
        if "ready_s" not in out and http(port, "/ready")[0] == 200:
            out["ready_s"] = round(time.monotonic() - t0, 1)
        # No systemd here, so podman schedules no health checks: run the image's check ourselves
        # at the compose file's interval; compose reads the result through the API.
        if time.monotonic() - last_check >= 10:
            last_check = time.monotonic()
            subprocess.run(["podman", "healthcheck", "run", gpm], env=env, capture_output=True)
        time.sleep(1)
    out["compose_up_s"] = round(time.monotonic() - t0, 1)
    # A slow health-check round can hide the first 200: then compose's own wait is the bound.
    if "ready_s" not in out and http(port, "/ready")[0] == 200:
        out["ready_s_at_most"] = out["compose_up_s"]
    if up.returncode != 0:
        raise RuntimeError(f"compose up exited {up.returncode}:\n{up_log.read_text()[-3000:]}")
    learner = f"{PROJECT}-learner-1"
    while inspect(learner, env, "{{.State.Status}}") not in ("exited", "stopped"):
        dl.left()
        time.sleep(5)
    out["learner_s"] = round(time.monotonic() - t0, 1)
    out["learner_exit_code"] = int(inspect(learner, env, "{{.State.ExitCode}}"))
    return out


def check_report(steps: int) -> dict[str, Any]:
    report = json.loads((DEMO_OUT / "drift_report.json").read_text())
    history = report["steps"]
    return {
        "steps": len(history),
        "steps_ok": len(history) == steps,
        "telemetry_every_step": all(s["monitor_source"] == "telemetry" for s in history),
        "failed_groups": sum(s["failed_groups"] for s in history),
        "client": report["client"],
        "service": report["service"],
        "final_drift": history[-1]["drift"] if history else None,
        "png": (DEMO_OUT / "drift_report.png").is_file(),
    }


def check_service(port: int, env: dict[str, str]) -> dict[str, Any]:
    checks: dict[str, Any] = {"ready": http(port, "/ready")[0]}
    status, body = http(port, "/score", SCORE_BODY)
    checks["score_status"] = status
    if status == 200:
        group = json.loads(body)["groups"][0]
        k = json.loads(body)["k"]
        checks["score"] = {"k": k, "rewards": group["rewards"]}
        checks["score_shapes_ok"] = (
            len(group["eigenvalues"]) == k
            and len(group["embeddings"]) == 3
            and all(len(v) == 2 * k for v in group["embeddings"])
            and len(group["matrix"]) == 3
        )
    status, body = http(port, "/metrics")
    lines = body.decode(errors="replace").splitlines()
    checks["metrics_status"] = status
    checks["metrics_ready_gauge"] = "gpm_ready 1.0" in lines
    checks["metrics_scored"] = sum(
        float(line.split()[-1]) for line in lines if line.startswith("gpm_responses_scored_total")
    )
    gpm = f"{PROJECT}-gpm-1"
    checks["health"] = inspect(gpm, env, "{{.State.Health.Status}}")
    checks["user"] = inspect(gpm, env, "{{.Config.User}}")
    checks["uid_in_container"] = engine.run(["podman", "exec", gpm, "id", "-u"], 60, env).strip()
    checks["read_only_rootfs"] = inspect(gpm, env, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    return checks


def teardown(compose: list[str], env: dict[str, str], log: Path, out: dict[str, Any]) -> None:
    """`compose stop` (SIGTERM: the service drains and exits 0), save the logs, `compose down`."""
    t0 = time.monotonic()
    subprocess.run([*compose, "stop", "--timeout", "60"], env=env, capture_output=True, timeout=300)
    out["stop_s"] = round(time.monotonic() - t0, 1)
    # A container that was never created raises; the failure that got us here is recorded.
    with contextlib.suppress(RuntimeError):
        out["gpm_exit_code_after_stop"] = int(
            inspect(f"{PROJECT}-gpm-1", env, "{{.State.ExitCode}}")
        )
    logs = subprocess.run(
        [*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, timeout=120
    )
    log.write_text(logs.stdout + logs.stderr)
    t0 = time.monotonic()
    down = subprocess.run(
        [*compose, "down", "--volumes", "--remove-orphans", "--timeout", "60"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        kind: engine.run(["podman", *cmd, "-q", "--filter", label], 60, env).split()
        for kind, cmd in (("containers", ["ps", "-a"]), ("volumes", ["volume", "ls"]),
                          ("networks", ["network", "ls"]))
    }  # fmt: skip
    out["down_exit_code"] = down.returncode
    out["down_s"] = round(time.monotonic() - t0, 1)
    out["left_after_down"] = {k: len(v) for k, v in left.items()}


def smoke(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    dl = Deadline(args.timeout)
    args.work.mkdir(parents=True, exist_ok=True)
    summary["installed_packages"] = engine.install_engine(dl.left())
    env = engine.engine_env(args.work)
    summary["engine"] = engine.run(["podman", "--version"], 60, env).strip()
    summary["build"] = build(env, args, dl)
    compose = engine.compose_binary()
    summary["compose"] = engine.run([*compose, "version"], 60, env).strip()
    service = engine.start_api_service(args.work, env, dl.left(60))
    run: dict[str, Any] = {}
    summary["run"] = run
    compose_env = {
        **env,
        "DOCKER_HOST": f"unix://{args.work / 'podman.sock'}",
        "GPRL_IMAGE": IMAGE,
        "GPM_PUBLISH_PORT": str(args.port),
        "GPRL_DEMO_STEPS": str(args.steps),
        # The documented way to run the learner: as the caller's uid, so the report is theirs.
        "GPRL_UID": str(os.getuid()),
        "GPRL_GID": str(os.getgid()),
    }
    compose = [*compose, "-p", PROJECT, *(x for f in COMPOSE_FILES for x in ("-f", str(f)))]
    try:
        for stale in DEMO_OUT.glob("drift_report.*"):
            stale.unlink()
        run.update(up_and_wait(compose, compose_env, args.port, dl, args.work))
        summary["service_checks"] = check_service(args.port, compose_env)
        summary["report_checks"] = check_report(args.steps)
    finally:
        teardown(compose, compose_env, args.work / "compose.log", run)
        service.terminate()
        service.wait(timeout=60)


def verdict(summary: dict[str, Any]) -> list[str]:
    """The targets of `make compose-smoke`; each failed one by name."""
    run, svc, rep = summary.get("run", {}), summary.get("service_checks", {}), {}
    rep = summary.get("report_checks", rep)
    targets = {
        "learner exited 0": run.get("learner_exit_code") == 0,
        "service healthy": svc.get("health") == "healthy",
        "/ready 200 from the host": svc.get("ready") == 200,
        "/score 200 with the right shapes": svc.get("score_shapes_ok") is True,
        "/metrics: gpm_ready 1 and scored responses": svc.get("metrics_ready_gauge") is True
        and svc.get("metrics_scored", 0) > 0,
        "service runs as uid 10001": svc.get("uid_in_container") == "10001",
        "read-only root filesystem": svc.get("read_only_rootfs") is True,
        "report has every step": rep.get("steps_ok") is True,
        "monitor fed by service telemetry": rep.get("telemetry_every_step") is True,
        "no failed groups": rep.get("failed_groups") == 0,
        "report plot written": rep.get("png") is True,
        "service exited 0 on SIGTERM (drained)": run.get("gpm_exit_code_after_stop") == 0,
        "teardown left nothing": run.get("down_exit_code") == 0
        and not any(run.get("left_after_down", {"?": 1}).values()),
    }
    summary["checks"] = targets
    return [name for name, ok in targets.items() if not ok]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="demo learner steps (GPRL_DEMO_STEPS)")
    p.add_argument("--port", type=int, default=18000, help="published on 127.0.0.1")
    p.add_argument("--timeout", type=float, default=3600, help="for everything (s)")
    p.add_argument("--no-cache", action="store_true", help="rebuild base and image from scratch")
    p.add_argument("--wheels", type=Path, default=Path("/opt/wheels"), help="a CPU torch wheel")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "compose-smoke")
    p.add_argument("--summary", type=Path, default=ROOT / "benchmarks/results/compose_smoke.json")
    args = p.parse_args()
    args.work = args.work.resolve()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    summary: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "machine": platform.machine()}}
    t0 = time.monotonic()
    try:
        smoke(args, summary)
    except (
        RuntimeError,
        TimeoutError,
        subprocess.TimeoutExpired,
        OSError,
        KeyError,
        Interrupted,
    ) as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
    summary["total_s"] = round(time.monotonic() - t0, 1)
    failed = verdict(summary)
    summary["passed"] = not failed and "error" not in summary
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"passed": summary["passed"], "failed": failed, **summary}, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
