"""`GPM`: the real `GPMBackend` (tokenisation + one padded forward pass), gprl-math.md §1.

Letters: B sequences in a batch, T padded length, H hidden size, K subspaces, D = 2K.

Tokenisation (`encode`), exactly as the reference code, so released checkpoints reproduce:
the full text is `apply_chat_template(prompt + [assistant response], tokenize=False)`, tokenised
with the tokenizer's default special tokens (hence the released models' double BOS), right-
truncated to `max_length`, and its last id *overwritten* with EOS (not appended). The templated
prompt `apply_chat_template(prompt, tokenize=False)` (no generation prompt) is tokenised the
same way; P is its token count and the gate reads the full sequence's hidden state at P − 1.
If truncation cut the sequence at or before P, P is clipped to the sequence length L, so the
gate reads position L − 1 (the EOS), which is what the reference's index arithmetic gives.
Truncation is applied by slicing the untruncated ids; after the EOS overwrite this equals the
tokenizer's own right truncation for BOS-only and BOS+EOS post-processors.

Multi-turn prompts **[project choice]**: the reference templates only the first message for the
gate; we template the whole prompt, so the gate reads the end of the last prompt turn.

Forward: right padding and no attention mask (the causal mask alone keeps every real token
from seeing the pads after it, so each row computes exactly what it would alone, as the
reference's left padding with `position_ids = cumsum(mask) − 1` does), SDPA attention where the
architecture supports it (transformers' default; Gemma-2 needs eager), embeddings from each
row's last real position (the EOS), gate computed once per distinct `(prompt_key, P)` in the
batch and indexed back to the rows. Rows sharing a prompt (same `prompt_key`) run the common
prefix once and continue from its KV cache when that saves enough compute (`prefix_sharing.py`,
same scores to float rounding). The heads run in float32 on the backbone's hidden states
(cast up), whatever the backbone dtype; the reference ran them in bf16.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpm_server.checkpoint import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TAU,
    LENGTH_HEAD,
    PROMPT_HEAD,
    VALUE_HEAD,
    check_heads,
    check_length_scale,
    length_feature,
    load_checkpoint,
    parse_dtype,
)
from gpm_server.prefix_sharing import (
    MIN_SAVED_TOKENS,
    MIN_SAVING,
    SharePlan,
    plan_sharing,
    run_shared,
)
from gpm_server.protocol import BatchOutput, EncodedSequence, Message, ModelInfo, as_messages
from gprl_core.gpm_math import l2_normalize as _l2_normalize


def prompt_key(templated_prompt: str) -> str:
    """Stable id of a templated prompt (rows with equal keys share one gate computation)."""
    return hashlib.blake2b(templated_prompt.encode("utf-8"), digest_size=16).hexdigest()


def gate_groups(seqs: Sequence[EncodedSequence]) -> tuple[list[int], list[int]]:
    """`(rows [U], index [B])`: the first row of each distinct `(prompt_key, P)`, and each
    row's position in `rows`. The gate is computed for `rows` only, then indexed back."""
    unique: dict[tuple[str, int], int] = {}
    rows: list[int] = []
    index: list[int] = []
    for row, s in enumerate(seqs):
        key = (s.prompt_key, s.prompt_len)  # P too: a clipped P moves the read position
        if key not in unique:
            unique[key] = len(rows)
            rows.append(row)
        index.append(unique[key])
    return rows, index


def _linear(weight: torch.Tensor, device: torch.device) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.eval().requires_grad_(False)


def supports_prefix_sharing(config: Any) -> bool:
    """Whether a backbone's cache can be gathered and continued as `prefix_sharing` does: a
    plain full-attention decoder (no sliding window, no hybrid/recurrent layers)."""
    if getattr(config, "model_type", "") in ("gemma2", "gemma3", "gemma3_text", "cohere2"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


def _length_feature_name(has_head: bool, length_scale: float | None) -> str:
    if not has_head:
        return "none"
    return "log1p_response_tokens" if length_scale is None else f"response_tokens/{length_scale:g}"


class GPM:
    """A General Preference Model: backbone + `value_head` [2K, H] + optional `prompt_head` [K, H].

    Implements `gpm_server.protocol.GPMBackend`. Build with `GPM.from_pretrained(path_or_id)`
    (either checkpoint format) or directly from a base transformers model, its tokenizer and the
    head weights.
    """

    def __init__(
        self,
        backbone: Any,
        tokenizer: Any,
        heads: Mapping[str, torch.Tensor],
        *,
        tau: float = DEFAULT_TAU,
        l2_normalize: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        length_scale: float | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        model_id: str = "local",
        revision: str | None = None,
        source_format: str = "gprl",
        extra: Mapping[str, str] | None = None,
        prefix_sharing: bool = True,
    ) -> None:
        k, gated = check_heads(heads)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id (the value head reads at EOS)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template (needed to format sequences)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        check_length_scale(length_scale)
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        base = getattr(backbone, "base_model", backbone)  # drop an LM head if one is attached
        self.backbone = base.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.value_head = _linear(heads[VALUE_HEAD], self.device)
        self.prompt_head = _linear(heads[PROMPT_HEAD], self.device) if gated else None
        length = heads.get(LENGTH_HEAD)
        self.length_head = None if length is None else _linear(length, self.device)
        self.k = k
        self.tau = float(tau)
        self.l2_normalize = bool(l2_normalize)
        self.max_length = int(max_length)
        self.length_scale = None if length_scale is None else float(length_scale)
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        # Shared-prompt KV reuse (prefix_sharing.py): only for plain full-attention caches.
        self.prefix_sharing = bool(prefix_sharing) and supports_prefix_sharing(base.config)
        self.share_thresholds = (MIN_SAVING, MIN_SAVED_TOKENS)  # see plan_sharing
        self.last_plan: SharePlan | None = None  # the latest forward's plan (benchmarks)
        self.info = ModelInfo(
            model_id=model_id,
            k=k,
            tau=self.tau,
            gated=gated,
            l2_normalize=self.l2_normalize,
            max_length=self.max_length,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            revision=revision,
            source_format=source_format,
            extra={
                "hidden_size": str(heads[VALUE_HEAD].shape[1]),
                "attn_implementation": str(getattr(base.config, "_attn_implementation", "")),
                "prefix_sharing": str(self.prefix_sharing).lower(),
                "length_feature": _length_feature_name(length is not None, self.length_scale),
                **dict(extra or {}),
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        tau: float | None = None,
        l2_normalize: bool | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
    ) -> GPM:
        """Load a gprl or released checkpoint (local directory or hub id; format detected)."""
        ckpt = load_checkpoint(
            path_or_id,
            tau=tau,
            l2_normalize=l2_normalize,
            max_length=max_length,
            revision=revision,
            dtype=dtype,
            cache_dir=cache_dir,
        )
        cfg = ckpt.config
        extra = {
            "backbone": cfg.backbone,
            "backbone_revision": cfg.backbone_revision or "",
            **ckpt.extra,
        }
        return cls(
            ckpt.backbone,
            ckpt.tokenizer,
            ckpt.heads,
            tau=cfg.tau,
            l2_normalize=cfg.l2_normalize,
            max_length=cfg.max_length,
            length_scale=cfg.length_scale,
            device=device,
            dtype=dtype,
            model_id=str(path_or_id),
            revision=revision,
            source_format=ckpt.source_format,
            extra=extra,
        )

    def heads(self) -> dict[str, torch.Tensor]:
        """The head weights (float32 CPU copies), as `save_gprl_checkpoint` takes them."""
        out = {VALUE_HEAD: self.value_head.weight.detach().cpu().clone()}
        if self.prompt_head is not None:
            out[PROMPT_HEAD] = self.prompt_head.weight.detach().cpu().clone()
        if self.length_head is not None:
            out[LENGTH_HEAD] = self.length_head.weight.detach().cpu().clone()
        return out

    # -- tokenisation ------------------------------------------------------------------------

    def _template(self, conversations: list[list[Message]]) -> list[str]:
        return list(self.tokenizer.apply_chat_template(conversations, tokenize=False))

    def encode(self, pairs: Sequence[tuple[Sequence[Message] | str, str]]) -> list[EncodedSequence]:
        """Tokenise `(prompt, response)` pairs; a prompt is chat messages or a plain string."""
        if not pairs:
            return []
        prompts = [as_messages(prompt) for prompt, _ in pairs]
        fulls = [
            [*p, {"role": "assistant", "content": r}]
            for p, (_, r) in zip(prompts, pairs, strict=True)
        ]
        # G responses usually share one prompt: template and tokenise each distinct one once.
        keys = [tuple(tuple(sorted(m.items())) for m in p) for p in prompts]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        templated = dict(
            zip(first, self._template([prompts[i] for i in first.values()]), strict=True)
        )
        prompt_texts = [templated[key] for key in keys]
        full_ids = self.tokenizer(self._template(fulls))["input_ids"]
        unique = list(dict.fromkeys(prompt_texts))
        prompt_lens = dict(zip(unique, map(len, self.tokenizer(unique)["input_ids"]), strict=True))
        out = []
        for text, ids in zip(prompt_texts, full_ids, strict=True):
            truncated = len(ids) > self.max_length
            full_response = max(len(ids) - prompt_lens[text], 0)
            ids = list(ids[: self.max_length])
            if not ids:
                raise ValueError("the chat template produced an empty sequence")
            ids[-1] = self.eos_id  # overwrite, as the reference does (not append)
            p = min(max(prompt_lens[text], 1), len(ids))
            out.append(
                EncodedSequence(
                    tuple(ids), p, prompt_key(text), truncated, len(ids) - p, full_response
                )
            )
        return out

    # -- forward -----------------------------------------------------------------------------

    def collate(self, seqs: Sequence[EncodedSequence]) -> tuple[torch.Tensor, ...]:
        """Right-pad: `(input_ids [B, T], last_pos [B], gate_pos [B])` on the device.

        `last_pos` is each row's last real position (the overwritten EOS), `gate_pos` its
        position P − 1. Right padding needs no attention mask: under causal attention a real
        token never sees the pads after it, and positions count from 0 as unpadded.
        """
        t = max(s.cost for s in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : s.cost] = torch.as_tensor(s.input_ids, dtype=torch.long)
        last_pos = torch.tensor([s.cost - 1 for s in seqs], dtype=torch.long)
        gate_pos = torch.tensor([s.prompt_len - 1 for s in seqs], dtype=torch.long)
        return ids.to(self.device), last_pos.to(self.device), gate_pos.to(self.device)

    def backbone_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last-layer states `[B, T, H]` of right-padded `input_ids` `[B, T]`.

        No attention mask on purpose: with the causal mask alone, SDPA takes its causal kernels
        (flash attention on GPUs) instead of materialising a `[B, 1, T, T]` padding mask; on
        this CPU that made batches of 64 tiny-model rows 1.2× faster and SmolLM2 1.1–1.2×.
        """
        return self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state

    def embed_tensors(
        self,
        input_ids: torch.Tensor,
        last_pos: torch.Tensor,
        gate_pos: torch.Tensor,
        gate_rows: torch.Tensor | None = None,
        gate_index: torch.Tensor | None = None,
        response_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `[B, 2K]` and eigenvalues `[B, K]` (float32, on the device).

        Right-padded inputs `[B, T]` as `collate` makes them. The gate is computed for rows
        `gate_rows` `[U]` only and spread back with `gate_index` `[B]` (defaults: every row
        computes its own). `response_tokens` `[B]` (untruncated counts) feeds the length head,
        if the model has one. No `inference_mode` here, so training code can differentiate
        through it.
        """
        hidden = self.backbone_hidden(input_ids)  # (B, T, H)
        every = torch.arange(len(last_pos), device=last_pos.device)
        rows = every if gate_rows is None else gate_rows
        return self._heads(
            hidden[every, last_pos], hidden[rows, gate_pos[rows]], gate_index, response_tokens
        )

    def _heads(
        self,
        last: torch.Tensor,
        gate_hidden: torch.Tensor,
        gate_index: torch.Tensor | None,
        response_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-position states `[B, H]`, gate states `[U, H]` → embeddings `[B, 2K]`,
        eigenvalues `[B, K]` (float32 heads; `gate_index` `[B]` spreads U gates to B rows)."""
        emb = self.value_head(last.float())  # (B, 2K)
        if self.length_head is not None:
            if response_tokens is None:
                raise ValueError("this model has a length head: pass response_tokens")
            feat = length_feature(response_tokens.to(emb.device), self.length_scale)
            emb = emb + self.length_head(feat)
        if self.l2_normalize:
            emb = _l2_normalize(emb)
        if self.prompt_head is None:
            return emb, torch.ones(emb.shape[0], self.k, device=emb.device)
        gate = torch.softmax(self.prompt_head(gate_hidden.float()), dim=-1)  # (U, K)
        return emb, (gate if gate_index is None else gate[gate_index])

    def forward(self, seqs: Sequence[EncodedSequence]) -> BatchOutput:
        """Float32 CPU embeddings `[B, 2K]` and eigenvalues `[B, K]`: one padded forward pass, or
        a shared-prefix pass plus a suffix pass when `plan_sharing` finds it cheaper."""
        if not seqs:
            return BatchOutput(torch.zeros(0, 2 * self.k), torch.zeros(0, self.k))
        rows, index = gate_groups(seqs)
        plan = plan_sharing(seqs, *self.share_thresholds) if self.prefix_sharing else None
        self.last_plan = plan
        gate_index = torch.tensor(index, device=self.device)
        lengths = (
            None
            if self.length_head is None
            else torch.tensor([s.full_response_tokens for s in seqs], device=self.device)
        )
        with torch.inference_mode():
            if plan is not None:
                last, gate_hidden = run_shared(
                    self.backbone, plan, seqs, rows, self.pad_id, self.device
                )
                emb, eig = self._heads(last, gate_hidden, gate_index, lengths)
            else:
                input_ids, last_pos, gate_pos = self.collate(seqs)
                emb, eig = self.embed_tensors(
                    input_ids,
                    last_pos,
                    gate_pos,
                    torch.tensor(rows, device=self.device),
                    gate_index,
                    lengths,
                )
        return BatchOutput(emb.float().cpu(), eig.float().cpu())

    def embed(self, pairs: Sequence[tuple[Sequence[Message] | str, str]]) -> BatchOutput:
        """`forward(encode(pairs))`: a convenience for scripts and tests."""
        return self.forward(self.encode(pairs))
