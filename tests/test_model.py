"""GPM backend: both checkpoint formats, tokenisation, the forward pass, the gate, the score."""

from __future__ import annotations

import math
import os
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import tinymodels
import torch

from gpm_server.checkpoint import (
    PROMPT_HEAD,
    VALUE_HEAD,
    GPMConfig,
    detect_format,
    load_checkpoint,
    save_gprl_checkpoint,
)
from gpm_server.model import GPM, prompt_key
from gpm_server.protocol import GPMBackend, as_messages
from gprl_client import gpm_math

PROMPTS = [
    "Describe the importance of reading books in today's digital age.",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
]
RESPONSES = [
    [
        "Books remain crucial.",
        "Books are useful, they help you relax.",
        "no",
        "Reading is fun " * 5,
    ],
    ["4", "The answer is 4.", "5", "2 + 2 = 4, because numbers."],
]
G = 4


def _pairs() -> list[tuple]:
    return [(p, r) for p, rs in zip(PROMPTS, RESPONSES, strict=True) for r in rs]


def _with(gpm: GPM, **kwargs) -> GPM:
    """Another GPM on the same backbone and heads, with some settings changed."""
    settings = {"tau": gpm.tau, "l2_normalize": gpm.l2_normalize, "max_length": gpm.max_length}
    return GPM(gpm.backbone, gpm.tokenizer, gpm.heads(), **{**settings, **kwargs})


def _reference_gate(gpm: GPM, seq) -> torch.Tensor:
    """Gate from the sequence's own unpadded forward pass, hidden state at P − 1."""
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        hidden = gpm.backbone(input_ids=ids).last_hidden_state[0]
        return torch.softmax(gpm.prompt_head(hidden[seq.prompt_len - 1]), dim=-1)


def test_gpm_implements_protocol(tiny_gpm: GPM) -> None:
    assert isinstance(tiny_gpm, GPMBackend)
    assert tiny_gpm.info.k == 3 and tiny_gpm.info.gated and tiny_gpm.info.source_format == "gprl"
    assert tiny_gpm.info.dtype == "float32" and tiny_gpm.info.device == "cpu"
    assert tiny_gpm.info.extra["attn_implementation"] == "sdpa"


def test_both_formats_give_identical_outputs(
    tiny_gprl_dir: Path, tiny_released_dir: Path, tmp_path: Path
) -> None:
    assert detect_format(tiny_gprl_dir) == "gprl"
    assert detect_format(tiny_released_dir) == "released"
    ours = GPM.from_pretrained(tiny_gprl_dir)
    released = GPM.from_pretrained(tiny_released_dir, max_length=ours.max_length)
    sharded_dir = tinymodels.make_released_checkpoint(tmp_path / "sharded", shards=3)
    sharded = GPM.from_pretrained(sharded_dir, max_length=ours.max_length)
    assert released.info.source_format == "released" and released.info.k == 3
    a = ours.embed(_pairs())
    for other in (released, sharded):
        assert other.encode(_pairs()) == ours.encode(_pairs())
        b = other.embed(_pairs())
        torch.testing.assert_close(b.embeddings, a.embeddings, rtol=0, atol=0)
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=0, atol=0)


@pytest.mark.parametrize(("k", "gated"), [(1, True), (2, False), (4, True)])
def test_released_infers_k_and_gate_from_weights(tmp_path: Path, k: int, gated: bool) -> None:
    gpm = GPM.from_pretrained(tinymodels.make_released_checkpoint(tmp_path, k=k, gated=gated))
    assert gpm.info.k == k and gpm.info.gated == gated
    assert gpm.info.tau == 0.1 and gpm.info.l2_normalize  # defaults for the released format
    out = gpm.embed(_pairs())
    assert out.embeddings.shape == (len(_pairs()), 2 * k)
    assert out.eigenvalues.shape == (len(_pairs()), k)
    if gated:
        torch.testing.assert_close(out.eigenvalues.sum(-1), torch.ones(len(_pairs())))
    else:
        assert torch.equal(out.eigenvalues, torch.ones(len(_pairs()), k))


def test_scores_match_explicit_double_loop(tiny_gpm: GPM) -> None:
    out = tiny_gpm.embed(_pairs())
    assert out.embeddings.dtype == torch.float32 and out.embeddings.device.type == "cpu"
    emb = out.embeddings.view(len(PROMPTS), G, -1)  # (N, G, 2K)
    eig_rows = out.eigenvalues.view(len(PROMPTS), G, -1)
    assert torch.equal(eig_rows, eig_rows[:, :1].expand_as(eig_rows))  # one gate per prompt
    eig = eig_rows[:, 0]  # (N, K)
    tau, k = tiny_gpm.tau, tiny_gpm.k
    matrix = gpm_math.preference_matrix(emb, eig, tau)
    ghat = gpm_math.group_scores(emb)
    e, lam = emb.double().tolist(), eig.double().tolist()

    def s_axis(n: int, i: int, j: int, ax: int) -> float:  # a(i) b(j) - b(i) a(j) on axis ax
        return e[n][i][2 * ax] * e[n][j][2 * ax + 1] - e[n][i][2 * ax + 1] * e[n][j][2 * ax]

    for n in range(len(PROMPTS)):
        for i in range(G):
            for j in range(G):
                s = sum(lam[n][ax] * s_axis(n, i, j, ax) for ax in range(k))
                got = gpm_math.preference_score(emb[n, i], emb[n, j], eig[n])
                assert got.item() == pytest.approx(s, abs=1e-6)
                prob = 1 / (1 + math.exp(-s / tau))
                assert matrix[n, i, j].item() == pytest.approx(prob, abs=1e-6)
            for ax in range(k):
                ref = sum(s_axis(n, i, j, ax) for j in range(G) if j != i) / (G - 1)
                assert ghat[n, i, ax].item() == pytest.approx(ref, abs=1e-6)
    scores = gpm_math.preference_score(emb[:, :, None], emb[:, None], eig[:, None, None])
    assert torch.all(torch.diagonal(scores, dim1=1, dim2=2) == 0)
    torch.testing.assert_close(scores, -scores.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(matrix + matrix.transpose(1, 2), torch.ones_like(matrix))


def test_batch_invariance(tiny_gpm: GPM) -> None:
    seqs = tiny_gpm.encode(_pairs())
    alone = [tiny_gpm.forward([s]) for s in seqs]
    order = [7, 0, 3, 5, 1, 6, 2, 4]
    mixed = tiny_gpm.forward([seqs[i] for i in order])
    for row, i in enumerate(order):
        torch.testing.assert_close(mixed.embeddings[row], alone[i].embeddings[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            mixed.eigenvalues[row], alone[i].eigenvalues[0], rtol=0, atol=1e-5
        )
    # A much longer companion adds lots of padding to the short rows.
    long_pair = ("Tell me everything. " * 20, "Everything. " * 30)
    padded = tiny_gpm.forward([seqs[2], *tiny_gpm.encode([long_pair])])
    torch.testing.assert_close(padded.embeddings[0], alone[2].embeddings[0], rtol=0, atol=1e-5)


def test_right_padding_equals_the_reference_left_padded_masked_forward(tiny_gpm: GPM) -> None:
    """The reference left-pads, masks and sets `position_ids = cumsum(mask) − 1`; we right-pad
    with no mask. Same states at the read positions, hence the same embeddings and gates."""
    gpm = _with(tiny_gpm, prefix_sharing=False)
    seqs = gpm.encode([*_pairs(), ("Tell me everything. " * 20, "Everything. " * 30)])
    t = max(s.cost for s in seqs)
    ids = torch.full((len(seqs), t), gpm.pad_id)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - s.cost :] = torch.tensor(s.input_ids)
        mask[i, t - s.cost :] = 1
    with torch.no_grad():
        hidden = gpm.backbone(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).last_hidden_state
    out = gpm.forward(seqs)
    for i, s in enumerate(seqs):
        want = gpm_math.l2_normalize(gpm.value_head(hidden[i, -1]))
        gate = torch.softmax(gpm.prompt_head(hidden[i, t - s.cost + s.prompt_len - 1]), dim=-1)
        torch.testing.assert_close(out.embeddings[i], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.eigenvalues[i], gate, rtol=0, atol=1e-5)


def test_gate_once_per_prompt_equals_gate_of_each_sequence(tiny_gpm: GPM) -> None:
    seqs = tiny_gpm.encode(_pairs())
    rows_seen: list[int] = []
    hook = tiny_gpm.prompt_head.register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].shape[0])
    )
    try:
        out = tiny_gpm.forward(seqs)
    finally:
        hook.remove()
    assert rows_seen == [len(PROMPTS)]  # the prompt head ran once per distinct prompt
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(
            out.eigenvalues[row], _reference_gate(tiny_gpm, seq), atol=1e-5, rtol=0
        )


def test_eos_overwrites_last_token_and_double_bos(tiny_gpm: GPM) -> None:
    tok = tiny_gpm.tokenizer
    for (prompt, response), seq in zip(_pairs(), tiny_gpm.encode(_pairs()), strict=True):
        text = tok.apply_chat_template(
            [*as_messages(prompt), {"role": "assistant", "content": response}], tokenize=False
        )
        raw = tok(text)["input_ids"]
        assert len(seq.input_ids) == len(raw)  # overwritten, not appended
        assert raw[-1] != tok.eos_token_id and seq.input_ids[-1] == tok.eos_token_id
        assert seq.input_ids[:-1] == tuple(raw[:-1])
        assert seq.input_ids[:2] == (tok.bos_token_id, tok.bos_token_id)  # the released quirk
        assert not seq.truncated and seq.response_tokens == len(raw) - seq.prompt_len


def test_truncation_flag_and_clipped_prompt(tiny_gpm: GPM) -> None:
    pairs = [
        ("hi", "yes"),
        ("hi", "Books remain crucial in the digital era. " * 5),
        ("x " * 40, "y"),
    ]
    full = tiny_gpm.encode(pairs)
    limit = len(full[0].input_ids) + 2  # the first fits, the others do not
    assert len(full[1].input_ids) > limit and full[1].prompt_len < limit < full[2].prompt_len
    short = _with(tiny_gpm, max_length=limit)
    seqs = short.encode(pairs)
    assert [s.truncated for s in seqs] == [False, True, True]
    assert seqs[0] == full[0]
    assert [len(s.input_ids) for s in seqs][1:] == [limit, limit]
    assert all(s.input_ids[-1] == short.eos_id for s in seqs)
    assert seqs[1].prompt_len == full[1].prompt_len
    assert seqs[1].input_ids[:-1] == full[1].input_ids[: limit - 1]  # right truncation
    assert seqs[2].prompt_len == limit and seqs[2].response_tokens == 0  # gate reads the EOS
    out = short.forward(seqs)
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(
            out.eigenvalues[row], _reference_gate(short, seq), atol=1e-5, rtol=0
        )


def test_l2_normalize_on_and_off(tiny_gpm: GPM) -> None:
    raw = _with(tiny_gpm, l2_normalize=False)
    assert not raw.info.l2_normalize
    seqs = tiny_gpm.encode(_pairs())
    unnormed = raw.forward(seqs).embeddings
    normed = tiny_gpm.forward(seqs).embeddings
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(len(seqs)))
    assert not torch.allclose(unnormed.norm(dim=-1), torch.ones(len(seqs)), atol=1e-3)
    torch.testing.assert_close(
        unnormed / unnormed.norm(dim=-1, keepdim=True), normed, atol=1e-6, rtol=0
    )
    with torch.no_grad():  # the value head reads the last (EOS) position
        hidden = tiny_gpm.backbone(input_ids=torch.tensor([seqs[0].input_ids])).last_hidden_state
        torch.testing.assert_close(
            unnormed[0], tiny_gpm.value_head(hidden[0, -1]), atol=1e-5, rtol=0
        )


def test_string_and_chat_prompts(tiny_gpm: GPM) -> None:
    as_string = tiny_gpm.encode([("What is 2 + 2?", "4")])
    as_chat = tiny_gpm.encode([([{"role": "user", "content": "What is 2 + 2?"}], "4")])
    assert as_string == as_chat
    multi = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    seq = tiny_gpm.encode([(multi, "4")])[0]
    prompt_text = tiny_gpm.tokenizer.apply_chat_template(multi, tokenize=False)
    prompt_ids = tiny_gpm.tokenizer(prompt_text)["input_ids"]
    assert seq.prompt_len == len(prompt_ids)  # the gate reads the end of the whole prompt
    assert seq.input_ids[: seq.prompt_len] == tuple(prompt_ids)
    assert seq.prompt_key == prompt_key(prompt_text) != as_chat[0].prompt_key


def test_empty_batch(tiny_gpm: GPM) -> None:
    assert tiny_gpm.encode([]) == []
    out = tiny_gpm.forward([])
    assert out.embeddings.shape == (0, 6) and out.eigenvalues.shape == (0, 3)


def test_config_values_and_overrides(tiny_gprl_dir: Path, tmp_path: Path) -> None:
    gpm = GPM.from_pretrained(tiny_gprl_dir)
    config = GPMConfig(k=3, gated=True, tau=0.5, l2_normalize=False, max_length=64)
    save_gprl_checkpoint(tmp_path, gpm.heads(), replace(config, backbone=str(tiny_gprl_dir)))
    stored = GPM.from_pretrained(tmp_path)
    assert (stored.info.tau, stored.info.l2_normalize, stored.info.max_length) == (0.5, False, 64)
    assert stored.info.extra["backbone"] == str(tiny_gprl_dir)
    over = GPM.from_pretrained(tmp_path, tau=0.2, l2_normalize=True, max_length=128)
    assert (over.info.tau, over.info.l2_normalize, over.info.max_length) == (0.2, True, 128)
    torch.testing.assert_close(over.embed(_pairs()).embeddings, gpm.embed(_pairs()).embeddings)


def test_save_rejects_inconsistent_heads(tiny_gpm: GPM, tmp_path: Path) -> None:
    heads = tiny_gpm.heads()
    assert heads[VALUE_HEAD].shape == (6, 32) and heads[PROMPT_HEAD].shape == (3, 32)
    with pytest.raises(ValueError, match="do not match"):
        save_gprl_checkpoint(tmp_path, heads, GPMConfig(k=2, gated=True, backbone="x"))
    with pytest.raises(ValueError, match="do not match"):
        save_gprl_checkpoint(
            tmp_path, {VALUE_HEAD: heads[VALUE_HEAD]}, GPMConfig(k=3, gated=True, backbone="x")
        )
    with pytest.raises(ValueError, match="backbone"):
        save_gprl_checkpoint(tmp_path, heads, GPMConfig(k=3, gated=True))
    with pytest.raises(ValueError, match="2K rows"):
        save_gprl_checkpoint(
            tmp_path, {VALUE_HEAD: torch.zeros(3, 32)}, GPMConfig(k=1, gated=False)
        )
    with pytest.raises(ValueError, match="neither"):
        detect_format(tmp_path / "nothing")


def test_hub_id_goes_through_snapshot_download(
    tiny_released_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_released_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = load_checkpoint("general-preference/GPM-Tiny", revision="abc123")
    assert ckpt.source_format == "released" and ckpt.config.k == 3
    assert calls[0][0] == "general-preference/GPM-Tiny" and calls[0][1]["revision"] == "abc123"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint("./no/such/dir")


def test_bfloat16_runs_and_stays_close(tiny_gprl_dir: Path, tiny_gpm: GPM) -> None:
    bf16 = GPM.from_pretrained(tiny_gprl_dir, dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16"
    out = bf16.embed(_pairs())
    assert out.embeddings.dtype == torch.float32 and out.eigenvalues.dtype == torch.float32
    ref = tiny_gpm.embed(_pairs())
    torch.testing.assert_close(out.embeddings, ref.embeddings, atol=5e-2, rtol=0)
    torch.testing.assert_close(out.eigenvalues, ref.eigenvalues, atol=5e-2, rtol=0)


def test_relative_and_gguf_backbones(
    tiny_gpm: GPM, tiny_gprl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads_dir = tmp_path / "heads_only"
    rel = os.path.relpath(tiny_gprl_dir, heads_dir)
    save_gprl_checkpoint(heads_dir, tiny_gpm.heads(), GPMConfig(k=3, gated=True, backbone=rel))
    ref = tiny_gpm.embed(_pairs())
    torch.testing.assert_close(
        GPM.from_pretrained(heads_dir).embed(_pairs()).embeddings, ref.embeddings
    )

    # The gguf branch delegates to gpm_server.gguf_backbone (its own module and tests); a
    # stand-in here checks only the call and that its (causal LM, tokenizer) pair is used.
    calls = []

    def fake_load(spec: str, dtype: torch.dtype, cache_dir: str | None):
        calls.append((spec, dtype, cache_dir))
        model, tok, _ = tinymodels.tiny_parts()
        return model, tok

    fake = types.ModuleType("gpm_server.gguf_backbone")
    fake.load_gguf_backbone = fake_load
    fake.backbone_info = lambda model: {"backbone_source": "fake"}
    monkeypatch.setitem(sys.modules, "gpm_server.gguf_backbone", fake)
    gguf_dir = tmp_path / "gguf"
    save_gprl_checkpoint(gguf_dir, tiny_gpm.heads(), GPMConfig(k=3, gated=True, backbone="gguf:x"))
    gpm = GPM.from_pretrained(gguf_dir)
    assert calls == [("gguf:x", torch.float32, None)]
    assert gpm.info.extra["backbone"] == "gguf:x"
    assert gpm.info.extra["backbone_source"] == "fake"
    torch.testing.assert_close(gpm.embed(_pairs()).embeddings, ref.embeddings)


def test_embed_tensors_is_differentiable(tiny_gpm: GPM) -> None:
    gpm = _with(tiny_gpm)
    gpm.value_head.requires_grad_(True)
    gpm.prompt_head.requires_grad_(True)
    seqs = gpm.encode(_pairs()[:3])
    emb, eig = gpm.embed_tensors(*gpm.collate(seqs))
    (emb.sum() + (eig * torch.arange(3.0)).sum()).backward()
    assert gpm.value_head.weight.grad is not None and gpm.prompt_head.weight.grad is not None
    assert gpm.value_head.weight.grad.abs().sum() > 0
