"""Training and held-out prompts for the comparison, from the shared data's train splits.

Two sources, so that at least two verifier axes are active: AlpacaEval instructions (the default
GPM's gate puts them on axis 1) and HH-RLHF red-team dialogues (axes 1 and 2). Each source's
distinct prompts are shuffled with the seed, those whose chat-templated form is longer than
`max_prompt_tokens` are dropped (a cost rule fixed before any run: CPU time grows with length),
and the first ones are split into disjoint train and held-out sets. Training prompts alternate
instruction / red-team, so every step of two prompts sees one of each.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]
SOURCES = {"instruction": "alpacaeval-prefs", "red_team": "hh-rlhf-harmless"}


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def distinct_prompts(path: Path) -> list[Messages]:
    """The distinct prompts of a pairs file, in file order."""
    seen: set[str] = set()
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            prompt = as_messages(json.loads(line)["prompt"])
            key = json.dumps(prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(prompt)
    return out


def with_system(prompt: Messages, system: str | None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + prompt


def prompt_tokens(tokenizer: Any, prompt: Messages) -> int:
    """Tokens of the chat-templated prompt with the generation prompt. Through the text: with
    `tokenize=True` transformers 5 returns a dict, whose len() (2) once made the rule a no-op."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def select_prompts(
    data_root: Path,
    tokenizer: Any,
    n_train: int,
    n_eval: int,
    max_prompt_tokens: int,
    seed: int,
    system: str | None = None,
) -> dict[str, Any]:
    """`{"train": [{"source", "prompt"}], "eval": [...]}`: half of each set from each source;
    the length rule counts the prompt as the policy sees it (with `system`, if any)."""
    if n_train % 2 or n_eval % 2:
        raise ValueError("n_train and n_eval must be even (half from each source)")
    picked: dict[str, list[Messages]] = {}
    for source, folder in SOURCES.items():
        path = data_root / folder / "train.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pass --data-root (the shared data)")
        prompts = distinct_prompts(path)
        random.Random(seed).shuffle(prompts)
        need = (n_train + n_eval) // 2
        fit = []
        for p in prompts:
            if prompt_tokens(tokenizer, with_system(p, system)) <= max_prompt_tokens:
                fit.append(p)
                if len(fit) == need:
                    break
        if len(fit) < need:
            raise ValueError(f"{folder}: only {len(fit)} prompts of <= {max_prompt_tokens} tokens")
        picked[source] = fit
    half = n_train // 2
    train = []
    for i in range(half):
        train += [{"source": s, "prompt": picked[s][i]} for s in SOURCES]
    held = [{"source": s, "prompt": p} for s in SOURCES for p in picked[s][half:]]
    return {"train": train, "eval": held, "max_prompt_tokens": max_prompt_tokens, "seed": seed}


def one_axis_prompts(n_train: int, n_eval: int) -> dict[str, Any]:
    """lm_run's plain instruction prompts, where the default verifier puts α₁ ≈ 0.998 (one
    active axis): the setting in which a drift controller should stay quiet. The first `n_train`
    train, the next `n_eval` are held out."""
    from benchmarks.lm_run import PROMPTS

    if n_train + n_eval > len(PROMPTS):
        raise ValueError(f"one_axis has {len(PROMPTS)} prompts: n_train + n_eval exceeds it")
    rows = [{"source": "instruction", "prompt": as_messages(q)} for q in PROMPTS]
    return {"train": rows[:n_train], "eval": rows[n_train : n_train + n_eval], "set": "one_axis"}
