"""Cyclic preferences A ≻ B ≻ C ≻ A across many prompts: a GPM learns them, a scalar reward
(Bradley-Terry) cannot get more than 2 of the 3 pairs of any prompt right.

Determinism: every fit here uses `val_frac=0` (the held-out set is the explicit test split, so
`train_heads` draws no validation split of its own) and a fixed seed. The split used to move
with the machine: `train_heads` split prompts by hashes of their float features,
whose last bits differ between CPU kernels (torch's float32 `randn` takes an AVX2 path or not, so
even the tiny backbone's weights differ by ~1e-9), and each machine got another split. About one
split in ten left the gated tiny-model GPM at 0.90 (n=20 splits: min 0.90, median 1.0), the
failure of issue 15. Now the split is fixed and the tests pass on both kernels
(`ATEN_CPU_CAPABILITY=default` and `avx2`), and the bars sit under the minimum measured over
other *init* seeds on both kernels (docstrings below).
"""

from __future__ import annotations

import pytest
import tinymodels
import torch

from gpm_server.evaluate import evaluate
from gpm_server.training.features import PairRecord, extract_features, feature_gpm, load_features
from gpm_server.training.heads import HeadConfig, train_heads

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

CYCLE = [(0, 1), (1, 2), (2, 0)]  # (winner, loser): A ≻ B, B ≻ C, C ≻ A


def _random_feature_set(n_prompts: int, seed: int, hidden: int = 16) -> dict:
    """Per prompt three responses: a fixed type direction (A, B, C) plus per-prompt noise."""
    gen = torch.Generator().manual_seed(seed)
    types = torch.randn(3, hidden, generator=torch.Generator().manual_seed(99))
    rows: dict[str, list] = {k: [] for k in ("h_chosen", "h_rejected", "h_prompt")}
    for _ in range(n_prompts):
        resp = types + 0.2 * torch.randn(3, hidden, generator=gen)
        prompt = torch.randn(hidden, generator=gen)
        for w, lose in CYCLE:
            rows["h_chosen"].append(resp[w])
            rows["h_rejected"].append(resp[lose])
            rows["h_prompt"].append(prompt)
    n = 3 * n_prompts
    feats = {k: torch.stack(v) for k, v in rows.items()}
    feats.update(
        p_chosen=torch.ones(n),
        chars_chosen=torch.ones(n, dtype=torch.long),
        chars_rejected=torch.ones(n, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        dataset=["cyclic"] * n,
    )
    return feats


def _rows(feats: dict, idx: list[int]) -> dict:
    return {
        k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in feats.items()
    }


def _per_prompt_max(logits: torch.Tensor) -> float:
    """The most pairs out of 3 that any prompt gets right (a sanity bound for BT)."""
    return float((logits.view(-1, 3) > 0).sum(1).max())


def _fit_and_score(train: dict, test: dict) -> dict[str, float]:
    out = {}
    for kind in ("gpm", "bt"):
        tau = 0.1 if kind == "gpm" else 1.0
        cfg = HeadConfig(kind=kind, k=2, gated=False, epochs=150, patience=150, lr=2e-2, tau=tau)
        cfg.progress, cfg.val_frac = False, 0.0
        res = train_heads(train, cfg)
        ev = evaluate(test, {kind: (kind, res.heads)}, tau=cfg.tau)
        out[kind] = ev["models"][kind]["by_dataset"]["all"]["accuracy"]
        if kind == "bt":
            z = (test["h_chosen"] - test["h_rejected"]) @ res.heads["reward_head.weight"].T
            assert _per_prompt_max(z[:, 0]) <= 2
    return out


def test_gpm_learns_a_cycle_bt_cannot_on_random_features() -> None:
    """Measured over init seeds 0–19 (n=20): GPM K=2 120/120 every time (min = median = 1.0).
    K=1 was a seed lottery: 120/120 for 16 of 20 seeds, 56–66/120 (stuck) for the other 4."""
    acc = _fit_and_score(_random_feature_set(80, seed=1), _random_feature_set(40, seed=2))
    assert acc["gpm"] >= 0.95
    assert acc["bt"] <= 2 / 3 + 1e-9


@pytest.mark.parametrize("gated", [False, True])
def test_gpm_learns_a_cycle_on_tiny_model_features(tmp_path, gated: bool) -> None:
    """90 prompts, every 3rd held out (90 test pairs). Measured over init seeds 0–11 on both
    kernels (n=24 fits each): gated min = median = 90/90; ungated min 89/90, median 90/90.
    With 60 prompts (the old size) ungated was min 57/60, right on the 0.95 bar."""
    model, tok, _ = tinymodels.tiny_parts()
    gpm = feature_gpm(model, tok, max_length=48, model_id="tiny")
    answers = ["The quick brown fox.", "Write a haiku about the sea.", "Numbers 0 1 2 are digits."]
    words = ["fox", "sea", "sky", "books", "haiku", "digits", "dog", "salt", "blue", "quick"]
    pairs = [
        PairRecord(
            [{"role": "user", "content": f"{words[i % 10]} {words[i // 10]} {i}"}],
            answers[w],
            answers[lose],
            1.0,
            "cyclic",
            3 * i + j,
        )
        for i in range(90)
        for j, (w, lose) in enumerate(CYCLE)
    ]
    out = extract_features(gpm, pairs, tmp_path, source="cyclic", chunk=60, progress=False)
    feats = load_features(out, [p.index for p in pairs])
    prompt = torch.arange(len(pairs)) // 3
    train = _rows(feats, (prompt % 3 != 0).nonzero()[:, 0].tolist())  # held-out: every 3rd prompt
    test = _rows(feats, (prompt % 3 == 0).nonzero()[:, 0].tolist())
    cfg = {"epochs": 400, "patience": 400, "lr": 5e-2, "weight_decay": 0.0, "val_frac": 0.0}
    cfg["progress"] = False
    res = train_heads(train, HeadConfig(k=3, gated=gated, **cfg))
    gpm_acc = evaluate(test, {"g": ("gpm", res.heads)})["models"]["g"]["by_dataset"]["all"]
    bt = train_heads(train, HeadConfig(kind="bt", tau=1.0, **cfg))
    bt_acc = evaluate(test, {"b": ("bt", bt.heads)})["models"]["b"]["by_dataset"]["all"]
    assert gpm_acc["accuracy"] >= 0.95
    assert bt_acc["accuracy"] <= 2 / 3 + 1e-9
