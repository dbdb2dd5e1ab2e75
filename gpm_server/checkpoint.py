"""Load and save GPM checkpoints: our `gprl` format and the released `CustomRewardModel` format.

Our format (`gprl`, docs/architecture.md): a directory with `gpm_config.json` (K, τ, L2
normalisation, gate, backbone id and revision, max length) and `gpm_heads.safetensors`
(`value_head.weight` [2K, H], optional `prompt_head.weight` [K, H]). `backbone` is `"."` (the
Hugging Face backbone files are in the same directory), another local directory (absolute or
relative to the checkpoint), a hub id, or a `"gguf:..."` spec loaded by
`gpm_server.gguf_backbone.load_gguf_backbone`.

Released checkpoints (`general-preference/GPM-*`) and their quirks:

- `config.json` is the base model's config with `"architectures": ["CustomRewardModel"]`; the
  weights hold the backbone under `model.*`, an unused `lm_head.weight`, `value_head.weight`
  [2K, H] and, when gated, `prompt_head.weight` [K, H].
- Nothing records K, the gate, τ or normalisation. K is read from the value head's shape (the
  model cards disagree on K for the same model, so never trust them); the gate is the presence
  of `prompt_head.weight`; τ and `l2_normalize` come from the caller (defaults 0.1 and true).
- They were trained on "double BOS" sequences: the chat template's text already starts with
  the BOS string (Llama-3: `<|begin_of_text|>`) and the tokenizer adds another. `GPM.encode`
  reproduces this on purpose (default special tokens), because the heads were fit that way.
- Some tokenizers have no pad token; `GPM` pads with EOS then (padding is masked anyway).

Hub ids are fetched with `huggingface_hub.snapshot_download` (config, tokenizer and weight files
only); a local directory is used as is.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

FORMAT = "gprl-gpm"
FORMAT_VERSION = 1
CONFIG_FILE = "gpm_config.json"
HEADS_FILE = "gpm_heads.safetensors"
VALUE_HEAD = "value_head.weight"
PROMPT_HEAD = "prompt_head.weight"
LENGTH_HEAD = "length_head.weight"  # optional [2K, 2]: reads length_feature(response tokens)
LENGTH_FEATURES = 2  # columns of length_feature: (log(1 + n), 1), or (n / length_scale, 1)
DEFAULT_TAU = 0.1
DEFAULT_MAX_LENGTH = 4096
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class GPMConfig:
    """What `gpm_config.json` records (everything the weights alone do not say)."""

    k: int
    gated: bool
    tau: float = DEFAULT_TAU
    l2_normalize: bool = True
    backbone: str = "."
    backbone_revision: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    length_scale: float | None = None  # None: the length head reads log(1 + n); s > 0: n / s

    def __post_init__(self) -> None:
        check_length_scale(self.length_scale)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GPMConfig:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} config: {dict(data)}")
        fields = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass
class Checkpoint:
    """A loaded GPM: base backbone (no LM head), tokenizer, float32 CPU heads, resolved config."""

    backbone: Any  # transformers PreTrainedModel (the base model, hidden states after final norm)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    heads: dict[str, torch.Tensor]
    config: GPMConfig
    source_format: str  # "gprl" or "released"
    extra: dict[str, str] = field(default_factory=dict)  # e.g. where a GGUF backbone came from


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32" | "bfloat16" | "float16"` (or fp32/bf16/fp16, or a torch dtype) → torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


def resolve_dir(
    path_or_id: str | Path, revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local directory as is; anything else is a hub id fetched with `snapshot_download`."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or str(path_or_id).startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path_or_id}")
    from huggingface_hub import snapshot_download

    repo_id = str(path_or_id)

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns
            )
        )

    local = fetch([*_HUB_SMALL_FILES, "*.safetensors"])
    if detect_format(local) == "released" and not list(local.glob("*.safetensors")):
        local = fetch([*_HUB_SMALL_FILES, "*.bin"])  # older repos ship only pytorch_model*.bin
    return local


def detect_format(local_dir: str | Path) -> str:
    """`"gprl"` (has gpm_config.json) or `"released"` (CustomRewardModel / value head weights)."""
    d = Path(local_dir)
    if (d / CONFIG_FILE).is_file():
        return "gprl"
    if (d / "config.json").is_file():
        archs = json.loads((d / "config.json").read_text()).get("architectures") or []
        if "CustomRewardModel" in archs:
            return "released"
        index = next(iter(d.glob("*.index.json")), None)
        if index is not None and VALUE_HEAD in json.loads(index.read_text())["weight_map"]:
            return "released"
    raise ValueError(f"{d} is neither a gprl GPM checkpoint nor a released CustomRewardModel")


def check_heads(heads: Mapping[str, torch.Tensor]) -> tuple[int, bool]:
    """Validate head shapes; return `(K, gated)` inferred from them (K = value_head rows / 2)."""
    if VALUE_HEAD not in heads:
        raise ValueError(f"missing {VALUE_HEAD}")
    rows, hidden = heads[VALUE_HEAD].shape
    if rows % 2 or rows == 0:
        raise ValueError(
            f"{VALUE_HEAD} must have 2K rows, got shape {tuple(heads[VALUE_HEAD].shape)}"
        )
    k = rows // 2
    gate = heads.get(PROMPT_HEAD)
    if gate is not None and tuple(gate.shape) != (k, hidden):
        raise ValueError(f"{PROMPT_HEAD} must be [{k}, {hidden}], got {tuple(gate.shape)}")
    length = heads.get(LENGTH_HEAD)
    if length is not None and tuple(length.shape) != (rows, LENGTH_FEATURES):
        raise ValueError(
            f"{LENGTH_HEAD} must be [{rows}, {LENGTH_FEATURES}], got {tuple(length.shape)}"
        )
    return k, gate is not None


def check_length_scale(length_scale: float | None) -> None:
    if length_scale is not None and not (
        isinstance(length_scale, int | float) and math.isfinite(length_scale) and length_scale > 0
    ):
        raise ValueError(f"length_scale must be a finite number > 0 or null, got {length_scale!r}")


def length_feature(
    response_tokens: torch.Tensor, length_scale: float | None = None
) -> torch.Tensor:
    """`[B] → [B, 2]`: `(log(1 + n), 1)`, n = the response's token count *before* truncation;
    with `length_scale` s, `(n / s, 1)` instead.

    The optional `length_head` [2K, 2] adds `W_len · feature` to the value head's output
    (before L2 normalisation), so a model can see how long a response is even when `max_length`
    cut it. The constant column gives each subspace a fixed direction for length to turn
    against, so a pure length axis needs no help from the hidden states. The log reads only the
    ratio of two lengths, so the same spread in tokens counts for less as answers get longer;
    the linear scale (a checkpoint's `length_scale`) does not.
    """
    check_length_scale(length_scale)
    n = response_tokens.float().clamp_min(0)
    x = torch.log1p(n) if length_scale is None else n / float(length_scale)
    x = x.unsqueeze(-1)
    return torch.cat([x, torch.ones_like(x)], dim=-1)


def _read_tensors(file: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names if n in f.keys()}  # noqa: SIM118
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {n: state[n] for n in names if n in state}


def _read_released_heads(d: Path) -> dict[str, torch.Tensor]:
    names = (VALUE_HEAD, PROMPT_HEAD)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            weight_map = json.loads((d / index).read_text())["weight_map"]
            heads: dict[str, torch.Tensor] = {}
            for name in names:
                if name in weight_map:
                    heads.update(_read_tensors(d / weight_map[name], (name,)))
            return heads
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return _read_tensors(d / single, names)
    raise FileNotFoundError(f"no model weights in {d}")


def _load_hf(src: str | Path, revision: str | None, dtype: torch.dtype, cache_dir: str | None):
    """Base model (hidden states after the final norm) from HF files.

    Attention is transformers' default: SDPA wherever the architecture supports it. Not forced,
    because Gemma-2 (GPM-Gemma-2-*) refuses SDPA: its logit soft-capping needs eager attention.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(src), revision=revision, dtype=dtype, cache_dir=cache_dir)
    return model.base_model.eval()


def _load_tokenizer(src: str | Path, revision: str | None, cache_dir: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src), revision=revision, cache_dir=cache_dir)


def _load_backbone(d: Path, config: GPMConfig, dtype: torch.dtype, cache_dir: str | None):
    """`(base_model, tokenizer, extra info)` for a gprl checkpoint; a tokenizer in `d` wins."""
    spec = config.backbone
    extra: dict[str, str] = {}
    own_tokenizer = (d / "tokenizer_config.json").is_file()
    if spec.startswith("gguf:"):
        gguf_backbone = importlib.import_module("gpm_server.gguf_backbone")  # helper D's module
        model, tokenizer = gguf_backbone.load_gguf_backbone(spec, dtype, cache_dir)
        extra = gguf_backbone.backbone_info(model)  # read before dropping the LM wrapper
        model = model.base_model.eval()
    else:
        local = d / spec
        src: str | Path = local if local.is_dir() else spec
        rev = None if local.is_dir() else config.backbone_revision
        model = _load_hf(src, rev, dtype, cache_dir)
        tokenizer = None if own_tokenizer else _load_tokenizer(src, rev, cache_dir)
    if own_tokenizer:
        tokenizer = _load_tokenizer(d, None, None)
    return model, tokenizer, extra


def load_checkpoint(
    path_or_id: str | Path,
    *,
    tau: float | None = None,
    l2_normalize: bool | None = None,
    max_length: int | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | None = None,
) -> Checkpoint:
    """Load either format; `tau`, `l2_normalize`, `max_length` override stored/default values."""
    d = resolve_dir(path_or_id, revision, cache_dir)
    fmt = detect_format(d)
    torch_dtype = parse_dtype(dtype)
    if fmt == "gprl":
        from safetensors.torch import load_file

        config = GPMConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
        heads = load_file(str(d / HEADS_FILE))
        if check_heads(heads) != (config.k, config.gated):
            raise ValueError(f"{d}: heads do not match k={config.k}, gated={config.gated}")
        backbone, tokenizer, extra = _load_backbone(d, config, torch_dtype, cache_dir)
    else:
        extra = {}
        heads = _read_released_heads(d)
        k, gated = check_heads(heads)
        config = GPMConfig(k=k, gated=gated)
        backbone, tokenizer = _load_hf(d, None, torch_dtype, None), _load_tokenizer(d, None, None)
    overrides = {"tau": tau, "l2_normalize": l2_normalize, "max_length": max_length}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    heads = {name: t.detach().to("cpu", torch.float32) for name, t in heads.items()}
    return Checkpoint(backbone, tokenizer, heads, config, fmt, extra)


def save_gprl_checkpoint(
    out_dir: str | Path,
    heads: Mapping[str, torch.Tensor],
    config: GPMConfig,
    backbone: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write a gprl checkpoint; returns the directory.

    `heads` maps `value_head.weight` [2K, H] (and `prompt_head.weight` [K, H] when gated) to
    tensors; they must agree with `config.k` and `config.gated`. With `backbone` (a transformers
    model) its base model (no LM head) is saved here too and `config.backbone` becomes `"."`;
    otherwise `config.backbone` must name where it lives (directory, hub id or `gguf:...`). A
    `tokenizer` is saved here when given (and then preferred over the backbone's at load time).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if check_heads(heads) != (config.k, config.gated):
        raise ValueError(f"heads do not match k={config.k}, gated={config.gated}")
    if backbone is not None:
        # Only the base model: the GPM never uses an LM head (and loading would warn about it).
        getattr(backbone, "base_model", backbone).save_pretrained(out)
        config = replace(config, backbone=".")
    elif config.backbone == ".":
        raise ValueError("backbone='.' needs the backbone model to save alongside the heads")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    from safetensors.torch import save_file

    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in heads.items()}
    save_file(tensors, str(out / HEADS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out
