"""vLLM offline pooling of the same token sequences, run in its own virtualenv.

vLLM pins its own torch/transformers, so it never goes into the project venv: `make vllm-venv`
builds `.venv-vllm` (scripts/vllm_venv.sh). `make bench` uses `$GPRL_VLLM_PYTHON` (default
`.venv-vllm/bin/python` in the repository) and, when it exists, runs
`benchmarks/vllm_pooling.py` there on the backbone's Hugging Face directory with the
pre-tokenised sequences. Otherwise the result records why it was skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpm_server.protocol import EncodedSequence

DEFAULT_PYTHON = str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")
SCRIPT = Path(__file__).with_name("vllm_pooling.py")


def backbone_dir(model_path: str) -> Path | None:
    """The Hugging Face directory of a checkpoint's backbone (what vLLM loads)."""
    config = json.loads((Path(model_path) / "gpm_config.json").read_text())
    spec = config.get("backbone", ".")
    if spec == ".":
        return Path(model_path)
    if spec.startswith("gguf:"):
        from gpm_server import gguf_backbone

        d = gguf_backbone.default_cache_root() / gguf_backbone.GGUF_SPECS[spec]["cache_name"]
        return d if d.is_dir() else None
    d = Path(spec) if Path(spec).is_absolute() else Path(model_path) / spec
    return d if d.is_dir() else None


def run(
    model_path: str,
    group_seqs: Sequence[EncodedSequence],
    single_seqs: Sequence[EncodedSequence],
    workdir: Path,
    timeout_s: float = 900.0,
    threads: int | None = None,
) -> dict[str, Any]:
    python = os.environ.get("GPRL_VLLM_PYTHON", DEFAULT_PYTHON)
    if not Path(python).exists():
        return {"skipped": f"no vLLM venv at {python} (`make vllm-venv`, docs/performance.md)"}
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        return {"skipped": f"vllm is not installed in {python} (see docs/performance.md)"}
    model_dir = backbone_dir(model_path)
    if model_dir is None:
        return {"skipped": f"no Hugging Face backbone directory for {model_path}"}
    data = workdir / "vllm_input.json"
    data.write_text(
        json.dumps(
            {
                "groups": [list(s.input_ids) for s in group_seqs],
                "single": [list(s.input_ids) for s in single_seqs],
            }
        )
    )
    out = workdir / "vllm_output.json"
    cmd = [python, str(SCRIPT), "--model", str(model_dir), "--input", str(data)]
    cmd += ["--output", str(out)]
    env = dict(os.environ)
    if threads:  # the same CPU threads as the other baselines (vLLM binds its OpenMP threads)
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"vLLM run timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"skipped": f"vLLM run failed (exit {proc.returncode})", "log_tail": tail}
    return json.loads(out.read_text())
