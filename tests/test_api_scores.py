"""/score and /compare on the tiny real GPM against explicit double loops over gprl-math.md.

The double loops read embeddings and eigenvalues from the response and recompute everything
from the formulas (s_l(i, j) = a_l(i) b_l(j) − b_l(i) a_l(j), ŝ_l(i) = 1/(G−1) Σ_{j≠i} s_l(i, j),
reward = Σ_l λ_l ŝ_l / τ, P = sigmoid(Σ_l λ_l s_l / τ)); the embeddings themselves are checked
against the model run on each sequence alone.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from apptools import serve

GROUPS = [
    {
        "prompt": "Explain why the sky is blue in one short paragraph.",
        "responses": [
            "Sunlight scatters off air molecules; blue light scatters most.",
            "Because it is.",
            "The quick brown fox jumps over the lazy dog.",
            "Rayleigh scattering: shorter wavelengths scatter more, so the sky looks blue.",
        ],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        "responses": ["4", "The answer is 4.", "5"],
    },
]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _s_l(vi: list[float], vj: list[float], ax: int) -> float:
    return vi[2 * ax] * vj[2 * ax + 1] - vi[2 * ax + 1] * vj[2 * ax]


@pytest.fixture(scope="module")
def scored(tiny_gpm) -> dict:
    async def run() -> dict:
        async with serve(tiny_gpm, max_wait_ms=20) as (_, client):
            resp = await client.post("/score", json={"groups": GROUPS, "return_matrix": True})
            assert resp.status_code == 200, resp.text
            return resp.json()

    return asyncio.run(run())


def test_score_equals_double_loop(scored: dict, tiny_gpm) -> None:
    tau = scored["tau"]
    k = scored["k"]
    assert k == tiny_gpm.info.k and tau == tiny_gpm.info.tau
    for group in scored["groups"]:
        v, lam = group["embeddings"], group["eigenvalues"]
        g = len(v)
        assert len(lam) == k and abs(sum(lam) - 1) < 1e-6  # gated: softmax
        for i in range(g):
            for ax in range(k):
                ref = sum(_s_l(v[i], v[j], ax) for j in range(g) if j != i) / (g - 1)
                assert group["group_scores"][i][ax] == pytest.approx(ref, abs=1e-6)
            reward = sum(lam[ax] * group["group_scores"][i][ax] for ax in range(k)) / tau
            assert group["rewards"][i] == pytest.approx(reward, abs=1e-6)
            for j in range(g):
                s = sum(lam[ax] * _s_l(v[i], v[j], ax) for ax in range(k))
                assert group["matrix"][i][j] == pytest.approx(_sigmoid(s / tau), abs=1e-6)
                assert s == pytest.approx(-sum(lam[ax] * _s_l(v[j], v[i], ax) for ax in range(k)))
            assert group["matrix"][i][i] == pytest.approx(0.5, abs=1e-7)  # s(i, i) = 0


def test_embeddings_equal_the_model_alone(scored: dict, tiny_gpm) -> None:
    """Batch invariance: each response alone through the model gives the served numbers."""
    for spec, group in zip(GROUPS, scored["groups"], strict=True):
        prompt = spec["prompt"]
        for i, response in enumerate(spec["responses"]):
            out = tiny_gpm.forward(tiny_gpm.encode([(prompt, response)]))
            torch.testing.assert_close(
                torch.tensor(group["embeddings"][i]), out.embeddings[0], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                torch.tensor(group["eigenvalues"]), out.eigenvalues[0], rtol=0, atol=1e-5
            )
    assert scored["groups"][0]["eigenvalues"] != scored["groups"][1]["eigenvalues"]


def test_compare_agrees_with_score(tiny_gpm) -> None:
    prompt = GROUPS[0]["prompt"]
    a, b = GROUPS[0]["responses"][0], GROUPS[0]["responses"][1]

    async def run() -> tuple[dict, dict]:
        async with serve(tiny_gpm) as (_, client):
            cmp = await client.post("/compare", json={"prompt": prompt, "a": a, "b": b})
            pair = {"groups": [{"prompt": prompt, "responses": [a, b]}], "return_matrix": True}
            score = await client.post("/score", json=pair)
            return cmp.json(), score.json()

    cmp, score = asyncio.run(run())
    r, group = cmp["results"][0], score["groups"][0]
    v, lam, tau = group["embeddings"], group["eigenvalues"], score["tau"]
    for ax in range(score["k"]):
        assert r["per_dimension"][ax] == pytest.approx(lam[ax] * _s_l(v[0], v[1], ax), abs=1e-6)
        # with G = 2, ŝ_l(a) = s_l(a, b)
        assert r["per_dimension"][ax] == pytest.approx(
            lam[ax] * group["group_scores"][0][ax], abs=1e-6
        )
    assert r["score"] == pytest.approx(sum(r["per_dimension"]), abs=1e-6)
    assert r["prob_a_wins"] == pytest.approx(group["matrix"][0][1], abs=1e-6)
    assert r["prob_a_wins"] == pytest.approx(_sigmoid(r["score"] / tau), abs=1e-6)
    assert r["eigenvalues"] == pytest.approx(lam, abs=1e-6)


def test_two_model_threads_serve_concurrent_requests_exactly(tiny_gpm) -> None:
    """`model_workers=2`: the real model runs two batches at once on two threads; every answer
    still equals the model run on that sequence alone."""
    pairs = [(spec["prompt"], r) for spec in GROUPS for r in spec["responses"]]

    async def run() -> list[dict]:
        async with serve(tiny_gpm, model_workers=2, max_batch_size=2, max_wait_ms=0) as (
            _,
            client,
        ):
            assert (await client.get("/info")).json()["batching"]["model_workers"] == 2
            answers = await asyncio.gather(
                *(
                    client.post("/score", json={"groups": [{"prompt": p, "responses": [r]}]})
                    for p, r in pairs * 3
                )
            )
            assert all(a.status_code == 200 for a in answers)
            return [a.json() for a in answers]

    for (prompt, response), body in zip(pairs * 3, asyncio.run(run()), strict=True):
        alone = tiny_gpm.forward(tiny_gpm.encode([(prompt, response)]))
        got = torch.tensor(body["groups"][0]["embeddings"][0])
        torch.testing.assert_close(got, alone.embeddings[0], rtol=0, atol=1e-5)
