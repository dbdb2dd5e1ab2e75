"""Reward adapters against a live service on loopback: OpenRLHF's `.py` reward_func (also loaded
by OpenRLHF's own SingleTurnAgentExecutor) and verl's compute_score (called directly; verl is not
installed). Expected values come from the backend and the shared GPM math, not from the route."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import fakes
import loopback
import pytest
import torch

from gpm_server.app import create_app
from gpm_server.settings import Settings
from gprl_client import gpm_math
from gprl_client.adapters import openrlhf_reward_func, verl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "openrlhf_reward_func.py"
QUESTION = "Why is the sky blue?"
PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
ANSWERS = ["Rayleigh scattering.", "Blue light scatters the most.", "It reflects the sea.", "Dunno"]


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    backend = fakes.FakeBackend(k=2)
    app = create_app(Settings(telemetry_db=tmp_path / "t.sqlite3", max_wait_ms=1.0), backend)
    with loopback.serve(app, ready=True) as url:
        monkeypatch.setenv("GPRL_GPM_URL", url)
        openrlhf_reward_func.reset()
        verl.reset()
        yield backend
        openrlhf_reward_func.reset()
        verl.reset()


def _embed(backend: fakes.FakeBackend, prompt: str, responses: list[str]):
    out = backend.forward(
        backend.encode([([{"role": "user", "content": prompt}], r) for r in responses])
    )
    return out.embeddings, out.eigenvalues


def test_reward_func_matches_backend(service):
    backend = service
    label = json.dumps({"reference": ANSWERS[2]})
    got = openrlhf_reward_func.reward_func([PROMPT + ANSWERS[0] + "<|im_end|>"], [PROMPT], [label])
    emb, eig = _embed(backend, QUESTION, [ANSWERS[0], ANSWERS[2]])
    logit = float(gpm_math.preference_score(emb[0], emb[1], eig[0])) / backend.info.tau
    assert got["rewards"] == pytest.approx(logit, rel=1e-5)
    assert got["extra_logs"]["gpm_emb_3"] == pytest.approx(float(emb[0, 3]), abs=1e-6)
    batch = openrlhf_reward_func.reward_func(
        [PROMPT + a for a in ANSWERS[:2]], [PROMPT] * 2, [None, None]
    )
    assert batch["rewards"] == [0.0, 0.0] and batch["extra_logs"]["gpm_has_reference"] == [0, 0]


def test_openrlhf_executor_loads_example_file(service, openrlhf_cpu):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(str(EXAMPLE))  # OpenRLHF imports the file itself
    label = json.dumps({"reference": ANSWERS[1]})
    [got] = asyncio.run(executor._fetch_rewards_via_func([PROMPT + ANSWERS[0]], [PROMPT], [label]))
    emb, eig = _embed(service, QUESTION, [ANSWERS[0], ANSWERS[1]])
    logit = float(gpm_math.preference_score(emb[0], emb[1], eig[0])) / service.info.tau
    assert isinstance(got["rewards"], float) and got["rewards"] == pytest.approx(logit, rel=1e-5)


def test_reward_func_raises_when_service_is_down(monkeypatch):
    monkeypatch.setenv("GPRL_GPM_URL", loopback.dead_url())
    monkeypatch.setattr(openrlhf_reward_func.time, "sleep", lambda s: None)
    openrlhf_reward_func.reset()
    with pytest.raises(RuntimeError, match="unavailable"):
        openrlhf_reward_func.reward_func([PROMPT + "x"], [PROMPT], [None], retries=1)
    openrlhf_reward_func.reset()


def test_verl_single_form(service):
    got = verl.compute_score("ultrafeedback", ANSWERS[0], ANSWERS[3], {"prompt": QUESTION})
    emb, eig = _embed(service, QUESTION, [ANSWERS[0], ANSWERS[3]])
    s = float(gpm_math.preference_score(emb[0], emb[1], eig[0]))
    assert got["score"] == pytest.approx(s / service.info.tau, rel=1e-5)
    assert got["gpm_prob"] == pytest.approx(
        1 / (1 + torch.exp(torch.tensor(-s / service.info.tau)).item())
    )
    assert verl.compute_score("x", ANSWERS[0], None, {"prompt": QUESTION}) == {
        "score": 0.0,
        "gpm_has_reference": 0.0,
    }
    with pytest.raises(ValueError, match="prompt"):
        verl.compute_score("x", ANSWERS[0], "ref", {})


def test_verl_batch_form_groups_by_prompt(service):
    other = "Write a haiku."
    prompts = [QUESTION, other, QUESTION, other, QUESTION]
    sols = [ANSWERS[0], ANSWERS[1], ANSWERS[2], ANSWERS[3], ANSWERS[1]]
    truths = [None, None, None, None, ANSWERS[3]]
    got = verl.compute_score(["d"] * 5, sols, truths, [{"prompt": p} for p in prompts])
    # prompt QUESTION, no reference: rows 0 and 2 form a group; `other`: rows 1 and 3
    for rows, prompt in (([0, 2], QUESTION), ([1, 3], other)):
        emb, eig = _embed(service, prompt, [sols[i] for i in rows])
        expected = gpm_math.group_scores(emb[None])[0] @ eig[0] / service.info.tau
        for j, i in enumerate(rows):  # slow reference: ŝ(i) = mean over the other j of s(i ≻ j)
            s = gpm_math.preference_score(emb[j], emb[1 - j], eig[0]) / service.info.tau
            assert float(expected[j]) == pytest.approx(float(s), rel=1e-5)
            assert got[i]["score"] == pytest.approx(float(expected[j]), rel=1e-5)
            assert got[i]["gpm_has_reference"] == 0.0
    emb, eig = _embed(service, QUESTION, [sols[4], ANSWERS[3]])
    s = float(gpm_math.preference_score(emb[0], emb[1], eig[0]))
    assert got[4]["score"] == pytest.approx(s / service.info.tau, rel=1e-5)
