"""Prompt-prefix sharing (gpm_server/prefix_sharing.py) gives the unshared path's scores."""

from __future__ import annotations

from dataclasses import replace

import pytest
import tinymodels
import torch

from gpm_server.model import GPM, supports_prefix_sharing
from gpm_server.prefix_sharing import common_prefix_len, plan_sharing
from gpm_server.protocol import EncodedSequence

LONG_PROMPT = "Explain why the sky is blue in one short paragraph. " * 4
PROMPTS = [
    LONG_PROMPT,
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2? " * 3},
    ],
    "Write a haiku about the sea.",
]
RESPONSES = [
    ["Rayleigh scattering.", "Blue light scatters more " * 3, "no", "no", "The sky is blue."],
    ["4", "The answer is 4.", "5", "2 + 2 = 4, because numbers. " * 4],
    ["Waves fold into foam.", "salt wind carries gull voices, " * 2],
]


def _pairs() -> list[tuple]:
    return [(p, r) for p, rs in zip(PROMPTS, RESPONSES, strict=True) for r in rs]


def _pair(parts, **kwargs) -> tuple[GPM, GPM]:
    """(sharing, plain) GPMs on the same weights, float32."""
    model, tok, heads = parts
    shared = GPM(model, tok, heads, prefix_sharing=True, **kwargs)
    shared.share_thresholds = (0.0, 0)  # share whenever anything is shared
    plain = GPM(model, tok, heads, prefix_sharing=False, **kwargs)
    return shared, plain


@pytest.fixture(scope="module")
def parts():
    return tinymodels.tiny_parts(k=3, gated=True, seed=1)


def _check_same(shared: GPM, plain: GPM, seqs: list[EncodedSequence]) -> None:
    a = shared.forward(seqs)
    assert shared.last_plan is not None, "the batch should have used sharing"
    b = plain.forward(seqs)
    assert plain.last_plan is None
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, atol=1e-5, rtol=0)


def test_common_prefix_len_against_loop() -> None:
    rows = [(1, 2, 3, 4), (1, 2, 3, 5, 6), (1, 2, 3, 4, 7)]
    expected = 0
    while all(len(r) > expected for r in rows) and len({r[expected] for r in rows}) == 1:
        expected += 1
    assert common_prefix_len(rows) == expected == 3
    assert common_prefix_len([(1, 2), (1, 2, 3)]) == 2
    assert common_prefix_len([(9,), (1,)]) == 0


def test_shared_scores_equal_unshared(parts) -> None:
    shared, plain = _pair(parts)
    seqs = shared.encode(_pairs())
    plan = plan_sharing(seqs)
    assert plan is not None and len(plan.prefix_ids) == len(PROMPTS)
    # The shared prefix covers the whole prompt here, so the gate comes from the prompt pass.
    assert all(s <= seq.cost - 1 for s, seq in zip(plan.shared, seqs, strict=True))
    assert all(plan.shared[b] >= seqs[b].prompt_len for b in range(len(seqs)))
    _check_same(shared, plain, seqs)


def test_mixed_with_singletons_and_shuffled_order(parts) -> None:
    shared, plain = _pair(parts)
    seqs = shared.encode(_pairs())
    single = shared.encode([("A lone prompt with a long answer.", "words " * 40)])
    order = [5, 0, 9, 3, 1, 10, 7, 2, 4, 6, 8]
    mixed = [seqs[i] for i in order] + single
    plan = plan_sharing(mixed, min_saving=0.0, min_saved_tokens=0)
    assert plan is not None and -1 in plan.suffix_row  # the lone row runs whole
    out = shared.forward(mixed)
    assert shared.last_plan is not None
    ref = plain.forward(mixed)
    torch.testing.assert_close(out.embeddings, ref.embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.eigenvalues, ref.eigenvalues, atol=1e-5, rtol=0)
    # each row equals its own unbatched forward too (padding does not leak in)
    for i in (0, 4, len(mixed) - 1):
        alone = plain.forward([mixed[i]])
        torch.testing.assert_close(out.embeddings[i], alone.embeddings[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.eigenvalues[i], alone.eigenvalues[0], atol=1e-5, rtol=0)


def test_truncation_clips_prompt_and_eos_overwrite(parts) -> None:
    """max_length cuts some sequences inside the prompt (P clipped, gate at the EOS)."""
    shared, plain = _pair(parts, max_length=40)
    seqs = shared.encode(_pairs())
    assert any(s.truncated for s in seqs)
    assert any(s.prompt_len == s.cost for s in seqs)  # cut at or before P
    assert all(s.input_ids[-1] == shared.eos_id for s in seqs)
    plan = plan_sharing(seqs, min_saving=0.0, min_saved_tokens=0)
    assert plan is not None
    # The cap keeps each row's last token (the overwritten EOS) out of the shared prefix.
    assert all(s < seq.cost for s, seq in zip(plan.shared, seqs, strict=True))
    _check_same(shared, plain, seqs)


def test_prefix_shorter_than_prompt_reads_gate_from_suffix(parts) -> None:
    """Rows with one prompt_key but tokens that differ before P: the gate's position lies in
    the suffix pass, and the shared part is only what is really common (checked, not assumed)."""
    shared, plain = _pair(parts)
    seqs = shared.encode(_pairs())[:5]
    p = seqs[0].prompt_len
    ids = list(seqs[1].input_ids)
    ids[p - 3] = (ids[p - 3] + 1) % 300  # now differs inside the prompt
    seqs[1] = replace(seqs[1], input_ids=tuple(ids))
    plan = plan_sharing(seqs, min_saving=0.0, min_saved_tokens=0)
    assert plan is not None and plan.shared[0] == p - 3 < p
    out = shared.forward(seqs)
    assert shared.last_plan is not None
    # reference: the plain path with the same gate rule (first row of the (key, P) group)
    ref = plain.forward(seqs)
    torch.testing.assert_close(out.embeddings, ref.embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.eigenvalues, ref.eigenvalues, atol=1e-5, rtol=0)


def test_ungated_and_no_l2(parts) -> None:
    model, tok, heads = tinymodels.tiny_parts(k=2, gated=False, seed=2)
    shared = GPM(model, tok, heads, prefix_sharing=True, l2_normalize=False)
    shared.share_thresholds = (0.0, 0)
    plain = GPM(model, tok, heads, prefix_sharing=False, l2_normalize=False)
    _check_same(shared, plain, shared.encode(_pairs()))


def test_no_sharing_when_it_saves_nothing(parts) -> None:
    shared = GPM(*parts)  # default thresholds
    singles = shared.encode([(p, "ok") for p in ("one", "two", "three")])
    assert plan_sharing(singles) is None
    shared.forward(singles)
    assert shared.last_plan is None
    dup = shared.encode([("Hi", "a"), ("Hi", "b")])  # 2 short rows: too little to save
    assert plan_sharing(dup) is None
    assert plan_sharing(dup, min_saving=0.0, min_saved_tokens=0) is not None


def test_sharing_disabled_for_sliding_window_configs(parts) -> None:
    model, _, _ = parts
    assert supports_prefix_sharing(model.config)
    cfg = model.config.to_dict()
    assert not supports_prefix_sharing(type(model.config)(**{**cfg, "sliding_window": 16}))
    assert not supports_prefix_sharing(
        type(model.config)(**{**cfg, "layer_types": ["sliding_attention", "full_attention"]})
    )
