"""GPRL inside the real OpenRLHF 0.11.2 code (CPU; CUDA-only imports stubbed by `openrlhf_cpu`).

- OpenRLHF's own `SingleTurnAgentExecutor.execute` (tokenise, generate, decode the query with
  special tokens, POST to the reward URL) against the live service on loopback, and its
  `_process_response_into_experience`: rewards and extra_logs arrive as scalars per sample.
- OpenRLHF's `RemoteExperienceMaker` machinery through `GPRLExperienceMaker` with real
  `Experience` objects in shuffled micro-batches: advantages equal the pure `gprl_advantages`.
- The drift loop against fake actor groups holding OpenRLHF's real `PolicyLoss`.
- The launcher's refusals.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakes
import httpx
import loopback
import pytest
import tinymodels
import torch

from gpm_server.app import create_app
from gpm_server.settings import Settings
from gprl_client import gpm_math
from gprl_client.advantages import gprl_advantages
from gprl_client.drift import DriftConfig, DriftController, DriftMonitor

pytestmark = pytest.mark.usefixtures("openrlhf_cpu")

QUESTION = "Explain why the sky is blue in one short paragraph."
ANSWERS = ["The sky is blue because of Rayleigh scattering.", "Blue light scatters more.", "No."]


@pytest.fixture
def service(tmp_path: Path):
    backend = fakes.FakeBackend(k=2)
    app = create_app(Settings(telemetry_db=tmp_path / "t.sqlite3", max_wait_ms=1.0), backend)
    with loopback.serve(app, ready=True) as url:
        yield url, backend


class FakeEngine:
    """What SingleTurnAgentExecutor needs from vLLM: `await generate(ids, params)`."""

    def __init__(self, action_ids: list[int]) -> None:
        self.action_ids = action_ids

    async def generate(
        self, prompt_token_ids: list[int], params: Any, multi_modal_data: Any = None
    ):
        out = SimpleNamespace(
            token_ids=self.action_ids, text="", finish_reason="stop", logprobs=None
        )
        return SimpleNamespace(outputs=[out])


def _expected(backend: fakes.FakeBackend, response: str, reference: str | None):
    messages = [{"role": "user", "content": QUESTION}]
    pairs = [(messages, response)] + ([(messages, reference)] if reference else [])
    out = backend.forward(backend.encode(pairs))
    return out.embeddings, out.eigenvalues


@pytest.mark.parametrize("with_reference", [False, True])
def test_single_turn_executor_gets_scalar_rewards_and_gpm_logs(service, with_reference: bool):
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    url, backend = service
    tok = tinymodels.tiny_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    response = ANSWERS[0]
    action = tok(response, add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    reference = ANSWERS[1] if with_reference else None
    label = json.dumps({"reference": reference}) if with_reference else ""
    executor = SingleTurnAgentExecutor(url + "/openrlhf/reward")
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    out = asyncio.run(executor.execute(prompt, label, params, 256, tok, FakeEngine(action)))

    emb, eig = _expected(backend, response, reference)
    assert isinstance(out["reward"], float) and isinstance(out["scores"], float)
    logs = out["extra_logs"]
    assert [logs[f"gpm_emb_{d}"] for d in range(4)] == pytest.approx(emb[0].tolist(), abs=1e-6)
    assert [logs[f"gpm_eig_{k}"] for k in range(2)] == pytest.approx(eig[0].tolist(), abs=1e-6)
    assert logs["gpm_has_reference"] == float(with_reference)
    if with_reference:
        logit = float(gpm_math.preference_score(emb[0], emb[1], eig[0])) / backend.info.tau
        assert out["reward"] == pytest.approx(logit, rel=1e-5)
        assert out["scores"] == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-5)
    else:
        assert out["reward"] == 0.0 and out["scores"] == 0.0

    exp = SamplesGenerator._process_response_into_experience(None, out, max_len=256)
    assert exp.rewards.shape == (1,) and exp.info["reward"].shape == (1,)
    assert exp.info["gpm_emb_0"].shape == (1,)
    assert exp.info["gpm_emb_0"].item() == pytest.approx(emb[0, 0].item(), abs=1e-6)


def test_reward_route_lists_for_batches_and_422s(service):
    url, backend = service
    prompt = f"<s><|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    body = {
        "query": [prompt + a + "<|im_end|></s>" for a in ANSWERS],
        "prompts": [prompt] * 3,
        "labels": [None, json.dumps({"reference": ANSWERS[2]}), "not json"],
    }
    got = httpx.post(url + "/get_reward", json=body).json()
    assert len(got["rewards"]) == 3 and got["extra_logs"]["gpm_has_reference"] == [0.0, 1.0, 0.0]
    for i, answer in enumerate(ANSWERS):
        emb, _ = _expected(backend, answer, None)
        assert got["extra_logs"]["gpm_emb_1"][i] == pytest.approx(emb[0, 1].item(), abs=1e-6)
    no_prompts = httpx.post(url + "/openrlhf/reward", json={"query": body["query"][:1]}).json()
    emb, _ = _expected(backend, ANSWERS[0], None)
    assert no_prompts["extra_logs"]["gpm_emb_0"] == pytest.approx(emb[0, 0].item(), abs=1e-6)
    bad = httpx.post(url + "/openrlhf/reward", json={**body, "prompts": [prompt]})
    assert bad.status_code == 422
    strict = httpx.post(url + "/openrlhf/reward?require_reference=true", json=body)
    assert strict.status_code == 422 and "reference" in strict.text


def test_prompt_and_response_recovery_rules():
    from gpm_server.routes_openrlhf import (
        extract_response,
        parse_label,
        parse_prompt,
        prompt_from_query,
    )

    llama = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert parse_prompt(llama) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    gemma = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert parse_prompt(gemma) == [{"role": "user", "content": "Hi"}]
    assert parse_prompt("Plain text?") == [{"role": "user", "content": "Plain text?"}]
    ends = ["<|eot_id|>", "</s>"]
    assert extract_response(llama + " Hello! <|eot_id|>", llama, ends) == "Hello!"
    # left-truncated prompt in the query: found by the prompt's tail
    assert extract_response(llama[40:] + "Yo</s>", llama, ends) == "Yo"
    with pytest.raises(ValueError):
        extract_response("something else", llama, ends)
    assert prompt_from_query(llama + "Hey<|eot_id|>") == llama
    assert prompt_from_query("no markup") == ""
    assert parse_label('{"reference": "r"}') == {"reference": "r"}
    assert parse_label("r") == {} and parse_label(None) == {}


# --- the experience maker ---------------------------------------------------------------------


def _args(n: int, use_loss: bool) -> SimpleNamespace:
    return SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=(-10.0, 10.0)),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator="group_norm", gamma=1.0),
            kl=SimpleNamespace(use_loss=use_loss),
        ),
    )


def _experiences(emb: torch.Tensor, eig: torch.Tensor, use_loss: bool, seed: int):
    """One Experience per response with OpenRLHF's info columns, shuffled into micro-batches."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    n, g, d = emb.shape
    gen = torch.Generator().manual_seed(seed)
    singles = []
    for i in range(n * g):
        length = int(torch.randint(2, 7, (1,), generator=gen))
        mask = torch.zeros(1, 8, dtype=torch.bool)
        mask[0, 1 : 1 + length] = True
        kl = torch.zeros(1, 8) if use_loss else torch.rand(1, 8, generator=gen) * mask
        info = {f"gpm_emb_{j}": emb[i // g, i % g, j].reshape(1).float() for j in range(d)}
        info.update({f"gpm_eig_{k}": eig[i // g, k].reshape(1).float() for k in range(d // 2)})
        info["reward"] = torch.zeros(1)
        singles.append(
            Experience(
                sequences=torch.arange(9).unsqueeze(0),
                action_mask=mask,
                kl=kl,
                rewards=torch.zeros(1),
                index=[i],
                info=info,
            )
        )
    order = list(range(n * g))
    random.Random(seed).shuffle(order)
    batches = [order[j : j + 3] for j in range(0, len(order), 3)]
    return [Experience.concat_experiences([singles[i] for i in b], 0) for b in batches], singles


def _maker(n: int, use_loss: bool, beta: float):
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from gprl_client.openrlhf.experience_maker import GPRLExperienceMaker, GPRLState

    strategy = SimpleNamespace(args=_args(n, use_loss))
    state = GPRLState()
    maker = GPRLExperienceMaker(
        None, None, None, None, FixedKLController(beta), strategy, None, gprl_state=state
    )
    return maker, state


@pytest.mark.parametrize("use_loss", [True, False])
def test_experience_maker_advantages_equal_pure_function(use_loss: bool):
    n, g, k = 3, 4, 2
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(n, g, 2 * k, generator=gen)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    eig = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)
    beta = 0.05
    maker, state = _maker(g, use_loss, beta)
    state.weights = torch.tensor([1.2, 0.8])
    batches, singles = _experiences(emb, eig, use_loss, seed=3)
    kls = {s.index[0]: s.kl[0].clone() for s in singles}
    out = maker.compute_advantages_and_returns(batches)

    pure = gprl_advantages(emb.float(), eig.float(), state.weights).advantages  # (N, G)
    for exp in out:
        assert not any(key.startswith(("gpm_emb_", "gpm_eig_")) for key in exp.info)
        for b, i in enumerate(exp.index):
            mask = exp.action_mask[b]
            a_i = float(pure[i // g, i % g])
            last = int(mask.nonzero().max())
            for t in range(mask.shape[0]):  # slow reference: reward-to-go with γ = 1
                if not mask[t]:
                    continue
                kl_term = 0.0 if use_loss else -beta * float(kls[i][t : last + 1].sum())
                assert float(exp.advantages[b, t]) == pytest.approx(a_i + kl_term, abs=1e-5)
            assert float(exp.info["gprl_advantage"][b]) == pytest.approx(a_i, abs=1e-5)
    assert torch.allclose(state.last.advantages.float(), pure, atol=1e-6)
    # the groups' lengths, in rollout order, reach the drift loop's log
    lengths = torch.tensor([float(s.action_mask.sum()) for s in singles]).view(n, g)
    assert torch.equal(state.last_lengths, lengths.double())
    from gprl_core.drift_loop import DriftLoop, length_spread

    _, status = DriftLoop(state, DriftConfig()).update(1)
    assert status["gprl/length_group_std"] == length_spread(lengths)["gprl/length_group_std"]


def test_experience_maker_unscored_micro_batch_gets_zero():
    n, g, k = 2, 3, 1
    emb = torch.randn(n, g, 2 * k, generator=torch.Generator().manual_seed(5))
    eig = torch.ones(n, k)
    maker, _ = _maker(g, True, 0.01)
    batches, _ = _experiences(emb, eig, True, seed=0)
    for key in [k for k in batches[0].info if k.startswith("gpm_")]:
        del batches[0].info[key]  # that micro-batch's reward calls failed
    out = maker.compute_advantages_and_returns(batches)
    missing = set(batches[0].index)
    nan_emb = emb.clone().reshape(-1, 2 * k)
    nan_emb[list(missing)] = math.nan
    pure = gprl_advantages(nan_emb.reshape(n, g, 2 * k), eig).advantages.reshape(-1)
    for exp in out:
        for b, i in enumerate(exp.index):
            assert float(exp.info["gprl_advantage"][b]) == pytest.approx(float(pure[i]), abs=1e-6)
            if i in missing:
                assert float(exp.advantages[b].abs().max()) == 0.0


def test_experience_maker_missing_eigenvalues_only_is_unscored():
    """A micro-batch with its embedding columns but not its eigenvalue columns: its samples are
    unscored (advantage 0, counted), and nothing of them reaches their groups' statistics. The
    old code wrote their embeddings first and then scored their groups with λ = 1/K."""
    n, g, k = 2, 3, 2
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(n, g, 2 * k, generator=gen)
    eig = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)
    maker, state = _maker(g, True, 0.01)
    batches, _ = _experiences(emb, eig, True, seed=2)
    for key in [k for k in batches[0].info if k.startswith("gpm_eig_")]:
        del batches[0].info[key]
    missing = set(batches[0].index)
    out = maker.compute_advantages_and_returns(batches)
    nan_emb = emb.clone().reshape(-1, 2 * k)
    nan_emb[list(missing)] = math.nan
    pure = gprl_advantages(nan_emb.reshape(n, g, 2 * k), eig).advantages.reshape(-1)
    assert state.unscored_samples == len(missing)
    assert not bool(state.last.valid.reshape(-1)[list(missing)].any())
    for exp in out:
        for b, i in enumerate(exp.index):
            assert float(exp.info["gprl_advantage"][b]) == pytest.approx(float(pure[i]), abs=1e-6)
            assert float(exp.info["gprl_scored"][b]) == float(i not in missing)
            if i in missing:
                assert float(exp.advantages[b].abs().max()) == 0.0


def test_group_without_any_eigenvalues_is_never_scored():
    """Every sample of group 0 lost its eigenvalues: the group gets no λ = 1/K stand-in, its
    advantages are all 0, and group 1 is scored exactly as on its own."""
    from gprl_client.openrlhf.experience_maker import rebuild_groups

    n, g, k = 2, 3, 2
    gen = torch.Generator().manual_seed(8)
    emb = torch.randn(n, g, 2 * k, generator=gen)
    eig = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)
    _, singles = _experiences(emb, eig, True, seed=0)
    for s in singles[:g]:
        for key in [k for k in s.info if k.startswith("gpm_eig_")]:
            del s.info[key]
    e, lam, unscored = rebuild_groups(singles, g)
    assert unscored == g
    assert bool(torch.isnan(lam[0]).all()) and bool(torch.isnan(e[0]).all())
    res = gprl_advantages(e, lam)
    assert float(res.advantages[0].abs().max()) == 0.0
    alone = gprl_advantages(emb[1:].double(), eig[1:].double()).advantages
    assert torch.allclose(res.advantages[1], alone[0], atol=1e-6)


# --- the drift loop and the trainer ----------------------------------------------------------


class FakeActorHandle:
    """A Ray actor handle's `__ray_call__.remote(fn, *args)` → `fn(actor, *args)`."""

    def __init__(self, actor: Any) -> None:
        self.__ray_call__ = SimpleNamespace(remote=lambda fn, *a, **kw: fn(actor, *a, **kw))


class FakeActorGroup:
    def __init__(self, n: int = 2) -> None:
        from openrlhf.models import PolicyLoss

        self.actors = [
            SimpleNamespace(trainer=SimpleNamespace(actor_loss_fn=PolicyLoss(0.2, 0.28)))
            for _ in range(n)
        ]
        self._actor_handlers = [FakeActorHandle(a) for a in self.actors]
        self.fit_calls: list[dict[str, Any]] = []

    def async_run_method(self, method_name: str, **kwargs: Any) -> list[dict[str, float]]:
        assert method_name == "fit"
        self.fit_calls.append(kwargs)
        return [{"policy_loss": 0.0}]


def _step_data(step: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced axes for the first steps, then axis 0 dominates (single-axis exploitation)."""
    gen = torch.Generator().manual_seed(100 + step)
    emb = torch.randn(4, 6, 2 * k, generator=gen)
    if step >= 3:
        emb[..., 0:2] *= 6.0
    return emb, torch.full((4, k), 1.0 / k)


def test_drift_loop_sets_beta_and_clip_where_openrlhf_reads_them(tmp_path: Path):
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from gprl_client.openrlhf.drift_loop import DriftLoop
    from gprl_client.openrlhf.experience_maker import GPRLState

    config = DriftConfig(baseline_steps=2, threshold=0.01, ema_rate=0.5, beta=0.01, clip_eps=0.2)
    loop = DriftLoop(GPRLState(), config, clip_high_ratio=0.28 / 0.2)
    monitor, controller = DriftMonitor(3, config), DriftController(3, config)
    kl_ctl, group = FixedKLController(0.01), FakeActorGroup()
    active = False
    for step in range(8):
        emb, eig = _step_data(step)
        weights = loop.state.weights
        loop.state.last = gprl_advantages(emb, eig, weights)
        status = loop.step(kl_ctl, group, step)
        expected = controller.update(monitor.update(loop.state.last.mean_axis_variance))
        active |= expected.active
        assert kl_ctl.value == pytest.approx(expected.beta)
        for actor in group.actors:
            loss = actor.trainer.actor_loss_fn
            assert loss.clip_eps_low == pytest.approx(expected.clip_eps)
            assert loss.clip_eps_high == pytest.approx(expected.clip_eps * 0.28 / 0.2)
        assert loop.state.weights.tolist() == pytest.approx(list(expected.weights))
        assert status["gprl/beta"] == pytest.approx(expected.beta)
        assert {"gprl/D", "gprl/m_0", "gprl/alpha_0", "gprl/clip_eps"} <= set(status)
    assert active and kl_ctl.value > 0.01  # the drift was detected and corrected
    path = loop.write_report(tmp_path)
    report = json.loads(path.read_text())
    assert len(report["history"]) == 8 and report["controller"]["k"] == 3
    assert (tmp_path / "drift_report.png").exists()


def test_trainer_ppo_train_applies_controller_before_fit(tmp_path: Path, monkeypatch):
    import ray
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    # OpenRLHF's ppo_train waits on the fake group's plain results: no Ray cluster in tests.
    monkeypatch.setattr(ray, "get", lambda refs: refs)

    from gprl_client.openrlhf.trainer import GPRLPPOTrainerImpl, drift_loop_from

    args = SimpleNamespace(
        actor=SimpleNamespace(eps_clip=0.2, eps_clip_low_high=(0.2, 0.2)),
        algo=SimpleNamespace(kl=SimpleNamespace(init_coef=0.02)),
        critic=SimpleNamespace(freezing_steps=-1),
        ds=SimpleNamespace(enable_sleep=False),
        ckpt=SimpleNamespace(output_dir=str(tmp_path)),
    )
    options = {"drift": {"baseline_steps": 1, "threshold": 1e-6}}
    trainer = GPRLPPOTrainerImpl.__new__(GPRLPPOTrainerImpl)  # no tokenizer/datasets/Ray
    trainer.args, trainer.gprl_options = args, options
    trainer.kl_ctl, trainer.actor_model_group = FixedKLController(0.02), FakeActorGroup(1)
    trainer.critic_model_group = None
    trainer.drift_loop = drift_loop_from(args, options)
    for step in (1, 2, 3, 4):
        trainer.drift_loop.state.last = gprl_advantages(*_step_data(step))
        status = trainer.ppo_train(step)
        assert trainer.actor_model_group.fit_calls[-1]["kl_ctl"] == trainer.kl_ctl.value
        assert status["gprl/beta"] == trainer.kl_ctl.value and "policy_loss" in status
    assert trainer.kl_ctl.value > 0.02  # corrections raised β from --algo.kl.init_coef
    saved = trainer.drift_loop.state_dict()
    resumed = drift_loop_from(args, options)
    resumed.load_state_dict(json.loads(json.dumps(saved)))  # through JSON, like a checkpoint
    assert resumed.controller.state == trainer.drift_loop.controller.state
    assert resumed.state.weights.tolist() == trainer.drift_loop.state.weights.tolist()
    assert json.loads((tmp_path / "gprl_drift" / "drift_report.json").read_text())["history"]


# --- the launcher ------------------------------------------------------------------------------

GOOD = [
    "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0.01",
    "--rollout.n_samples_per_prompt", "8", "--reward.remote_url", "http://gpm:8000/openrlhf/reward",
    "--algo.kl.use_loss",
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--algo.advantage.estimator", "gae"], "estimator"),
        (["--algo.kl.init_coef", "0"], "init_coef"),
        (["--rollout.n_samples_per_prompt", "1"], "n_samples_per_prompt"),
        (["--algo.kl.target", "0.1"], "adaptive"),
        (["--train.async_enable"], "async"),
        (["--algo.dynamic_filtering_enable"], "dynamic_filtering"),
        (["--reward.overlong_buffer_len", "512"], "overlong"),
    ],
)
def test_launcher_refuses_incompatible_settings(change, needle, capsys, monkeypatch):
    from gprl_client import cli
    from gprl_client.openrlhf import launcher

    monkeypatch.setattr(launcher.runpy, "run_module", lambda *a, **k: pytest.fail("ran"))
    assert cli.main(["train", "--no-ray-init", "--", *GOOD, *change]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and needle in err


def test_launcher_refuses_kl_in_reward(capsys, monkeypatch):
    """Without --algo.kl.use_loss OpenRLHF puts −β·KL in the token rewards, computed with the β
    of the step before the controller's update: refused, with the flag to pass."""
    from gprl_client import cli
    from gprl_client.openrlhf import launcher

    monkeypatch.setattr(launcher.runpy, "run_module", lambda *a, **k: pytest.fail("ran"))
    without = [t for t in GOOD if t != "--algo.kl.use_loss"]
    assert launcher.check_openrlhf_args(GOOD) == []
    assert cli.main(["train", "--no-ray-init", "--", *without]) == 2
    err = capsys.readouterr().err
    assert "--algo.kl.use_loss is not set" in err and "one step late" in err


def test_launcher_swaps_trainer_and_passes_args_through(monkeypatch):
    from openrlhf.trainer import ppo_trainer

    from gprl_client import cli
    from gprl_client.openrlhf import launcher
    from gprl_client.openrlhf.trainer import GPRLTrainerFactory

    seen = {}

    def fake_run(module: str, run_name: str, alter_sys: bool) -> None:
        seen.update(module=module, argv=list(sys.argv), trainer=ppo_trainer.PPOTrainer)

    monkeypatch.setattr(launcher.runpy, "run_module", fake_run)
    monkeypatch.setattr(ppo_trainer, "PPOTrainer", ppo_trainer.PPOTrainer)  # restored after
    monkeypatch.setattr(sys, "argv", ["gprl"])
    argv = ["train", "--no-ray-init", "--drift.threshold", "0.05", "--", *GOOD, "--x.y", "1"]
    assert cli.main(argv) == 0
    assert seen["module"] == "openrlhf.cli.train_ppo_ray"
    assert seen["argv"][1:] == [*GOOD, "--x.y", "1"]
    assert isinstance(seen["trainer"], GPRLTrainerFactory)
    assert seen["trainer"].gprl_options["drift"] == {"threshold": 0.05}


@pytest.mark.slow
def test_real_ray_ships_package_and_sets_clip_through_ray_call():
    """A real local Ray: `init_ray` ships gprl_client (py_modules) and the drift loop's
    `__ray_call__` reaches a live actor's loss object."""
    import ray

    from gprl_client.openrlhf import launcher
    from gprl_client.openrlhf.drift_loop import DriftLoop
    from gprl_client.openrlhf.experience_maker import GPRLState

    @ray.remote(num_cpus=0)
    class PolicyActor:
        def __init__(self) -> None:
            loss = SimpleNamespace(clip_eps_low=0.2, clip_eps_high=0.2)
            self.trainer = SimpleNamespace(actor_loss_fn=loss)

        def clips(self) -> tuple[float, float]:
            loss = self.trainer.actor_loss_fn
            return loss.clip_eps_low, loss.clip_eps_high

    if ray.is_initialized():  # init_ray must start its own, with the runtime env
        ray.shutdown()
    launcher.init_ray()
    try:
        assert ray.get_runtime_context().runtime_env.get("py_modules")
        group = SimpleNamespace(_actor_handlers=[PolicyActor.remote() for _ in range(2)])
        config = DriftConfig(baseline_steps=1, threshold=1e-9, clip_eps=0.2)
        loop = DriftLoop(GPRLState(), config, clip_high_ratio=1.5)
        kl_ctl = SimpleNamespace(value=0.01)
        for step in (0, 1, 2, 3, 4):
            loop.state.last = gprl_advantages(*_step_data(step))
            loop.step(kl_ctl, group, step)
        eps = loop.controller.clip_eps
        assert eps < 0.2  # corrected
        for handle in group._actor_handlers:
            assert ray.get(handle.clips.remote()) == pytest.approx((eps, 1.5 * eps))
    finally:
        ray.shutdown()


def test_guide_command_uses_only_real_flags():
    """Every flag of the guide's command exists: OpenRLHF's in train_ppo_ray's parser source,
    GPRL's in `gprl train`'s parser; and the command passes the launcher's checks."""
    import importlib.util
    import re

    from gprl_client.openrlhf.launcher import check_openrlhf_args, gprl_parser, split_argv

    guide = (Path(__file__).resolve().parents[1] / "docs" / "openrlhf.md").read_text()
    command = guide.split("    gprl train", 1)[1].split("\n\n", 1)[0]
    tokens = ("gprl train" + command).replace("\\\n", " ").split()[2:]
    ours, theirs = split_argv(tokens)
    source = Path(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin).read_text()
    known = set(re.findall(r'"(--[a-z_.]+)"', source))
    for rest in re.findall(r'f"--\{prefix\}(\.[a-z_.]+)"', source):  # actor/critic optimiser flags
        known |= {f"--actor{rest}", f"--critic{rest}"}
    used = [t for t in theirs if t.startswith("--")]
    assert len(used) > 20 and not [f for f in used if f not in known]
    gprl_parser().parse_args(ours)
    assert check_openrlhf_args(theirs) == []
