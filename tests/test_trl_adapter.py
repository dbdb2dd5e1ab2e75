"""TRL 1.16 GRPOTrainer with GPRL advantages: two real optimisation steps on CPU.

Policy: the tiny 2-layer Llama of tests/tinymodels.py (saved to disk: TRL builds the reference
model from the policy's path). Verifier: the tiny GPM served on loopback. The advantages TRL
trains on (read in `_compute_loss`, after its shuffle and split) must equal the pure
`gprl_advantages` of the same completions, re-scored independently through the service, with
the controller weights in force at that step; β and ε must be the controller's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import loopback
import pytest
import tinymodels
import torch

from gpm_server.app import create_app
from gpm_server.settings import Settings
from gprl_client.advantages import gprl_advantages
from gprl_client.client import GPMClient
from gprl_client.drift import DriftConfig

G = 4
PROMPTS = ["Explain why the sky is blue.", "Write a haiku about the sea.", "What is 2 + 2?"]


@pytest.fixture
def gpm_url(tmp_path: Path, tiny_gpm):
    app = create_app(Settings(telemetry_db=tmp_path / "t.sqlite3", max_wait_ms=1.0), tiny_gpm)
    with loopback.serve(app, ready=True) as url:
        yield url


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    tok = tinymodels.tiny_tokenizer()
    model = tinymodels.tiny_backbone(tok, seed=1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path / "policy"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_grpo_trainer_trains_on_gprl_advantages(gpm_url: str, policy_dir: Path, tmp_path: Path):
    from datasets import Dataset
    from trl import GRPOConfig

    from gprl_client.adapters.trl import GPRLGRPOTrainer
    from gprl_core.drift_loop import length_spread

    class Recording(GPRLGRPOTrainer):
        """Records what TRL hands on (before the shuffle) and what the loss sees (after)."""

        generations: ClassVar[list[dict[str, Any]]] = []
        trained: ClassVar[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

        def _generate_and_score_completions(self, inputs):
            weights = self.drift_loop.state.weights
            out = super()._generate_and_score_completions(inputs)
            record = {"prompts": [x["prompt"] for x in inputs], "weights": weights, "out": out}
            record["control"] = (self.beta, self.epsilon_low, self.epsilon_high)
            self.generations.append(record)
            return out

        def _compute_loss(self, model, inputs):
            self.trained.append(
                (inputs["prompt_ids"], inputs["completion_ids"], inputs["advantages"].clone())
            )
            assert (self.beta, self.epsilon_low) == self.generations[-1]["control"][:2]
            return super()._compute_loss(model, inputs)

    tok = tinymodels.tiny_tokenizer()
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS * 2]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2 * G,
        num_generations=G,
        max_completion_length=6,
        max_steps=2,
        beta=0.04,
        epsilon=0.2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        temperature=1.0,
    )
    # τ_D ≈ 0 and no growth condition: the controller must act within the two steps
    drift = DriftConfig(
        baseline_steps=1, threshold=1e-9, growth_threshold=0.0, beta_max=0.5, clip_eps_min=0.1
    )
    client = GPMClient(gpm_url)
    trainer = Recording(
        model=str(policy_dir),
        args=args,
        train_dataset=data,
        processing_class=tok,
        gpm_client=client,
        drift_config=drift,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.generations) == 2

    expected: dict[tuple[int, ...], float] = {}
    for record in trainer.generations:
        out = record["out"]
        texts = [
            tok.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(out["completion_ids"], out["completion_mask"], strict=True)
        ]
        prompts = record["prompts"]
        groups = [(prompts[i], texts[i : i + G]) for i in range(0, len(texts), G)]
        res = client.score(groups)  # independent re-scoring through the service
        pure = gprl_advantages(res.embeddings, res.eigenvalues, record["weights"]).advantages
        assert torch.allclose(out["advantages"], pure.reshape(-1).float(), atol=1e-5)
        for p, c, a in zip(out["prompt_ids"], out["completion_ids"], pure.reshape(-1), strict=True):
            expected[(*p.tolist(), -1, *c.tolist())] = float(a)
    assert max(abs(v) for v in expected.values()) > 0.1  # a real signal, not all-zero groups
    rows = 0
    for prompt_ids, completion_ids, advantages in trainer.trained:
        for p, c, a in zip(prompt_ids, completion_ids, advantages, strict=True):
            assert float(a) == pytest.approx(expected[(*p.tolist(), -1, *c.tolist())], abs=1e-5)
            rows += 1
    assert rows == 2 * 2 * G  # both steps, every row trained on

    # the controller ran once per generation batch and its β/ε are what TRL uses
    state = trainer.drift_loop.controller.state
    assert trainer.beta == pytest.approx(state.beta) and trainer.epsilon_low == state.clip_eps
    assert state.corrections >= 1 and trainer.beta > 0.04
    assert trainer.ref_model is not None
    assert (tmp_path / "out" / "gprl_drift" / "drift_report.json").exists()
    logged = [h for h in trainer.state.log_history if "gprl/beta" in h]
    assert logged and "gprl/D" in logged[-1] and "gprl/m_0" in logged[-1]
    # the within-group spread of completion lengths, per step, from what TRL trained on
    assert len(logged) == 2
    for record, entry in zip(trainer.generations, logged, strict=True):
        lengths = record["out"]["completion_mask"].sum(1).view(-1, G)
        want = length_spread(lengths)
        assert entry["gprl/length_group_std"] == pytest.approx(want["gprl/length_group_std"])
        assert entry["gprl/log_length_group_std"] == pytest.approx(
            want["gprl/log_length_group_std"]
        )


def test_length_spread_is_the_mean_population_std_per_group() -> None:
    import math
    import statistics

    from gprl_core.drift_loop import length_spread

    groups = [[10, 20, 30, 40], [100, 100, 100, 100], [3, 300, 7, 64]]
    got = length_spread(torch.tensor(groups))
    want = statistics.fmean(statistics.pstdev(g) for g in groups)
    assert got["gprl/length_group_std"] == pytest.approx(want)
    want_log = statistics.fmean(statistics.pstdev([math.log1p(n) for n in g]) for g in groups)
    assert got["gprl/log_length_group_std"] == pytest.approx(want_log)
    # doubling every length keeps the log spread (up to the +1) and doubles the token spread
    doubled = length_spread(torch.tensor([[200, 400], [1000, 2000]]))
    assert doubled["gprl/log_length_group_std"] == pytest.approx(math.log(2) / 2, rel=1e-2)


def test_trl_adapter_refuses_zero_beta(tmp_path: Path, policy_dir: Path):
    from trl import GRPOConfig

    from gprl_client.adapters.trl import GPRLGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), beta=0.0, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="beta > 0"):
        GPRLGRPOTrainer(model=str(policy_dir), args=args, gpm_client=None)


def test_gradient_checkpointing_changes_no_update(gpm_url: str, policy_dir: Path, tmp_path: Path):
    """`lm_compare --gradient-checkpointing` trades compute for memory only: the same seed gives
    the same completions, losses and weights with it as without."""
    import argparse

    from datasets import Dataset

    from benchmarks.lm_run import grpo_config
    from gprl_client.adapters.trl import GPRLGRPOTrainer

    tok = tinymodels.tiny_tokenizer()
    data = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:2] * 2]}
    )
    runs = []
    for checkpointing in (False, True):
        a = argparse.Namespace(
            prompts_per_step=2, generations=G, max_completion_length=6, steps=2, beta=0.04,
            learning_rate=1e-3, seed=0, device="cpu", gradient_checkpointing=checkpointing,
        )  # fmt: skip
        args = grpo_config(tmp_path / f"gc{checkpointing}", a, temperature=1.0)
        assert args.gradient_checkpointing is checkpointing
        trainer = GPRLGRPOTrainer(
            model=str(policy_dir),
            args=args,
            train_dataset=data,
            processing_class=tok,
            gpm_client=GPMClient(gpm_url),
        )
        trainer.train()
        assert trainer.model.is_gradient_checkpointing is checkpointing
        logs = [h for h in trainer.state.log_history if "loss" in h and "reward" in h]
        runs.append((logs, [p.detach().clone() for p in trainer.model.parameters()]))
    (logs_a, params_a), (logs_b, params_b) = runs
    assert len(logs_a) == len(logs_b) == 2
    for x, y in zip(logs_a, logs_b, strict=True):
        assert x["completions/mean_length"] == y["completions/mean_length"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params_a, params_b, strict=True))
