"""The models benchmarked: `tiny` (the random 2-layer test model) and `smollm2` (the default).

`prepare(name, workdir)` returns a checkpoint path that both `GPM.from_pretrained` and
`gpm-server serve --model` accept:
- tiny: `tests/tinymodels.make_gprl_checkpoint` (the test suite's own builder, reused here);
- smollm2: the embedded default model's directory when this build ships one, else a `gprl`
  checkpoint in `workdir` over the `gguf:smollm2` backbone with random heads (speed does not
  depend on the head weights).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def prepare(name: str, workdir: Path, max_length: int = 1024) -> str:
    if name == "tiny":
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        tinymodels = importlib.import_module("tinymodels")
        out = tinymodels.make_gprl_checkpoint(workdir / "tiny", max_length=max_length)
        return str(out)
    if name == "smollm2":
        from gpm_server.checkpoint import detect_format

        try:
            module = importlib.import_module("gpm_server.default_model")
            path = str(module.default_model_path())
            detect_format(path)  # shipped and complete?
            return path
        except (ImportError, AttributeError, ValueError, OSError):
            return _smollm2_random_heads(workdir / "smollm2", max_length)
    raise ValueError(f"unknown model {name!r}: tiny or smollm2")


def _smollm2_random_heads(out: Path, max_length: int) -> str:
    import torch

    from gpm_server.checkpoint import GPMConfig, save_gprl_checkpoint

    k, hidden = 4, 576  # SmolLM2-135M hidden size
    gen = torch.Generator().manual_seed(0)
    heads = {
        "value_head.weight": torch.randn(2 * k, hidden, generator=gen) * 0.05,
        "prompt_head.weight": torch.randn(k, hidden, generator=gen) * 0.05,
    }
    config = GPMConfig(k=k, gated=True, max_length=max_length, backbone="gguf:smollm2")
    return str(save_gprl_checkpoint(out, heads, config))
