"""The dependency direction of the three packages, checked for real:

    gpm_server ──► gprl_core ◄── gprl_client        (gprl_core: stdlib + torch + numpy only)

- no module of `gpm_server` imports `gprl_client`;
- `gprl_core` imports neither of them, nor anything outside the standard library, torch and
  numpy (the service, every trainer and the learner's Ray workers all load it).

Two independent checks: each package is imported module by module (`pkgutil.walk_packages`) in a
fresh interpreter whose meta-path finder refuses the forbidden packages, so an import hidden in
a re-export or a package `__init__` is caught; and a static scan of every `import` statement,
including those inside functions, which the runtime check cannot see.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_DEPS = ("torch", "numpy")  # third-party packages gprl_core may import
# Optional extras gprl_core may import *inside a function* only, behind `except ImportError`:
# the drift report's PNG (gprl_core.drift_loop.plot_history; JSON only without matplotlib).
CORE_LAZY_OPTIONAL = ("matplotlib",)

# Runs in a fresh interpreter: argv = root, package, mode ("only" or "never"), names. "only":
# the package may import the standard library, itself and `names` (imported first, with their own
# dependencies); "never": it may import anything but `names`. Every refused import is recorded
# (a caller could swallow the ImportError) and makes the probe fail.
PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

root, package, mode, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
sys.path.insert(0, root)
if mode == "only":
    for dep in names:
        importlib.import_module(dep)
    allowed = set(sys.stdlib_module_names) | set(names) | {package}

    def refused(top):
        return top not in allowed
else:
    def refused(top):
        return top in names

attempts = []
before = set(sys.modules)  # the interpreter's own and the allowed dependencies' modules


class Gate(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if refused(name.partition(".")[0]):
            attempts.append(name)
            raise ImportError(f"{package} must not import {name} (tests/test_package_boundaries)")
        return None


def reraise(name):
    raise  # walk_packages calls this inside its `except`: re-raise what the import raised


sys.meta_path.insert(0, Gate())
imported = [importlib.import_module(package).__name__]
for info in pkgutil.walk_packages(sys.modules[package].__path__, package + ".", onerror=reraise):
    imported.append(importlib.import_module(info.name).__name__)
loaded = sorted({m.partition(".")[0] for m in set(sys.modules) - before} - {package})
loaded = [top for top in loaded if refused(top)]
print(json.dumps({"imported": imported, "refused": attempts, "loaded": loaded}))
sys.exit(1 if attempts or loaded else 0)
"""


def probe(package: str, mode: str, names: tuple[str, ...], root: Path = ROOT) -> dict:
    """Import every module of `package` under the gate; the probe's report (fails on refusal)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(root), package, mode, ",".join(names)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    assert done.returncode == 0, f"{package}: {report or done.stderr[-3000:]}"
    return report


def test_gprl_core_imports_only_stdlib_torch_numpy() -> None:
    report = probe("gprl_core", "only", CORE_DEPS)
    assert {"gprl_core.gpm_math", "gprl_core.telemetry", "gprl_core.drift_loop"} <= set(
        report["imported"]
    )


def test_gpm_server_never_imports_gprl_client() -> None:
    report = probe("gpm_server", "never", ("gprl_client",))
    assert {"gpm_server.app", "gpm_server.telemetry_store", "gpm_server.training.heads"} <= set(
        report["imported"]
    )


def test_the_probe_refuses_a_forbidden_import(tmp_path: Path) -> None:
    """The gate is not vacuous: a package importing httpx from a submodule, behind a
    `try/except ImportError` even, fails the "only" probe."""
    pkg = tmp_path / "fakecore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("try:\n    import httpx\nexcept ImportError:\n    httpx = None\n")
    with pytest.raises(AssertionError, match="httpx"):
        probe("fakecore", "only", CORE_DEPS, root=tmp_path)


def imports_of(source: str) -> list[tuple[str, bool]]:
    """`(top-level package, inside a function)` of every absolute import in `source`."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.partition(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module.partition(".")[0], in_function))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or nested)

    visit(ast.parse(source), False)
    return found


def boundary_violations(package: str) -> list[str]:
    """Static scan: the imports of `package`'s files that break the direction above."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for top, in_function in imports_of(path.read_text()):
            if package == "gpm_server":
                ok = top != "gprl_client"
            else:
                ok = (
                    top in sys.stdlib_module_names
                    or top in (*CORE_DEPS, "gprl_core")
                    or (in_function and top in CORE_LAZY_OPTIONAL)
                )
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}: {top}")
    return bad


def test_the_static_scan_sees_imports_inside_functions() -> None:
    source = "import os\ndef f():\n    from gprl_client.drift import DriftConfig\n"
    assert imports_of(source) == [("os", False), ("gprl_client", True)]


@pytest.mark.parametrize("package", ["gpm_server", "gprl_core"])
def test_static_scan_of_the_boundary(package: str) -> None:
    assert (ROOT / package / "__init__.py").exists()
    assert boundary_violations(package) == []


SHIMS = ["gpm_math", "advantages", "telemetry", "drift", "drift_config", "drift_monitor"]
SHIMS += ["drift_controller"]


@pytest.mark.parametrize("name", SHIMS)
def test_old_gprl_client_paths_re_export_the_same_objects(name: str) -> None:
    """`from gprl_client.<name> import X` keeps working and gives gprl_core's very object; every
    public class and function of the gprl_core module is re-exported."""
    old = importlib.import_module(f"gprl_client.{name}")
    new = importlib.import_module(f"gprl_core.{name}")
    assert old.__all__ and all(getattr(old, n) is getattr(new, n) for n in old.__all__)
    public = {
        n
        for n, obj in vars(new).items()
        if not n.startswith("_") and getattr(obj, "__module__", None) == new.__name__
    }
    assert public <= set(old.__all__)


def test_openrlhf_drift_loop_path_keeps_the_loop_with_step() -> None:
    from gprl_client.gpm_math import preference_score
    from gprl_client.openrlhf.drift_loop import DriftLoop, GPRLState
    from gprl_core import drift_loop, gpm_math

    assert preference_score is gpm_math.preference_score
    assert GPRLState is drift_loop.GPRLState
    assert issubclass(DriftLoop, drift_loop.DriftLoop) and callable(DriftLoop.step)
