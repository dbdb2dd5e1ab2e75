"""Prompt-prefix sharing: a group's shared prompt runs once, its KV cache serves every response.

Letters: B sequences in the batch, U rows of the prefix pass, R rows of the suffix pass,
S a group's shared prefix length, T padded lengths, H hidden size.

Rows with the same `prompt_key` form a group. Its shared length S is the longest common prefix
of the rows' token ids, capped at `min(L) − 1` so every row keeps at least its last token (the
EOS the embedding reads) for the suffix pass. Sharing is exact whatever the tokenizer did at the
prompt/response boundary: a causal model's states at positions < S depend only on tokens < S,
and those are *checked* equal, never assumed. Rows with no partner (or S = 0) are *singletons*:
they run whole in the prefix pass, exactly as without sharing.

Two passes, both left-padded:
1. prefix pass: one row per group (its first S tokens) and one per singleton (all its tokens),
   `use_cache=True`;
2. suffix pass: one row per grouped sequence (its tokens from S on), on the prefix cache
   gathered to the rows (`batch_select_indices`); `position_ids` continue from S, the attention
   mask is `[group's prefix mask | row's suffix mask]` (padding in the middle is just masked).

The embedding reads each row's last position (the EOS): the suffix pass for grouped rows, the
prefix pass for singletons. The gate reads position P − 1 from whichever pass computed it
(the prefix pass whenever P ≤ S, i.e. the prompt pass).

`plan_sharing` chooses sharing only when it computes fewer padded tokens than one plain pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpm_server.protocol import EncodedSequence

# Sharing must save at least this fraction of the plain pass's padded tokens, and this many
# tokens: the second pass and the cache gather cost a little, so a marginal saving is not worth it.
MIN_SAVING = 0.15
MIN_SAVED_TOKENS = 128


@dataclass(frozen=True)
class SharePlan:
    """How a batch runs with sharing. `prefix_ids` `[U]` and `suffix_ids` `[R]` are token lists;
    `suffix_group[r]` is the prefix row whose cache suffix row r continues; `shared[b]` is row
    b's shared length S (its prefix-pass row is `prefix_row[b]`), `suffix_row[b]` its suffix row
    or −1 for a singleton."""

    prefix_ids: list[tuple[int, ...]]
    suffix_ids: list[tuple[int, ...]]
    suffix_group: list[int]
    prefix_row: list[int]
    suffix_row: list[int]
    shared: list[int]

    def padded_tokens(self) -> int:
        """Tokens the two passes compute, padding included."""
        pre = len(self.prefix_ids) * max(map(len, self.prefix_ids))
        suf = len(self.suffix_ids) * max(map(len, self.suffix_ids), default=0)
        return pre + suf


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `rows` (token id sequences)."""
    first, n = rows[0], min(map(len, rows))
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows[1:]):
            return i
    return n


def plan_sharing(
    seqs: Sequence[EncodedSequence],
    min_saving: float = MIN_SAVING,
    min_saved_tokens: int = MIN_SAVED_TOKENS,
) -> SharePlan | None:
    """A `SharePlan` for `seqs`, or None when sharing would not save `min_saving` of the
    plain pass's padded tokens (B × longest), and at least `min_saved_tokens` of them."""
    groups: dict[str, list[int]] = {}
    for b, s in enumerate(seqs):
        groups.setdefault(s.prompt_key, []).append(b)
    n = len(seqs)
    prefix_ids: list[tuple[int, ...]] = []
    suffix_ids: list[tuple[int, ...]] = []
    suffix_group: list[int] = []
    prefix_row, suffix_row, shared = [0] * n, [-1] * n, [0] * n
    for rows in groups.values():
        ids = [seqs[b].input_ids for b in rows]
        s = min(common_prefix_len(ids), min(map(len, ids)) - 1) if len(rows) > 1 else 0
        if s <= 0:  # singletons: the whole sequence in the prefix pass
            for b in rows:
                prefix_row[b], shared[b] = len(prefix_ids), len(seqs[b].input_ids)
                prefix_ids.append(seqs[b].input_ids)
            continue
        u = len(prefix_ids)
        prefix_ids.append(ids[0][:s])
        for b in rows:
            prefix_row[b], suffix_row[b], shared[b] = u, len(suffix_ids), s
            suffix_ids.append(seqs[b].input_ids[s:])
            suffix_group.append(u)
    if not suffix_ids:
        return None
    plan = SharePlan(prefix_ids, suffix_ids, suffix_group, prefix_row, suffix_row, shared)
    plain = n * max(s.cost for s in seqs)
    saved = plain - plan.padded_tokens()
    return plan if saved >= max(min_saving * plain, min_saved_tokens) else None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids [N, T], mask [N, T])`, left-padded to the longest row (one tensor copy per row)."""
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, t - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, t - len(r) :] = 1
    return ids, mask


def _cache_kwarg(backbone: torch.nn.Module) -> str:
    """transformers ≥ 5.2x calls the cache argument `cache`, earlier ones `past_key_values`."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: object) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values  # type: ignore[attr-defined]


def run_shared(
    backbone: torch.nn.Module,
    plan: SharePlan,
    seqs: Sequence[EncodedSequence],
    gate_rows: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two passes → `(last hidden [B, H], gate hidden [len(gate_rows), H])`: each row's
    state at its last position and each gate row's state at P − 1 (backbone dtype)."""
    pre_ids, pre_mask = (t.to(device) for t in left_pad(plan.prefix_ids, pad_id))
    out = backbone(
        input_ids=pre_ids,
        attention_mask=pre_mask,
        position_ids=(pre_mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
    )
    h_pre, cache = out.last_hidden_state, _cache_of(out)  # (U, Tp, H)
    group = torch.tensor(plan.suffix_group, device=device)
    cache.batch_select_indices(group)  # (U, ...) → (R, ...): each row gets its prompt's cache
    suf_ids, suf_mask = (t.to(device) for t in left_pad(plan.suffix_ids, pad_id))
    offset = torch.tensor([len(plan.prefix_ids[u]) for u in plan.suffix_group], device=device)
    h_suf = backbone(
        input_ids=suf_ids,
        attention_mask=torch.cat([pre_mask[group], suf_mask], dim=1),
        position_ids=offset[:, None] + (suf_mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
        **{_cache_kwarg(backbone): cache},
    ).last_hidden_state  # (R, Ts, H)
    tp, ts = h_pre.shape[1], h_suf.shape[1]
    flat = torch.cat([h_pre.reshape(-1, h_pre.shape[-1]), h_suf.reshape(-1, h_suf.shape[-1])])

    def flat_index(b: int, pos: int) -> int:
        """Row b's absolute position `pos` → its row in `flat`."""
        s, seq_len = plan.shared[b], len(seqs[b].input_ids)
        if plan.suffix_row[b] < 0 or pos < s:  # computed by the prefix pass
            u = plan.prefix_row[b]
            return u * tp + tp - len(plan.prefix_ids[u]) + pos
        r = plan.suffix_row[b]
        return len(plan.prefix_ids) * tp + r * ts + ts - (seq_len - s) + pos - s

    last = [flat_index(b, len(s.input_ids) - 1) for b, s in enumerate(seqs)]
    gate = [flat_index(b, seqs[b].prompt_len - 1) for b in gate_rows]
    return flat[torch.tensor(last, device=device)], flat[torch.tensor(gate, device=device)]
