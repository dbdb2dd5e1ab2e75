"""The models benchmarked: `tiny` (the random 2-layer test model) and `smollm2` (the default).

`prepare(name, workdir)` returns a checkpoint path that both `GPM.from_pretrained` and
`gpm-server serve --model` accept:
- tiny: `tests/tinymodels.make_gprl_checkpoint` (the test suite's own builder, reused here);
- smollm2: the embedded default model's heads and backbone when this build ships them, else
  random heads over the `gguf:smollm2` backbone (speed does not depend on the head weights);
  either way a checkpoint in `workdir` with `max_length` raised to the benchmark's (the default
  model serves 256 tokens, which would cut the 640-token group sequences to their prompts).
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
            path = Path(module.default_model_path())
            detect_format(str(path))  # shipped and complete?
        except (ImportError, AttributeError, ValueError, OSError):
            return _smollm2_random_heads(workdir / "smollm2", max_length)
        return _with_max_length(path, workdir / "smollm2", max_length)
    raise ValueError(f"unknown model {name!r}: tiny or smollm2")


def _with_max_length(src: Path, out: Path, max_length: int) -> str:
    """A copy of the gprl checkpoint `src` (config and head files) serving `max_length` tokens."""
    import json
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.safetensors"):
        shutil.copy2(f, out / f.name)
    config = json.loads((src / "gpm_config.json").read_text())
    spec = config["backbone"]
    if spec == ".":
        raise ValueError(f"{src} embeds its backbone; copy it whole instead")
    if not spec.startswith("gguf:") and not Path(spec).is_absolute() and (src / spec).is_dir():
        config["backbone"] = str((src / spec).resolve())  # relative to the original directory
    config["max_length"] = max_length
    (out / "gpm_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(out)


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
