"""Service settings: one frozen object, read from `GPM_*` environment variables and CLI flags.

Settings are read in factories (`create_app`, the CLI), never at import time. `None` for a model
parameter (τ, normalisation, max length) means "what the checkpoint says".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = str  # "auto", "cpu", "cuda", "cuda:1", "mps", ...
DType = Literal["auto", "float32", "bfloat16", "float16"]
Truncation = Literal["right", "reject"]
LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Everything the verifier service can be configured with (env prefix `GPM_`)."""

    model_config = SettingsConfigDict(
        env_prefix="GPM_", frozen=True, extra="forbid", env_ignore_empty=True
    )

    # --- model -----------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="GPM checkpoint: a local directory (our `gprl` format or a released "
        "`general-preference/GPM-*` directory) or a Hugging Face hub id. None: the embedded "
        "default model shipped with the package.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) when `model` is a hub id."
    )
    device: Device = Field(
        "auto", description="Torch device for the model: auto (cuda when available, else cpu)."
    )
    dtype: DType = Field(
        "auto", description="Compute dtype: auto (bfloat16 on cuda, float32 on cpu) or explicit."
    )
    tau: float | None = Field(
        None,
        gt=0,
        description="Temperature τ in P(i ≻ j) = sigmoid(s/τ). None: the checkpoint's value "
        "(released checkpoints record none: 0.1).",
    )
    l2_normalize: bool | None = Field(
        None,
        description="L2-normalise response embeddings. None: the checkpoint's value "
        "(released checkpoints: true).",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Token limit per (prompt, response) sequence. None: the checkpoint's value.",
    )
    truncation: Truncation = Field(
        "right",
        description="Sequences over max_length: `right` truncates (the last token stays EOS) and "
        "flags them in `truncated`; `reject` answers 413 naming the response.",
    )

    # --- HTTP --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0: any free port).")
    api_key: SecretStr | None = Field(
        None,
        description="When set, every inference route requires `Authorization: Bearer <key>`. "
        "/health and /ready stay open.",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_groups_per_request: int = Field(
        256, ge=1, description="Most groups in one /score request (413 above)."
    )
    max_responses_per_group: int = Field(
        64, ge=1, description="Most responses in one /score group (413 above)."
    )
    max_pairs_per_request: int = Field(
        256, ge=1, description="Most pairs in one /compare request (413 above)."
    )

    # --- micro-batching ---------------------------------------------------------------------
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Token budget of one forward pass, counted padded: longest sequence × count. "
        "A single sequence longer than the budget runs alone.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most sequences in one forward pass.")
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="How long the oldest waiting sequence may wait for company before its batch "
        "is flushed (a full batch flushes at once).",
    )
    max_queue: int = Field(
        4096,
        ge=1,
        description="Most sequences waiting for the model; beyond it requests get 429 "
        "(a request arriving at an empty queue is always accepted).",
    )
    model_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Batches run at once, each on its own model thread. 1 suits GPUs and large "
        "models (intra-op threads use the cores); on CPU a small model gains from N threads with "
        "OMP_NUM_THREADS = cores / N (docs/performance.md). Each adds a batch of activations.",
    )

    max_in_flight: int = Field(
        256,
        ge=1,
        description="Most inference requests (POST) in progress at once; beyond it requests get "
        "429 before their body is read. Bounds the work waiting in front of the model queue "
        "(parsing, tokenization) when requests arrive faster than the process can take them.",
    )

    # --- operations -------------------------------------------------------------------------
    telemetry_db: Path = Field(
        Path("gpm_telemetry.sqlite3"),
        description="SQLite file holding per-run drift telemetry from /score calls with run_id.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long accepted requests get to finish."
    )
    log_level: LogLevel = Field("info", description="Log level (request texts never at info).")

    @field_validator("tau", "max_wait_ms", "drain_timeout_s")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("log_level", "dtype", "truncation", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _key_not_blank(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key must not be blank (unset it to disable authentication)")
        return self

    def resolved_device(self) -> str:
        """`auto` → cuda when available, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        """`auto` → bfloat16 on cuda, float32 elsewhere."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"
