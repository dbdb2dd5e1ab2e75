"""benchmarks/lm_compare/length_axis_verifier.py: the source verifier's length term moved to an
axis of its own, checked against the embedding written out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinymodels
import torch

from benchmarks.lm_compare import length_axes, length_axis_verifier
from gpm_server.checkpoint import HEADS_FILE, LENGTH_HEAD, PROMPT_HEAD, VALUE_HEAD
from gpm_server.model import GPM

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file, save_file

    src = tinymodels.make_gprl_checkpoint(tmp_path / "src", seed=2)
    heads = load_file(str(src / HEADS_FILE))
    heads[LENGTH_HEAD] = torch.randn(6, 2, generator=torch.Generator().manual_seed(7))
    save_file(heads, str(src / HEADS_FILE))
    return src, heads


def test_split_keeps_one_axis_count_column_on_the_new_axis_only() -> None:
    heads = tinymodels.tiny_heads(3, True, seed=1)
    heads[LENGTH_HEAD] = torch.arange(12.0).view(6, 2) + 1
    new = length_axis_verifier.split_length_axis(heads, axis=1)
    assert new[VALUE_HEAD].shape[0] == 8 and torch.equal(new[VALUE_HEAD][:6], heads[VALUE_HEAD])
    assert new[VALUE_HEAD][6:].abs().max() == 0
    want = heads[LENGTH_HEAD].clone()
    want[:, 0] = 0
    assert torch.equal(new[LENGTH_HEAD][:6], want)
    assert torch.equal(new[LENGTH_HEAD][6:], heads[LENGTH_HEAD][2:4])
    assert torch.equal(new[PROMPT_HEAD][3], heads[PROMPT_HEAD][1])
    assert heads[LENGTH_HEAD][2, 0] == 5  # the source is untouched


def test_built_verifier_embeds_as_written_and_its_new_axis_is_pure_length(tmp_path: Path) -> None:
    src, heads = _source(tmp_path)
    out = length_axis_verifier.main([str(tmp_path / "moved"), "--source", str(src)])
    gpm = GPM.from_pretrained(out)
    assert gpm.k == 4
    raw = GPM.from_pretrained(src, l2_normalize=False)
    prompt = [{"role": "user", "content": "How long?"}]
    answers = ["short", "a somewhat longer answer with more words in it"]
    got = gpm.embed([(prompt, a) for a in answers])
    w = heads[LENGTH_HEAD]
    for row, text in enumerate(answers):
        (seq,) = gpm.encode([(prompt, text)])
        feat = torch.tensor([math.log1p(seq.full_response_tokens), 1.0])
        plain = raw.embed([(prompt, text)]).embeddings[0] - w @ feat  # value_head(h) alone
        moved = w.clone()
        moved[:, 0] = 0
        v = torch.cat([plain + moved @ feat, w[2:4] @ feat])
        assert torch.allclose(got.embeddings[row], v / v.norm(), atol=1e-5)
    lam = got.eigenvalues[0]
    assert lam[1] == pytest.approx(float(lam[3]), abs=1e-6)
    # Changing only the count moves the new axis alone.
    seqs = gpm.encode([(prompt, a) for a in answers])
    probe = length_axes.doubling(gpm, seqs, gpm.forward(seqs))
    assert probe[:, :3].abs().max() < 1e-6
    det = float(w[2, 0] * w[3, 1] - w[3, 0] * w[2, 1])
    assert (probe[:, 3] * det > 0).all()  # s_K = det(W)·(log(1 + 2n) − log(1 + n)) / norms


def test_build_refuses_a_verifier_without_a_length_head(tmp_path: Path) -> None:
    src = tinymodels.make_gprl_checkpoint(tmp_path / "src")
    with pytest.raises(ValueError, match="no length head"):
        length_axis_verifier.build(tmp_path / "out", src, 1)
    src2, _ = _source(tmp_path / "two")
    with pytest.raises(ValueError, match="--axis"):
        length_axis_verifier.build(tmp_path / "out", src2, 3)


def test_linear_at_n0_is_the_tangent_of_the_log_verifier(tmp_path: Path) -> None:
    src, heads = _source(tmp_path)
    log_dir = length_axis_verifier.build(tmp_path / "log", src, 1)
    prompt = [{"role": "user", "content": "How long?"}]
    answers = ["short", "a somewhat longer answer with more words in it"]
    log_gpm = GPM.from_pretrained(log_dir)
    seqs = log_gpm.encode([(prompt, a) for a in answers])
    n0 = seqs[0].full_response_tokens
    lin_dir = length_axis_verifier.main(
        [str(tmp_path / "lin"), "--source", str(src), "--linear-at", str(n0)]
    )
    lin = GPM.from_pretrained(lin_dir)
    assert (
        lin.length_scale == 1 + n0
        and lin.info.extra["length_feature"] == f"response_tokens/{n0 + 1}"
    )
    a, b = log_gpm.forward(seqs), lin.forward(seqs)
    assert torch.allclose(a.embeddings[0], b.embeddings[0], atol=1e-6)  # equal at n0
    # Elsewhere the new axis reads W·(log(1 + n0) + (n − n0)/(1 + n0), 1) before normalisation.
    n = seqs[1].full_response_tokens
    w = heads[LENGTH_HEAD][2:4]
    tangent = w @ torch.tensor([math.log1p(n0) + (n - n0) / (1 + n0), 1.0])
    raw = b.embeddings[1] / b.embeddings[1][6:].norm() * tangent.norm()  # undo the norm
    assert torch.allclose(raw[6:], tangent, atol=1e-5)
    assert not torch.allclose(a.embeddings[1], b.embeddings[1], atol=1e-4)
    # Changing only the count still moves the new axis alone.
    probe = length_axes.doubling(lin, seqs, b)
    assert probe[:, :3].abs().max() < 1e-6


def test_linearise_refuses_a_count_column_off_the_last_axis() -> None:
    heads = tinymodels.tiny_heads(3, True, seed=1)
    heads[LENGTH_HEAD] = torch.ones(6, 2)
    with pytest.raises(ValueError, match="last axis"):
        length_axis_verifier.linearise_last_axis(heads, 100.0)
    with pytest.raises(ValueError, match="linear-at"):
        length_axis_verifier.linearise_last_axis(heads, -1.0)
