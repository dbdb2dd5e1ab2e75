"""The models benchmarked: `tiny` (the random 2-layer test model), `smollm2` (the default), and
randomly initialised Llamas of a given shape for speed on GPUs (`llama8b-random`: the
Llama-3.1-8B shape; `llama-small-random`: the same code path at a size a CPU test can run).

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
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"


# Llama-3.1-8B: hidden 4096, 32 layers, 32 heads (8 KV), MLP 14336, vocab 128256, RoPE θ 5e5.
LLAMA_SHAPES = {
    "llama8b-random": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-small-random": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        rope_theta=500000.0,
    ),
}
NAMES = ["tiny", "smollm2", *LLAMA_SHAPES]


def prepare(
    name: str, workdir: Path, max_length: int = 1024, device: str = "cpu", dtype: str = "bfloat16"
) -> str:
    """A checkpoint directory for model `name` (`device`/`dtype`: where random Llamas are built
    and in which dtype they are saved; the other models ignore them)."""
    if name in LLAMA_SHAPES:
        return _random_llama(name, workdir / name, max_length, device, dtype)
    if name == "tiny":
        out = _tinymodels().make_gprl_checkpoint(workdir / "tiny", max_length=max_length)
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
    raise ValueError(f"unknown model {name!r}: one of {', '.join(NAMES)}")


def _tinymodels():  # type: ignore[no-untyped-def]
    """The test suite's `tests/tinymodels.py` (imported by bare name, as the tests do)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module("tinymodels")


HEADS_K = 4  # subspaces of the random heads (speed does not depend on the head weights)


def _random_heads(hidden: int) -> dict[str, Any]:
    """Seeded random gated heads: `value_head.weight` [2K, H], `prompt_head.weight` [K, H]."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return {
        "value_head.weight": torch.randn(2 * HEADS_K, hidden, generator=gen) * 0.05,
        "prompt_head.weight": torch.randn(HEADS_K, hidden, generator=gen) * 0.05,
    }


def _random_llama(name: str, out: Path, max_length: int, device: str, dtype: str) -> str:
    """Random weights of a Llama shape, saved as a gprl checkpoint with the backbone inside.

    Speed does not depend on the weights. The tokenizer is the test suite's small byte-level
    BPE (ids stay below its few hundred tokens; the embedding table has the shape's rows), so
    the benchmark's texts still encode to the token counts it asks for.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpm_server.checkpoint import GPMConfig, parse_dtype, save_gprl_checkpoint

    tok = _tinymodels().tiny_tokenizer()
    shape = LLAMA_SHAPES[name]
    config = LlamaConfig(
        **{k: v for k, v in shape.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        max_position_embeddings=max(8192, max_length),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        backbone = LlamaForCausalLM._from_config(config, dtype=parse_dtype(dtype)).eval()
    heads = _random_heads(shape["hidden_size"])
    gpm_config = GPMConfig(k=HEADS_K, gated=True, max_length=max_length)
    path = save_gprl_checkpoint(out, heads, gpm_config, backbone=backbone, tokenizer=tok)
    del backbone
    return str(path)


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
    from gpm_server.checkpoint import GPMConfig, save_gprl_checkpoint

    heads = _random_heads(576)  # SmolLM2-135M hidden size
    config = GPMConfig(k=HEADS_K, gated=True, max_length=max_length, backbone="gguf:smollm2")
    return str(save_gprl_checkpoint(out, heads, config))
