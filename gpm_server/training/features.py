"""Backbone features for head-only GPM training, cached to disk so epochs are cheap.

For each preference pair `(prompt, chosen, rejected)` we keep exactly the hidden states the GPM
heads read at serving time (gprl-math.md §1), computed with `GPM.encode` / `GPM.collate` and the
same forward call as `GPM.embed_tensors`, so trained heads serve identical scores:

- `h_chosen`, `h_rejected` `[N, H]`: the last position (the overwritten EOS) of each sequence;
- `h_prompt` `[N, H]`: position P − 1 of the chosen sequence (the gate input; causal attention
  makes it the same in the rejected sequence unless truncation clipped P);
- `full_tokens_chosen`, `full_tokens_rejected` `[N]`: response token counts before truncation
  (what an optional length head reads; `add_token_counts` fills them into older caches).

A cache directory holds `meta.json` and shards `shard_XXXXX.pt` of `chunk` pairs each, written as
they finish: an interrupted extraction resumes where it stopped and a partial cache is usable.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpm_server.protocol import EncodedSequence, as_messages

FEATURE_VERSION = 1


@dataclass
class PairRecord:
    """One preference pair in the shared data format (`p_chosen` defaults to 1)."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    p_chosen: float
    dataset: str
    index: int


def read_pairs(
    path: str | Path, limit: int | None = None, seed: int = 0, dataset: str | None = None
) -> list[PairRecord]:
    """Read a gzip (or plain) JSONL file of pairs; `limit` takes a seeded random subsample.

    The subsample is in seeded shuffled order and a larger `limit` (same seed) extends it, so
    a feature cache can be grown chunk by chunk.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    order = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        random.Random(seed).shuffle(order)
        order = order[:limit]
    name = dataset or (path.parent.name if path.parent.name else path.stem)
    return [
        PairRecord(
            prompt=as_messages(rows[i]["prompt"]),
            chosen=rows[i]["chosen"],
            rejected=rows[i]["rejected"],
            p_chosen=float(rows[i].get("p_chosen", 1.0)),
            dataset=name,
            index=i,
        )
        for i in order
    ]


def _batches(seqs: Sequence[EncodedSequence], token_budget: int) -> Iterator[list[int]]:
    """Indices of `seqs` grouped by similar length so a padded batch stays under the budget."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].cost)
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * seqs[i].cost > token_budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def hidden_at_read_positions(gpm: Any, seqs: Sequence[EncodedSequence]) -> tuple[torch.Tensor, ...]:
    """`(h_last [B, H], h_gate [B, H])` float32 for one padded batch, as `GPM.embed_tensors`."""
    input_ids, last_pos, gate_pos = gpm.collate(seqs)
    with torch.inference_mode():
        hidden = gpm.backbone_hidden(input_ids)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_pos].float().cpu(), hidden[rows, gate_pos].float().cpu()


def _shareable(a: EncodedSequence, b: EncodedSequence) -> bool:
    p = a.prompt_len
    return p == b.prompt_len and p < min(a.cost, b.cost) and a.input_ids[:p] == b.input_ids[:p]


def shared_prefix_hidden(
    gpm: Any, a: EncodedSequence, b: EncodedSequence
) -> tuple[torch.Tensor, ...]:
    """`(h_last [2, H], h_gate [H])` for two sequences sharing their P prompt tokens.

    The prompt runs once; both responses continue from its KV cache (right-padded, so the
    padding comes after every real token and causal attention never sees it). Equal to the
    full forward pass up to float rounding, at about half the cost for short responses.
    """
    p = a.prompt_len
    dev = gpm.device
    prefix = torch.tensor([a.input_ids[:p]], device=dev)
    tails = [s.input_ids[p:] for s in (a, b)]
    width = max(map(len, tails))
    ids = torch.full((2, width), gpm.pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((2, p + width), dtype=torch.long, device=dev)
    mask[:, :p] = 1
    for row, tail in enumerate(tails):
        ids[row, : len(tail)] = torch.tensor(tail, device=dev)
        mask[row, p : p + len(tail)] = 1
    pos = torch.arange(p, p + width, device=dev).expand(2, -1)
    with torch.inference_mode():
        first = gpm.backbone(input_ids=prefix, use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(2)
        hidden = gpm.backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    ends = torch.tensor([len(t) - 1 for t in tails], device=dev)
    h_last = hidden[torch.arange(2, device=dev), ends].float().cpu()
    return h_last, first.last_hidden_state[0, p - 1].float().cpu()


def extract_chunk(
    gpm: Any, pairs: Sequence[PairRecord], token_budget: int, share_prefix: bool = True
) -> dict[str, Any]:
    """Features and metadata for a list of pairs (2 sequences per pair)."""
    items = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    seqs = gpm.encode(items)
    hidden = gpm.backbone.config.hidden_size
    last = torch.zeros(len(seqs), hidden)
    gate = torch.zeros(len(seqs), hidden)
    rest = []
    for i in range(0, len(seqs), 2):
        if share_prefix and _shareable(seqs[i], seqs[i + 1]):
            last[i : i + 2], gate[i] = shared_prefix_hidden(gpm, seqs[i], seqs[i + 1])
            gate[i + 1] = gate[i]
        else:
            rest += [i, i + 1]
    for idx in _batches([seqs[i] for i in rest], token_budget):
        h_last, h_gate = hidden_at_read_positions(gpm, [seqs[rest[i]] for i in idx])
        last[[rest[i] for i in idx]] = h_last
        gate[[rest[i] for i in idx]] = h_gate
    return {
        "h_chosen": last[0::2].clone(),
        "h_rejected": last[1::2].clone(),
        "h_prompt": gate[0::2].clone(),
        "h_prompt_rejected": gate[1::2].clone(),
        "p_chosen": torch.tensor([p.p_chosen for p in pairs]),
        "tokens_chosen": torch.tensor([s.response_tokens for s in seqs[0::2]]),
        "tokens_rejected": torch.tensor([s.response_tokens for s in seqs[1::2]]),
        **token_counts(seqs),
        "truncated": torch.tensor(
            [a.truncated or b.truncated for a, b in zip(seqs[::2], seqs[1::2], strict=False)]
        ),
        "chars_chosen": torch.tensor([len(p.chosen) for p in pairs]),
        "chars_rejected": torch.tensor([len(p.rejected) for p in pairs]),
        "index": torch.tensor([p.index for p in pairs]),
        "dataset": [p.dataset for p in pairs],
    }


def token_counts(seqs: Sequence[EncodedSequence]) -> dict[str, torch.Tensor]:
    """Untruncated response token counts of interleaved (chosen, rejected) sequences."""
    return {
        "full_tokens_chosen": torch.tensor([s.full_response_tokens for s in seqs[0::2]]),
        "full_tokens_rejected": torch.tensor([s.full_response_tokens for s in seqs[1::2]]),
    }


def add_token_counts(gpm: Any, out_dir: str | Path, data_file: str | Path) -> int:
    """Add `full_tokens_*` to shards cached before they existed (tokenisation only; each shard
    rewritten atomically). Returns the number of shards updated."""
    every = {p.index: p for p in read_pairs(data_file)}
    updated = 0
    for f in sorted(Path(out_dir).glob("shard_*.pt")):
        shard = torch.load(f, weights_only=False)
        if "full_tokens_chosen" in shard:
            continue
        pairs = [every[int(i)] for i in shard["index"].tolist()]
        seqs = gpm.encode([(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
        shard.update(token_counts(seqs))
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        torch.save(shard, tmp)
        tmp.rename(f)
        updated += 1
    return updated


def needs_token_counts(out_dir: str | Path) -> bool:
    """Whether any shard of a cache lacks the `full_tokens_*` columns (mmap: keys only, the
    tensors are not read)."""
    return any(
        "full_tokens_chosen" not in torch.load(f, weights_only=False, mmap=True)
        for f in sorted(Path(out_dir).glob("shard_*.pt"))
    )


def _meta_for(gpm: Any, source: str, n: int, seed: int) -> dict[str, Any]:
    return {
        "feature_version": FEATURE_VERSION,
        "source": source,
        "pairs": n,
        "seed": seed,
        "max_length": gpm.max_length,
        "hidden_size": int(gpm.backbone.config.hidden_size),
        "backbone": gpm.info.extra.get("backbone", gpm.info.model_id),
    }


def _check_meta(out: Path, meta: dict[str, Any]) -> None:
    meta_file = out / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        same = ("feature_version", "source", "seed", "max_length", "hidden_size", "backbone")
        if any(old.get(k) != meta[k] for k in same):
            raise ValueError(f"{out} holds features made with other settings: {old}")
        meta["pairs"] = max(meta["pairs"], int(old.get("pairs", 0)))
    meta_file.write_text(json.dumps(meta, indent=2))


def cached_rows(out_dir: str | Path) -> dict[int, tuple[Path, int]]:
    """Pair index (row of the data file) → (shard file, row in it), over all finished shards."""
    rows: dict[int, tuple[Path, int]] = {}
    for f in sorted(Path(out_dir).glob("shard_*.pt")):
        for r, i in enumerate(torch.load(f, weights_only=False)["index"].tolist()):
            rows[i] = (f, r)
    return rows


def missing_pairs(out_dir: str | Path, pairs: Sequence[PairRecord]) -> list[PairRecord]:
    have = cached_rows(out_dir) if Path(out_dir).is_dir() else {}
    return [p for p in pairs if p.index not in have]


def extract_features(
    gpm: Any,
    pairs: Sequence[PairRecord],
    out_dir: str | Path,
    *,
    source: str = "",
    seed: int = 0,
    chunk: int = 32,
    token_budget: int = 4096,
    progress: bool = True,
) -> Path:
    """Make sure `out_dir` holds features for every pair of `pairs` (one data file per dir).

    Pairs already cached (by row index) are skipped; new ones go to new shards of `chunk` pairs,
    each written atomically, so an interrupted run resumes and a cache can grow.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_meta(out, _meta_for(gpm, source, len(pairs), seed))
    todo = missing_pairs(out, pairs)
    numbers = [int(f.stem.split("_")[1]) for f in out.glob("shard_*.pt")]
    n = max(numbers, default=-1) + 1
    bar = tqdm(total=len(todo), desc=f"features {source or out.name}", disable=not progress)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        shard = out / f"shard_{n:05d}.pt"
        tmp = shard.with_suffix(f".tmp{os.getpid()}")
        torch.save(extract_chunk(gpm, part, token_budget), tmp)
        tmp.rename(shard)
        n += 1
        bar.update(len(part))
    bar.close()
    return out


def _concat(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        else:
            out[key] = [x for p in parts for x in p[key]]
    return out


def load_features(out_dir: str | Path, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Features of one cache dir: the rows `indices` (data-file rows) in that order, or all."""
    files = sorted(Path(out_dir).glob("shard_*.pt"))
    if not files:
        raise FileNotFoundError(f"no feature shards in {out_dir}")
    data = _concat([torch.load(f, weights_only=False) for f in files])
    if indices is None:
        return data
    where = {int(i): r for r, i in enumerate(data["index"].tolist())}
    missing = [i for i in indices if i not in where]
    if missing:
        raise KeyError(f"{out_dir} has no features for rows {missing[:5]}...")
    sel = [where[int(i)] for i in indices]
    return {
        k: v[sel] if isinstance(v, torch.Tensor) else [v[r] for r in sel] for k, v in data.items()
    }


def concat_features(*parts: dict[str, Any]) -> dict[str, Any]:
    """Concatenate feature dicts (e.g. of several data files)."""
    return _concat(parts)


def feature_gpm(
    backbone: Any, tokenizer: Any, max_length: int, model_id: str = "backbone", device: str = "cpu"
) -> Any:
    """A `GPM` with placeholder heads: only its `encode`/`collate`/backbone are used here."""
    from gpm_server.checkpoint import PROMPT_HEAD, VALUE_HEAD
    from gpm_server.model import GPM

    h = int(backbone.config.hidden_size)
    heads = {VALUE_HEAD: torch.zeros(2, h), PROMPT_HEAD: torch.zeros(1, h)}
    return GPM(
        backbone,
        tokenizer,
        heads,
        max_length=max_length,
        model_id=model_id,
        extra={"backbone": model_id},
        device=device,
    )
