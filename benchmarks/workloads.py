"""Synthetic benchmark inputs with controlled token lengths, and the HTTP payloads built on them.

Texts are random words (seeded) cut to a target token count with the model's own tokenizer,
so every server and baseline sees the same sequences. Two load shapes:
- `single_items`: distinct prompts, one response each (OpenRLHF: one request per response);
- `group_items`: N prompts with G responses each (GRPO: one request per prompt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

_WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "out up into more other time some could them than then its only new about two may first any "
    "like now my such make over our even most me state after also made many did must before back "
    "see through way where get much go well your know should down work year because come people "
    "just say each those take day good how long little use very great still own men here life "
    "both between old under last never place same another think house while high right might came "
    "off find states since used give against three himself look few general hand school part small "
    "american home during number again mrs around thought went without however govern don does got "
    "public united point end become head once course fact upon need system set every war put form "
    "water took program present government thing told possible group large until always city didn "
    "order away called want eyes something unite going face far asked interest later show knew "
    "reward model policy gradient sample token answer reason explain prove compute value"
).split()


@dataclass(frozen=True)
class Item:
    """One scored unit: a prompt and its responses (one for the single-response shape)."""

    prompt: str
    responses: tuple[str, ...]


def text_of_tokens(tokenizer: Any, n: int, rng: random.Random) -> str:
    """Random words whose plain tokenisation is about `n` tokens (cut, then decoded)."""
    words: list[str] = []
    while True:
        words.extend(rng.choice(_WORDS) for _ in range(max(8, n)))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return tokenizer.decode(ids[:n]).strip()


def single_items(
    tokenizer: Any, n: int, prompt_tokens: tuple[int, int], response_tokens: tuple[int, int], seed=0
) -> list[Item]:
    """`n` distinct prompts with one response each; lengths uniform in the given ranges."""
    rng = random.Random(seed)
    return [
        Item(
            text_of_tokens(tokenizer, rng.randint(*prompt_tokens), rng),
            (text_of_tokens(tokenizer, rng.randint(*response_tokens), rng),),
        )
        for _ in range(n)
    ]


def group_items(
    tokenizer: Any, n: int, g: int, prompt_tokens: int, response_tokens: int, seed: int = 1
) -> list[Item]:
    """`n` prompts of `prompt_tokens` tokens, each with `g` responses of `response_tokens`."""
    rng = random.Random(seed)
    return [
        Item(
            text_of_tokens(tokenizer, prompt_tokens, rng),
            tuple(text_of_tokens(tokenizer, response_tokens, rng) for _ in range(g)),
        )
        for _ in range(n)
    ]


def pairs(items: list[Item]) -> list[tuple[str, str]]:
    """Every `(prompt, response)` pair, in order."""
    return [(it.prompt, r) for it in items for r in it.responses]


def openrlhf_payload(tokenizer: Any, item: Item) -> dict[str, Any]:
    """OpenRLHF's remote-reward body for a one-response item: `query` = templated prompt with
    the generation header + response + end of turn, `prompts` = the templated prompt."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": item.prompt}], tokenize=False, add_generation_prompt=True
    )
    end = "<|im_end|>" if "<|im_start|>" in prompt else (tokenizer.eos_token or "")
    return {"query": [prompt + item.responses[0] + end], "prompts": [prompt], "labels": [""]}


def score_payload(item: Item) -> dict[str, Any]:
    """`/score` body: one group with all of the item's responses."""
    return {"groups": [{"prompt": item.prompt, "responses": list(item.responses)}]}
