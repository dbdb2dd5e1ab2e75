"""The built wheel installs into a trainer's environment without touching the trainer's torch.

Trainers (OpenRLHF, TRL, verl) pin their own torch, often a CUDA build; `pip install gprl[client]`
must keep it. The package asks for `torch>=2.6` (pyproject.toml says why) and this project's own
CPU pin lives in requirements/constraints-cpu.txt, not in the package metadata.

How, offline (no index at all: PIP_CONFIG_FILE=/dev/null, --no-index):

1. Our wheel is built from a copy of the sources (`pip wheel --no-build-isolation`).
2. A "trainer" venv T is made fresh. Its torch *distribution* is a metadata-only stand-in that
   says version 2.11.0 (verl 0.9.1's pin; anything but our 2.13.0 would do): no second real torch
   can be had offline here (PyPI's Linux torch is the CUDA build, several GB). The trainer's other
   packages, and the importable `torch` module, come from this project's venv through a `.pth`
   view that leaves out that venv's torch metadata, its gprl install, pip and setuptools.
3. `pip install --no-index --find-links <our wheel> "gprl[client]"`, then `"gprl[server]"`.

What it shows: pip's resolver accepts a torch version other than 2.13.0, installs gprl and
nothing else, writes no torch files, and the torch metadata still says 2.11.0 afterwards; a
negative control shows the same venv cannot satisfy `torch==2.13.0`, so a pin in our metadata
would make step 3 fail. Then `from gprl_client import GPMClient, gprl_advantages` works from
the installed wheel (advantages computed, one HTTP call through httpx), and so do the server's app
factory and `gpm-server --help`. What it does not show: that our code runs on torch 2.11's own
code; the module imported is the real torch 2.13.0 CPU build, under the stand-in's version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOREIGN_TORCH = "2.11.0"
# What the trainer venv must not see from this project's venv: its torch metadata (the stand-in
# replaces it), its own gprl install, and the packaging tools T brings itself.
_HIDDEN_PREFIXES = ("torch-", "gprl-", "__editable__", "pip", "setuptools", "_distutils_hack")
_HIDDEN_NAMES = {"__pycache__", "pkg_resources", "wheel"}

pytestmark = pytest.mark.timeout(900)


def _pip_env() -> dict[str, str]:
    """No pip configuration, no index, no user site, no PYTHONPATH: only what we hand over."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONNOUSERSITE": "1",
    }
    return env


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        cmd, cwd=cwd, env=_pip_env(), capture_output=True, text=True, timeout=600, check=False
    )
    if check:
        assert run.returncode == 0, f"{cmd} failed:\n{run.stdout}\n{run.stderr}"
    return run


def _standin_wheel(out: Path, name: str, version: str) -> Path:
    """A wheel holding only the metadata of `name==version` (no modules)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gprl-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built from a copy of the sources (an in-tree build would write build/ here)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("gpm_server", "gprl_client", "gprl_core"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], cwd=tmp)
    (wheel,) = dist.glob("gprl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    torch_reqs = [r for r in requires if r.replace(" ", "").startswith("torch")]
    assert torch_reqs and all("==" not in r for r in torch_reqs), torch_reqs
    return dist


@pytest.fixture(scope="module")
def trainer_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv whose torch says 2.11.0, with the trainer's other packages already there."""
    tmp = tmp_path_factory.mktemp("trainer")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
        ).stdout.strip()
    )
    view = tmp / "deps-view"
    view.mkdir()
    ours = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for directory in ours:
        for entry in directory.iterdir():
            hidden = entry.name.startswith(_HIDDEN_PREFIXES) or entry.name in _HIDDEN_NAMES
            if hidden or entry.suffix == ".pth" or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    (site / "trainer_deps.pth").write_text(f"{view}\n")
    standin = _standin_wheel(tmp, "torch", FOREIGN_TORCH)
    _run([python, "-m", "pip", "install", "-q", standin], cwd=tmp)
    return venv


def _install(venv: Path, wheelhouse: Path, requirement: str) -> set[str]:
    """pip install from our wheel only; returns the names pip installed (from its report)."""
    report = venv.parent / "report.json"
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--find-links", wheelhouse]
    run = _run([*pip, "--report", report, requirement], cwd=venv.parent)
    assert "Uninstalling torch" not in run.stdout
    return {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}


def _torch_state(venv: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as md, json, sysconfig, torch; "
        "print(json.dumps({'dist': md.version('torch'), 'module': torch.__file__, "
        "'site': sysconfig.get_paths()['purelib']}))"
    )
    return json.loads(_run([venv / "bin" / "python", "-c", code], cwd=venv.parent).stdout)


_CLIENT_CHECK = """
import json, httpx, torch, gprl_client
from gprl_client import GPMClient, gprl_advantages

g = torch.Generator().manual_seed(0)
adv = gprl_advantages(torch.randn(2, 4, 6, generator=g), torch.rand(2, 3, generator=g))
answer = httpx.MockTransport(lambda r: httpx.Response(200, json={"k": 3, "path": r.url.path}))
with GPMClient("http://gpm.test", transport=answer) as client:
    info = client.info()
print(json.dumps({"file": gprl_client.__file__, "shape": list(adv.advantages.shape),
                  "finite": bool(torch.isfinite(adv.advantages).all()), "info": info}))
"""

_SERVER_CHECK = """
import json, gpm_server
from gpm_server.app import create_app
from gpm_server.settings import Settings

app = create_app(Settings())
print(json.dumps({"file": gpm_server.__file__, "routes": sorted(app.openapi()["paths"])}))
"""


@pytest.mark.slow
def test_client_and_server_extras_install_beside_another_torch(
    wheelhouse: Path, trainer_venv: Path
) -> None:
    python = trainer_venv / "bin" / "python"
    before = _torch_state(trainer_venv)
    assert before["dist"] == FOREIGN_TORCH
    # Negative control: nothing here can satisfy a pin on our CPU version, so the installs below
    # succeed only because our metadata accepts the torch the venv already has.
    pinned = _run(
        [python, "-m", "pip", "install", "--dry-run", "--find-links", wheelhouse, "torch==2.13.0"],
        cwd=trainer_venv.parent,
        check=False,
    )
    assert pinned.returncode != 0
    assert "No matching distribution found for torch==2.13.0" in pinned.stderr

    assert _install(trainer_venv, wheelhouse, "gprl[client]") == {"gprl"}
    assert _torch_state(trainer_venv) == before, "pip changed the trainer's torch"
    assert not (Path(before["site"]) / "torch").exists(), "pip wrote torch files into the venv"
    out = json.loads(_run([python, "-c", _CLIENT_CHECK], cwd=trainer_venv.parent).stdout)
    assert out["file"].startswith(before["site"]), "imported gprl_client is not the wheel's"
    assert out["shape"] == [2, 4] and out["finite"]
    assert out["info"] == {"k": 3, "path": "/info"}

    assert _install(trainer_venv, wheelhouse, "gprl[server]") == set()
    assert _torch_state(trainer_venv) == before
    out = json.loads(_run([python, "-c", _SERVER_CHECK], cwd=trainer_venv.parent).stdout)
    assert out["file"].startswith(before["site"])
    assert {"/score", "/compare", "/ready", "/metrics"} <= set(out["routes"])
    help_text = _run([trainer_venv / "bin" / "gpm-server", "--help"], cwd=trainer_venv.parent)
    assert "serve" in help_text.stdout
