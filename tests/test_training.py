"""GPM training on the tiny model: features match serving, loss falls, checkpoints round-trip,
soft labels, the Bradley-Terry head path, evaluation metrics, LoRA/full fine-tuning, the CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import pytest
import tinymodels
import torch

from gpm_server.evaluate import evaluate, gpm_logits, plot_results
from gpm_server.model import GPM
from gpm_server.training.features import (
    PairRecord,
    extract_features,
    feature_gpm,
    load_features,
    read_pairs,
)
from gpm_server.training.heads import HeadConfig, pair_loss, split_by_prompt, train_heads
from gpm_server.training.pipeline import BT_HEAD_FILE, train_from_features
from gprl_client.gpm_math import preference_probability

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

GOOD = "Thanks, here is a short clear answer: the sky is blue."
BAD = "no maybe sorry the lazy dog"


def _pairs(n: int = 24) -> list[PairRecord]:
    """Synthetic pairs: a polite on-topic answer beats a garbled one; varied prompts."""
    words = ["fox", "sea", "sky", "books", "haiku", "digits", "dog", "salt"]
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Explain the {words[i % 8]} please {i}"}]
        if i % 3 == 0:  # a multi-turn prompt
            prompt = [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello thanks"},
                *prompt,
            ]
        chosen, rejected = f"{GOOD} {words[i % 8]}", f"{BAD} {i}"
        out.append(PairRecord(prompt, chosen, rejected, 1.0 if i % 4 else 0.8, "synth", i))
    return out


@pytest.fixture(scope="module")
def tiny_feats(tmp_path_factory: pytest.TempPathFactory):
    model, tok, _ = tinymodels.tiny_parts()
    gpm = feature_gpm(model, tok, max_length=64, model_id="tiny")
    out = extract_features(
        gpm, _pairs(), tmp_path_factory.mktemp("feats"), chunk=10, progress=False
    )
    return model, tok, load_features(out, list(range(len(_pairs())))), out


def test_features_are_what_the_serving_model_reads(tiny_feats) -> None:
    model, tok, feats, _ = tiny_feats
    heads = tinymodels.tiny_heads(3, True, seed=5)
    serving = GPM(model, tok, heads, max_length=64)
    pairs = _pairs()
    z, eig = gpm_logits(heads, feats, tau=0.1, normalize=True)
    for i, p in enumerate(pairs):  # one pair at a time: the slow, obvious reference
        out = serving.embed([(p.prompt, p.chosen), (p.prompt, p.rejected)])
        ref = preference_probability(out.embeddings[0], out.embeddings[1], out.eigenvalues[0])
        assert torch.sigmoid(z[i]).item() == pytest.approx(ref.item(), abs=1e-5)
        assert torch.allclose(eig[i], out.eigenvalues[0], atol=1e-5)


def test_extraction_resumes_grows_and_selects(tiny_feats, tmp_path: Path) -> None:
    model, tok, feats, _ = tiny_feats
    gpm = feature_gpm(model, tok, max_length=64, model_id="tiny")
    pairs = _pairs()
    out = extract_features(gpm, pairs[:12], tmp_path, chunk=5, progress=False)
    before = {f: f.stat().st_mtime_ns for f in out.glob("shard_*.pt")}
    assert len(before) == 3
    extract_features(gpm, pairs[:12], out, chunk=5, progress=False)  # all cached: no-op
    assert {f: f.stat().st_mtime_ns for f in out.glob("shard_*.pt")} == before
    extract_features(gpm, pairs, out, chunk=5, progress=False)  # grows by the 12 missing
    assert len(list(out.glob("shard_*.pt"))) == 6
    order = [7, 3, 20, 0]
    sel = load_features(out, order)
    assert sel["index"].tolist() == order
    assert torch.allclose(sel["h_chosen"], feats["h_chosen"][order], atol=1e-5)
    with pytest.raises(KeyError):
        load_features(out, [999])
    other = feature_gpm(model, tok, max_length=32, model_id="tiny")
    with pytest.raises(ValueError, match="other settings"):
        extract_features(other, pairs, out, progress=False)


def test_shared_prompt_pass_equals_full_pass(tiny_feats) -> None:
    from gpm_server.training.features import extract_chunk

    model, tok, _, _ = tiny_feats
    gpm = feature_gpm(model, tok, max_length=40, model_id="tiny")  # some rows truncate
    shared = extract_chunk(gpm, _pairs(), 4096, share_prefix=True)
    full = extract_chunk(gpm, _pairs(), 4096, share_prefix=False)
    assert shared["truncated"].any()
    for key in ("h_chosen", "h_rejected", "h_prompt"):
        assert torch.allclose(shared[key], full[key], atol=1e-5)


def test_pair_loss_matches_explicit_formula() -> None:
    z = torch.tensor([2.0, -1.0, 0.3, 0.0])
    p = torch.tensor([1.0, 0.7, 0.5, 0.9])
    ref = 0.0
    for zi, pi in zip(z.tolist(), p.tolist(), strict=True):
        sig = 1 / (1 + math.exp(-zi))
        ref += -(pi * math.log(sig) + (1 - pi) * math.log(1 - sig))
    assert pair_loss(z, p).item() == pytest.approx(ref / 4, rel=1e-6)


def test_soft_label_is_the_loss_minimiser() -> None:
    z = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([z], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        pair_loss(z, torch.tensor([0.7])).backward()
        opt.step()
    assert torch.sigmoid(z).item() == pytest.approx(0.7, abs=1e-3)


def test_split_by_prompt_keeps_prompts_on_one_side() -> None:
    ids = [f"p{i % 7}" for i in range(40)]
    train, val = split_by_prompt(ids, 0.3, seed=1)
    assert sorted(train + val) == list(range(40))
    assert not {ids[i] for i in train} & {ids[i] for i in val}
    assert val


def test_split_by_prompt_depends_on_data_order_not_on_id_values() -> None:
    """Prompt ids are hashes of float features, whose last bits differ between CPU kernels: any
    renaming of the ids that keeps their order of appearance must give the same split."""
    ids = [f"p{i % 7}" for i in range(40)]
    renamed = [f"{9 - int(k[1:])}-{k}" for k in ids]  # sorts in the opposite order
    assert split_by_prompt(renamed, 0.3, seed=1) == split_by_prompt(ids, 0.3, seed=1)


@pytest.mark.parametrize("kind", ["gpm", "bt"])
def test_training_loss_falls_and_separates(tiny_feats, kind: str) -> None:
    _, _, feats, _ = tiny_feats
    cfg = HeadConfig(kind=kind, epochs=60, patience=60, val_frac=0.25, progress=False, lr=1e-2)
    res = train_heads(feats, cfg)
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    assert res.history[res.best_epoch]["val_acc"] == 1.0
    assert not set(res.train_idx) & set(res.val_idx)


def test_checkpoint_round_trip_serves_identical_scores(tiny_feats, tmp_path: Path) -> None:
    model, tok, feats, _ = tiny_feats
    backbone_dir = tmp_path / "backbone"
    model.save_pretrained(backbone_dir)
    tok.save_pretrained(backbone_dir)
    cfg = HeadConfig(epochs=30, progress=False, lr=1e-2)
    ckpt = tmp_path / "ckpt"
    summary = train_from_features(feats, cfg, ckpt, str(backbone_dir), 64, also_bt=True)
    assert summary["gpm"]["train_pairs"] + summary["gpm"]["val_pairs"] == len(_pairs())
    assert (ckpt / BT_HEAD_FILE).exists()
    served = GPM.from_pretrained(ckpt)
    assert (served.info.k, served.info.gated, served.max_length) == (3, True, 64)
    from safetensors.torch import load_file

    z, _ = gpm_logits(load_file(str(ckpt / "gpm_heads.safetensors")), feats, 0.1, True)
    for i, p in enumerate(_pairs()[:6]):
        out = served.embed([(p.prompt, p.chosen), (p.prompt, p.rejected)])
        ref = preference_probability(out.embeddings[0], out.embeddings[1], out.eigenvalues[0])
        assert torch.sigmoid(z[i]).item() == pytest.approx(ref.item(), abs=1e-5)


def test_evaluate_metrics_match_loops(tiny_feats, tmp_path: Path) -> None:
    _, _, feats, _ = tiny_feats
    heads = tinymodels.tiny_heads(3, True, seed=2)
    res = evaluate(feats, {"g": ("gpm", heads)})
    got = res["models"]["g"]["by_dataset"]["all"]
    z, eig = gpm_logits(heads, feats, 0.1, True)
    n = len(z)
    acc = sum(1.0 if z[i] > 0 else 0.5 if z[i] == 0 else 0.0 for i in range(n)) / n
    cc, cr = feats["chars_chosen"].tolist(), feats["chars_rejected"].tolist()
    lb = sum(1.0 if cc[i] > cr[i] else 0.5 if cc[i] == cr[i] else 0.0 for i in range(n)) / n
    short = [i for i in range(n) if cc[i] < cr[i]]
    acc_s = sum(1.0 if z[i] > 0 else 0.0 for i in short) / len(short) if short else math.nan
    ll = sum(-math.log(1 / (1 + math.exp(-float(z[i])))) for i in range(n)) / n
    assert got["accuracy"] == pytest.approx(acc)
    assert got["length_baseline"] == pytest.approx(lb)
    assert got["log_loss"] == pytest.approx(ll, rel=1e-5)
    assert got["pairs_chosen_shorter"] == len(short)
    if short:
        assert got["accuracy_shorter_subset"] == pytest.approx(acc_s)
    assert got["mean_eigenvalues"] == pytest.approx(eig.mean(0).tolist(), abs=1e-6)
    assert plot_results(res, tmp_path / "p.png").stat().st_size > 0


def _write_jsonl(path: Path, pairs: list[PairRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        for p in pairs:
            row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            fh.write(json.dumps({**row, "p_chosen": p.p_chosen}) + "\n")
    return path


def test_read_pairs_subsample_grows_as_a_prefix(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "ds" / "train.jsonl.gz", _pairs(30))
    small, big = read_pairs(f, limit=10, seed=3), read_pairs(f, limit=20, seed=3)
    assert [p.index for p in small] == [p.index for p in big[:10]]
    assert small[0].dataset == "ds"


def test_cli_train_then_eval(tmp_path: Path) -> None:
    from gpm_server.training.commands import register

    model, tok, _ = tinymodels.tiny_parts()
    backbone = tmp_path / "tiny-backbone"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    data = _write_jsonl(tmp_path / "synth" / "train.jsonl.gz", _pairs(20))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    common = ["--data", f"{data}:16", "--features-dir", str(tmp_path / "f"), "--quiet"]
    args = parser.parse_args(
        ["train", *common, "--out", str(tmp_path / "ck"), "--backbone", str(backbone),
         "--max-length", "64", "--epochs", "5", "--also-bt"]
    )  # fmt: skip
    assert args.func(args) == 0
    out_json = tmp_path / "eval.json"
    args = parser.parse_args(
        ["eval", "--data", str(data), "--features-dir", str(tmp_path / "f"),
         "--model", str(tmp_path / "ck"), "--out-json", str(out_json), "--plot",
         str(tmp_path / "e.png")]
    )  # fmt: skip
    assert args.func(args) == 0
    result = json.loads(out_json.read_text())
    assert set(result["models"]) == {"gpm", "bradley_terry"}
    assert result["models"]["gpm"]["by_dataset"]["synth"]["pairs"] == 20
    assert (tmp_path / "e.png").exists()


def test_cli_finetune_runs_the_epochs_asked_for(tmp_path: Path, capsys) -> None:
    """`--mode full --epochs 4` runs 4 epochs (it was silently capped at 3); 0 is refused."""
    from gpm_server.training.commands import register

    model, tok, _ = tinymodels.tiny_parts()
    backbone = tmp_path / "tiny-backbone"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    data = _write_jsonl(tmp_path / "synth" / "train.jsonl.gz", _pairs(8))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "ft"), "--backbone",
            str(backbone), "--mode", "full", "--max-length", "64", "--batch-size", "4",
            "--lr", "1e-4", "--quiet"]  # fmt: skip
    args = parser.parse_args([*argv, "--epochs", "4"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 * 2  # 8 pairs, 4 a step: 2 steps an epoch
    log = json.loads((tmp_path / "ft" / "training_log.json").read_text())
    assert log["mode"] == "full" and len(log["losses"]) == 8
    assert GPM.from_pretrained(tmp_path / "ft").k == 3
    bad = parser.parse_args([*argv, "--epochs", "0"])
    with pytest.raises(ValueError, match="epochs"):
        bad.func(bad)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_steps_and_saves(tmp_path: Path, mode: str) -> None:
    from gpm_server.checkpoint import GPMConfig
    from gpm_server.training.finetune import FinetuneConfig, finetune, save_finetuned
    from gpm_server.training.pipeline import fresh_gpm

    torch.manual_seed(0)
    model, tok, _ = tinymodels.tiny_parts()
    gpm = fresh_gpm(model, tok, 2, True, max_length=64)
    head_before = gpm.value_head.weight.detach().clone()
    cfg = FinetuneConfig(mode=mode, batch_size=4, max_steps=2, lr=1e-3, progress=False)
    losses = finetune(gpm, _pairs(8), cfg)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(head_before, gpm.value_head.weight)
    if mode == "lora":
        assert any("lora_" in n for n, _ in gpm.backbone.named_parameters())
    p = _pairs(2)[1]
    with torch.no_grad():
        gpm.backbone.eval()
        mem = gpm.embed([(p.prompt, p.chosen)]).embeddings
    out = save_finetuned(gpm, tmp_path / "ft", GPMConfig(k=2, gated=True, max_length=64))
    reloaded = GPM.from_pretrained(out).embed([(p.prompt, p.chosen)]).embeddings
    assert torch.allclose(mem, reloaded, atol=1e-5)


def test_weighted_pair_loss_equals_duplicating_pairs() -> None:
    from gpm_server.training.heads import pair_weights

    z = torch.tensor([0.3, -1.2, 2.0, 0.1])
    p = torch.tensor([1.0, 0.7, 0.9, 0.5])
    names = ["a", "b", "b", "a"]
    w = pair_weights(names, {"b": 3.0})
    assert w.tolist() == [1.0, 3.0, 3.0, 1.0]
    dup = [0, 1, 1, 1, 2, 2, 2, 3]  # each "b" pair three times
    assert pair_loss(z, p, w).item() == pytest.approx(pair_loss(z[dup], p[dup]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="not in the features"):
        pair_weights(names, {"c": 2.0})


@pytest.mark.parametrize("bad", ["hh", "hh=", "=2", "hh=0", "hh=-1", "hh=x"])
def test_dataset_weight_argument_is_checked(bad: str) -> None:
    from gpm_server.training.commands import parse_dataset_weights

    assert parse_dataset_weights(["hh=2", "alp=4.5"]) == {"hh": 2.0, "alp": 4.5}
    assert parse_dataset_weights([]) is None
    with pytest.raises(SystemExit):
        parse_dataset_weights([bad])
