"""The optional length head: `emb = value_head(h) + length_head((log(1 + n), 1))`, n the response's
token count before truncation. Served, trained, evaluated and backfilled consistently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinymodels
import torch

from gpm_server.checkpoint import LENGTH_HEAD, check_heads
from gpm_server.evaluate import bt_logits, gpm_logits
from gpm_server.model import GPM
from gpm_server.training.features import (
    PairRecord,
    add_token_counts,
    extract_features,
    feature_gpm,
    load_features,
    needs_token_counts,
)
from gpm_server.training.heads import HeadConfig, PreferenceHeads, train_heads
from gpm_server.training.pipeline import train_from_features
from gprl_client.gpm_math import l2_normalize, preference_probability

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _heads_with_length(seed: int = 3) -> dict[str, torch.Tensor]:
    heads = tinymodels.tiny_heads(3, True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    heads[LENGTH_HEAD] = torch.randn(6, 2, generator=gen)
    return heads


def _untruncated_response_tokens(tok, prompt: list[dict], response: str) -> int:
    """The slow, obvious count: full templated sequence minus templated prompt, untruncated."""
    full = tok.apply_chat_template(
        [*prompt, {"role": "assistant", "content": response}], tokenize=False
    )
    only = tok.apply_chat_template(prompt, tokenize=False)
    return len(tok(full)["input_ids"]) - len(tok(only)["input_ids"])


def test_served_embedding_matches_explicit_formula_even_when_truncated() -> None:
    model, tok, _ = tinymodels.tiny_parts()
    heads = _heads_with_length()
    ml = 24
    served = GPM(model, tok, heads, max_length=ml, prefix_sharing=False)
    plain = GPM(model, tok, {k: v for k, v in heads.items() if k != LENGTH_HEAD}, max_length=ml)
    prompt = [{"role": "user", "content": "say something"}]
    short = "the sky is blue " * 4
    longer = short + "and the sea is green " * 20  # same first max_length tokens, far longer
    seqs = served.encode([(prompt, short), (prompt, longer)])
    assert seqs[0].truncated and seqs[1].truncated
    assert seqs[0].input_ids == seqs[1].input_ids  # the backbone sees the same tokens
    out = served.forward(seqs)
    base = plain.forward(plain.encode([(prompt, short), (prompt, longer)]))
    # Reference: undo the L2 normalisation via the un-normalised content part of `plain`.
    h_content = plain.value_head  # same weights as served.value_head
    assert torch.equal(h_content.weight, served.value_head.weight)
    for row, text in enumerate((short, longer)):
        n = _untruncated_response_tokens(tok, prompt, text)
        assert seqs[row].full_response_tokens == n
        raw_plain = _raw_value(plain, prompt, text)
        w_len = heads[LENGTH_HEAD]
        ref = l2_normalize(raw_plain + w_len[:, 0] * torch.log1p(torch.tensor(n)) + w_len[:, 1])
        assert torch.allclose(out.embeddings[row], ref, atol=1e-5)
    assert not torch.allclose(out.embeddings[0], out.embeddings[1], atol=1e-3)
    assert torch.allclose(base.embeddings[0], base.embeddings[1], atol=1e-6)
    assert served.info.extra["length_feature"] == "log1p_response_tokens"
    assert plain.info.extra["length_feature"] == "none"


def _raw_value(gpm: GPM, prompt: list[dict], response: str) -> torch.Tensor:
    """value_head(h_last) for one sequence, batch of one, no normalisation."""
    (seq,) = gpm.encode([(prompt, response)])
    ids = torch.tensor([seq.input_ids])
    with torch.inference_mode():
        h = gpm.backbone(input_ids=ids).last_hidden_state[0, -1]
    return gpm.value_head(h.float())


def test_prefix_sharing_path_applies_the_length_head_too() -> None:
    model, tok, _ = tinymodels.tiny_parts()
    heads = _heads_with_length(seed=4)
    shared = GPM(model, tok, heads, max_length=256)
    unshared = GPM(model, tok, heads, max_length=256, prefix_sharing=False)
    prompt = [{"role": "user", "content": "a long shared prompt " * 30}]
    items = [(prompt, f"answer {i} " * (1 + 3 * i)) for i in range(6)]
    a = shared.forward(shared.encode(items))
    assert shared.last_plan is not None  # the shared-prefix path really ran
    b = unshared.forward(unshared.encode(items))
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_check_heads_rejects_a_misshapen_length_head() -> None:
    heads = _heads_with_length()
    heads[LENGTH_HEAD] = torch.zeros(6, 1)
    with pytest.raises(ValueError, match="length_head"):
        check_heads(heads)


def _pairs(n: int = 20) -> list[PairRecord]:
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"tell me about item {i}"}]
        chosen = "a fine detailed answer " * (2 + i % 5)
        rejected = "short"
        out.append(PairRecord(prompt, chosen, rejected, 1.0, "synth", i))
    return out


def test_trained_length_heads_round_trip_to_the_served_model(tmp_path: Path) -> None:
    model, tok, _ = tinymodels.tiny_parts()
    gpm = feature_gpm(model, tok, max_length=16, model_id="tiny")
    out = extract_features(gpm, _pairs(), tmp_path / "f", chunk=8, progress=False)
    feats = load_features(out)
    assert feats["full_tokens_chosen"].gt(feats["tokens_chosen"]).any()  # truncation happened
    backbone_dir = tmp_path / "backbone"
    model.save_pretrained(backbone_dir)
    tok.save_pretrained(backbone_dir)
    cfg = HeadConfig(epochs=20, progress=False, lr=1e-2, length_feature=True)
    ckpt = tmp_path / "ckpt"
    train_from_features(feats, cfg, ckpt, str(backbone_dir), 16, also_bt=True)
    from safetensors.torch import load_file

    heads = load_file(str(ckpt / "gpm_heads.safetensors"))
    assert heads[LENGTH_HEAD].abs().sum() > 0
    served = GPM.from_pretrained(ckpt)
    z, _ = gpm_logits(heads, feats, 0.1, True)
    for i, p in enumerate(_pairs()[:6]):
        o = served.embed([(p.prompt, p.chosen), (p.prompt, p.rejected)])
        ref = preference_probability(o.embeddings[0], o.embeddings[1], o.eigenvalues[0])
        assert torch.sigmoid(z[i]).item() == pytest.approx(ref.item(), abs=1e-5)
    bt = load_file(str(ckpt / "bt_head.safetensors"))
    assert tuple(bt[LENGTH_HEAD].shape) == (1, 2)
    assert bt_logits(bt, feats).shape == (len(_pairs()),)


def test_add_token_counts_backfills_an_old_cache(tmp_path: Path) -> None:
    import gzip
    import json

    model, tok, _ = tinymodels.tiny_parts()
    gpm = feature_gpm(model, tok, max_length=16, model_id="tiny")
    pairs = _pairs(12)
    data = tmp_path / "d" / "train.jsonl.gz"
    data.parent.mkdir()
    with gzip.open(data, "wt") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}))
            fh.write("\n")
    out = extract_features(gpm, pairs, tmp_path / "f", chunk=5, progress=False)
    want = load_features(out)
    for f in sorted(out.glob("shard_*.pt")):  # make it look like a cache from before
        shard = torch.load(f, weights_only=False)
        del shard["full_tokens_chosen"], shard["full_tokens_rejected"]
        torch.save(shard, f)
    assert needs_token_counts(out)
    assert add_token_counts(gpm, out, data) == 3
    assert not needs_token_counts(out)
    got = load_features(out)
    assert torch.equal(got["full_tokens_chosen"], want["full_tokens_chosen"])
    assert torch.equal(got["full_tokens_rejected"], want["full_tokens_rejected"])


def _prompt_dependent_length_data(n: int = 600, h: int = 16, seed: int = 0) -> dict:
    """Synthetic features: the gate input says the prompt type; type A prefers the longer
    answer, type B the shorter; response states are pure noise. A prompt-dependent preference
    over length that a scalar reward with one length weight cannot express."""
    gen = torch.Generator().manual_seed(seed)
    kind = torch.arange(n) % 2
    h_prompt = torch.randn(n, h, generator=gen) * 0.1
    h_prompt[:, 0] += 2.0 * (1 - kind)
    h_prompt[:, 1] += 2.0 * kind
    n_a = torch.randint(5, 400, (n,), generator=gen)
    n_b = torch.randint(5, 400, (n,), generator=gen)
    longer_a = n_a > n_b
    a_wins = torch.where(kind == 0, longer_a, ~longer_a)
    n_w, n_l = torch.where(a_wins, n_a, n_b), torch.where(a_wins, n_b, n_a)
    # Response states: a shared non-zero mean (as real hidden states have; the direction the
    # length term turns against) plus 1% noise carrying no label information.
    mean = torch.linspace(0.5, 1.5, h)
    return {
        "h_chosen": mean + 0.01 * torch.randn(n, h, generator=gen),
        "h_rejected": mean + 0.01 * torch.randn(n, h, generator=gen),
        "h_prompt": h_prompt + torch.arange(n)[:, None] * 1e-4,  # distinct prompts
        "p_chosen": torch.ones(n),
        "full_tokens_chosen": n_w,
        "full_tokens_rejected": n_l,
    }


def test_gpm_learns_a_prompt_dependent_length_preference_bt_cannot() -> None:
    feats = _prompt_dependent_length_data()
    base = dict(epochs=300, patience=300, lr=1e-2, progress=False, length_feature=True)
    gpm = train_heads(feats, HeadConfig(kind="gpm", k=2, **base))
    bt = train_heads(feats, HeadConfig(kind="bt", **base))
    gpm_acc = gpm.history[gpm.best_epoch]["val_acc"]
    bt_acc = bt.history[bt.best_epoch]["val_acc"]
    assert gpm_acc > 0.9, gpm_acc
    assert bt_acc < 0.7, bt_acc
    z, _ = gpm_logits(gpm.heads, feats, 0.1, True)  # exported weights read raw features
    model = PreferenceHeads(16, gpm.config)
    assert ((z > 0).float().mean() > 0.9) and model.length_head is not None


def test_a_linear_length_scale_is_served_saved_and_evaluated_as_n_over_s(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from gpm_server.checkpoint import CONFIG_FILE, HEADS_FILE, GPMConfig, length_feature

    model, tok, _ = tinymodels.tiny_parts()
    heads = _heads_with_length(seed=5)
    s = 40.0
    linear = GPM(model, tok, heads, max_length=24, length_scale=s, prefix_sharing=False)
    plain = GPM(model, tok, {k: v for k, v in heads.items() if k != LENGTH_HEAD}, max_length=24)
    prompt = [{"role": "user", "content": "say something"}]
    text = "the sky is blue " * 12
    (seq,) = linear.encode([(prompt, text)])
    n = _untruncated_response_tokens(tok, prompt, text)
    w = heads[LENGTH_HEAD]
    ref = l2_normalize(_raw_value(plain, prompt, text) + w[:, 0] * n / s + w[:, 1])
    assert torch.allclose(linear.forward([seq]).embeddings[0], ref, atol=1e-5)
    assert linear.info.extra["length_feature"] == "response_tokens/40"
    # The config records it, loading applies it, offline evaluation reads it.
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / CONFIG_FILE).write_text(
        json.dumps(GPMConfig(k=3, gated=True, max_length=24, length_scale=s).to_dict())
    )
    save_file(heads, str(d / HEADS_FILE))
    loaded = GPM.from_pretrained(d)
    assert loaded.length_scale == s
    assert torch.allclose(loaded.forward([seq]).embeddings[0], ref, atol=1e-5)
    tokens = torch.tensor([3, 80])
    assert torch.equal(length_feature(tokens, s), torch.tensor([[3 / s, 1.0], [80 / s, 1.0]]))
    logs = torch.tensor([[4.0, 81.0]]).log().T
    assert torch.allclose(length_feature(tokens), torch.cat([logs, torch.ones(2, 1)], 1))


def test_offline_evaluation_applies_the_checkpoints_length_scale(tmp_path: Path) -> None:
    model, tok, _ = tinymodels.tiny_parts()
    gpm = feature_gpm(model, tok, max_length=16, model_id="tiny")
    feats = load_features(extract_features(gpm, _pairs(6), tmp_path / "f", progress=False))
    heads = _heads_with_length(seed=6)
    s = 25.0
    served = GPM(model, tok, heads, max_length=16, length_scale=s, prefix_sharing=False)
    z, _ = gpm_logits(heads, feats, 0.1, True, length_scale=s)
    z_log, _ = gpm_logits(heads, feats, 0.1, True)
    assert not torch.allclose(z, z_log, atol=1e-3)
    for i, p in enumerate(_pairs(6)):
        o = served.embed([(p.prompt, p.chosen), (p.prompt, p.rejected)])
        ref = preference_probability(o.embeddings[0], o.embeddings[1], o.eigenvalues[0])
        assert torch.sigmoid(z[i]).item() == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "10"])
def test_a_length_scale_that_is_not_a_positive_number_is_refused(bad: object) -> None:
    from gpm_server.checkpoint import GPMConfig

    with pytest.raises(ValueError, match="length_scale"):
        GPMConfig(k=3, gated=True, length_scale=bad)  # type: ignore[arg-type]
    model, tok, _ = tinymodels.tiny_parts()
    with pytest.raises(ValueError, match="length_scale"):
        GPM(model, tok, _heads_with_length(), length_scale=bad)  # type: ignore[arg-type]
