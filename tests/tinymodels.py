"""Tiny random GPMs for tests: built offline in milliseconds, no downloads.

- `tiny_tokenizer()`: a byte-level BPE trained in memory on a small corpus, wrapped in
  `PreTrainedTokenizerFast` with `<s>`/`</s>`/`<pad>` and a ChatML-style chat template. Like the
  Llama-3 template, the template text starts with the BOS string *and* the tokenizer adds BOS, so
  encoded sequences start with two BOS tokens (the released GPMs' quirk, see checkpoint.py).
- `tiny_backbone(...)`: a 2-layer Llama causal LM (hidden 32, 4 heads) on that vocabulary.
- `make_gprl_checkpoint` / `make_released_checkpoint`: the same weights (for the same seed) in
  our `gprl` format and in the released `CustomRewardModel` format.

Imported by bare name from tests (`import tinymodels`); there is no tests package.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gpm_server.checkpoint import GPMConfig, save_gprl_checkpoint

HIDDEN = 32
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain why the sky is blue in one short paragraph.",
    "Books remain crucial in the digital era, offering depth and fostering critical thinking.",
    "Write a haiku about the sea. Waves fold into foam; salt wind carries gull voices.",
    "What is 2 + 2? The answer is 4. Numbers 0 1 2 3 4 5 6 7 8 9 are digits.",
    "user assistant system hello thanks please sorry yes no maybe",
]


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Adds BOS like Llama-3's tokenizer does (the template text already starts with it).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer (byte-level BPE, any text encodes without `<unk>`)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_backbone(tok: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama causal LM with random weights (deterministic per seed)."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,  # the released format stores lm_head.weight separately
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_heads(k: int, gated: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random heads: `value_head.weight` [2K, H], `prompt_head.weight` [K, H] when gated."""
    gen = torch.Generator().manual_seed(1000 + seed)
    heads = {"value_head.weight": torch.randn(2 * k, HIDDEN, generator=gen) * 0.5}
    if gated:
        heads["prompt_head.weight"] = torch.randn(k, HIDDEN, generator=gen) * 0.5
    return heads


def tiny_parts(k: int = 3, gated: bool = True, seed: int = 0):
    """`(causal_lm, tokenizer, heads)`: everything a tiny GPM is made of."""
    tok = tiny_tokenizer()
    return tiny_backbone(tok, seed), tok, tiny_heads(k, gated, seed)


def make_gprl_checkpoint(
    out_dir: str | Path, k: int = 3, gated: bool = True, seed: int = 0, max_length: int = 256
) -> Path:
    """Write a tiny GPM in our `gprl` format (backbone files in the same directory)."""
    model, tok, heads = tiny_parts(k, gated, seed)
    config = GPMConfig(k=k, gated=gated, max_length=max_length)
    return save_gprl_checkpoint(out_dir, heads, config, backbone=model, tokenizer=tok)


def make_released_checkpoint(
    out_dir: str | Path, k: int = 3, gated: bool = True, seed: int = 0, shards: int = 1
) -> Path:
    """Write the same tiny GPM as the released `CustomRewardModel` format.

    Weights: backbone under `model.*`, `lm_head.weight`, `value_head.weight`, optional
    `prompt_head.weight`; `config.json` is the base config with the custom architecture name.
    With `shards > 1` the weights are split over several files plus a safetensors index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, heads = tiny_parts(k, gated, seed)
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    state.update(heads)
    model.config.architectures = ["CustomRewardModel"]
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
