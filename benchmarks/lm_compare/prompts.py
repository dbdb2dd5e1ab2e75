"""Training and held-out prompts for the comparison, from the shared data's train splits.

Two sources, so that at least two verifier axes are active: AlpacaEval instructions (the default
GPM's gate puts them on axis 1) and HH-RLHF red-team dialogues (axes 1 and 2). Each source's
distinct prompts are shuffled with the seed, those whose chat-templated form is longer than
`max_prompt_tokens` are dropped (a cost rule fixed before any run: CPU time grows with length),
and the first ones are split into disjoint train and held-out sets. Training prompts alternate
instruction / red-team, so every step of two prompts sees one of each.

A run's `prompts.json` names the shared data's prompts by reference, never by text (the data
stays out of the repository): source, index among that split's distinct prompts in file order,
and the SHA-256 of the prompt, checked when `load_prompts` resolves it against the data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]
SOURCES = {"instruction": "alpacaeval-prefs", "red_team": "hh-rlhf-harmless"}
DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


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


def prompt_sha256(prompt: Messages) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


def with_system(prompt: Messages, system: str | None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + prompt


def answer_pairs(prompts: list[dict], answers: list[dict], system: str | None) -> list:
    """`(prompt with the run's system message, answer text)` for each held-out answer row."""
    return [(with_system(prompts[x["prompt_index"]]["prompt"], system), x["text"]) for x in answers]


def versus_pairs(
    prompts: list[dict], arm: list[dict], base: list[dict], system: str | None
) -> list:
    """`(prompt, arm answer, base answer)` for each held-out (arm, base) answer pair."""
    return [
        (prompt, text, b["text"])
        for (prompt, text), b in zip(answer_pairs(prompts, arm, system), base, strict=True)
    ]


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
    picked: dict[str, list[dict[str, Any]]] = {}
    for source, folder in SOURCES.items():
        path = data_root / folder / "train.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pass --data-root (the shared data)")
        order = list(range(len(prompts := distinct_prompts(path))))
        random.Random(seed).shuffle(order)  # the same draw as shuffling the prompts themselves
        need = (n_train + n_eval) // 2
        fit = []
        for i in order:
            if prompt_tokens(tokenizer, with_system(prompts[i], system)) <= max_prompt_tokens:
                fit.append({"source": source, "index": i, "prompt": prompts[i]})
                if len(fit) == need:
                    break
        if len(fit) < need:
            raise ValueError(f"{folder}: only {len(fit)} prompts of <= {max_prompt_tokens} tokens")
        picked[source] = fit
    half = n_train // 2
    train = []
    for i in range(half):
        train += [picked[s][i] for s in SOURCES]
    held = [p for s in SOURCES for p in picked[s][half:]]
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


def stored_form(chosen: dict[str, Any]) -> dict[str, Any]:
    """What `prompts.json` keeps: a shared-data prompt as (source, index, sha256), no text."""

    def ref(row: dict[str, Any]) -> dict[str, Any]:
        if "index" not in row:
            return row  # our own prompts (one_axis) are kept as text
        return {"source": row["source"], "index": row["index"],
                "sha256": prompt_sha256(row["prompt"])}  # fmt: skip

    return {**chosen, **{k: [ref(r) for r in chosen[k]] for k in ("train", "eval") if k in chosen}}


def resolve(
    rows: list[dict[str, Any]], data_root: Path, read: dict[Path, list[Messages]] | None = None
) -> list[dict[str, Any]]:
    """Rows with their prompt text: references looked up in the shared data and checked
    (`read`: the data files already read, by path, so a run's sets read each file once)."""
    read = {} if read is None else read
    out = []
    for row in rows:
        if "prompt" in row:
            out.append(row)
            continue
        path = Path(data_root) / SOURCES[row["source"]] / "train.jsonl.gz"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: prompts.json names the shared data's prompts by index, "
                "pass --data-root (the shared data)"
            )
        if path not in read:
            read[path] = distinct_prompts(path)
        prompts = read[path]
        i = row["index"]
        if i >= len(prompts) or prompt_sha256(prompts[i]) != row["sha256"]:
            raise ValueError(
                f"{path}: prompt {i} is not the one this run used (its SHA-256 differs); "
                "the run needs the data it was selected from"
            )
        out.append({**row, "prompt": prompts[i]})
    return out


def load_prompts(out: Path, data_root: Path | None = None) -> dict[str, Any]:
    """A run's `prompts.json` with every prompt's text; `data_root` defaults to the one in the
    run's settings.json when that folder exists, else ../shared/data."""
    chosen = json.loads((Path(out) / "prompts.json").read_text())
    if data_root is None:
        settings = Path(out) / "settings.json"
        saved = json.loads(settings.read_text()).get("data_root") if settings.exists() else None
        data_root = Path(saved) if saved and Path(saved).exists() else DATA_ROOT
    read: dict[Path, list[Messages]] = {}
    for key in ("train", "eval"):
        if key in chosen:
            chosen[key] = resolve(chosen[key], data_root, read)
    return chosen
