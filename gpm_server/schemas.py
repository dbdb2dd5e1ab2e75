"""Every request and response body of the service (pydantic), named in families.

Requests forbid unknown fields (a typo is a 422 naming it, not a silently ignored option) and
reject NaN/inf. Responses never carry NaN: a value that does not exist (the group score of a
group with a single response) is `null`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Role = Literal["system", "user", "assistant"]
MAX_STEP = 2**63 - 1  # SQLite INTEGER (telemetry is keyed by step)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


# --- shared pieces -----------------------------------------------------------------------------


class ChatMessage(_Request):
    role: Role
    content: str


def _prompt_kind(value: Any) -> str:
    return "<text>" if isinstance(value, str) else "<messages>"


# A discriminated union: errors come from the branch that applies, not from both. The tags
# start with "<" so the error mapping can leave them out of field paths.
Prompt = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag("<text>")]
    | Annotated[Annotated[list[ChatMessage], Field(min_length=1)], Tag("<messages>")],
    Discriminator(_prompt_kind),
    Field(
        description="Plain text (one user turn) or a non-empty list of chat messages "
        "(roles system/user/assistant), rendered with the model's chat template."
    ),
]


class Usage(_Response):
    prompt_tokens: int = Field(description="Templated prompt tokens over all sequences.")
    total_tokens: int = Field(description="Tokens over all sequences (prompt + response).")
    sequences: int = Field(description="(prompt, response) sequences run through the model.")


class ErrorDetail(_Response):
    code: str = Field(description="Stable machine-readable code, e.g. `too_large`, `queue_full`.")
    message: str
    field: str | None = Field(None, description="Dotted path of the offending request field.")


class ErrorResponse(_Response):
    error: ErrorDetail


# --- /score ------------------------------------------------------------------------------------


class ScoreGroup(_Request):
    prompt: Prompt
    responses: list[str] = Field(min_length=1, description="The G responses to this prompt.")
    id: str | None = Field(None, max_length=256, description="Echoed back in the result.")


class ScoreRequest(_Request):
    groups: list[ScoreGroup] = Field(min_length=1)
    run_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Training run id; with `step`, the call feeds the drift telemetry.",
    )
    step: int | None = Field(None, ge=0, le=MAX_STEP, description="Training step (needs `run_id`).")
    return_matrix: bool = Field(False, description="Also return the G×G matrix of P(i ≻ j).")

    @model_validator(mode="after")
    def _run_and_step(self) -> ScoreRequest:
        if (self.run_id is None) != (self.step is None):
            raise ValueError("run_id and step must be given together")
        return self


class GroupResult(_Response):
    id: str | None = None
    eigenvalues: list[float] = Field(description="λ(x), [K] (all ones when ungated).")
    embeddings: list[list[float]] = Field(description="Response embeddings v, [G][2K].")
    group_scores: list[list[float | None]] = Field(
        description="ŝ_l(i) = 1/(G−1) Σ_{j≠i} s_l(i, j), [G][K], without λ; null when G = 1."
    )
    rewards: list[float | None] = Field(
        description="Σ_l λ_l ŝ_l(i) / τ, [G]: mean win logit against the rest of the group; "
        "null when G = 1."
    )
    matrix: list[list[float]] | None = Field(
        None, description="P(i ≻ j), [G][G], when `return_matrix` is true."
    )
    truncated: list[bool] = Field(description="[G]: the sequence was cut at max_length.")
    response_tokens: list[int] = Field(description="[G]: tokens after the templated prompt.")


class ScoreResponse(_Response):
    model: str
    k: int
    tau: float
    groups: list[GroupResult]
    usage: Usage


# --- /compare ----------------------------------------------------------------------------------


class ComparePair(_Request):
    prompt: Prompt
    a: str
    b: str
    id: str | None = Field(None, max_length=256)


class CompareRequest(_Request):
    """Either `{"pairs": [...]}` or one pair inline: `{"prompt", "a", "b"}`."""

    pairs: list[ComparePair] | None = Field(None, min_length=1)
    prompt: Prompt | None = None
    a: str | None = None
    b: str | None = None
    id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _one_form(self) -> CompareRequest:
        inline = [self.prompt is not None, self.a is not None, self.b is not None]
        if self.pairs is not None:
            if any(inline) or self.id is not None:
                raise ValueError("give either `pairs` or one inline pair (prompt, a, b), not both")
        elif not all(inline):
            raise ValueError("give `pairs`, or `prompt`, `a` and `b`")
        return self

    def as_pairs(self) -> list[ComparePair]:
        if self.pairs is not None:
            return self.pairs
        return [ComparePair(prompt=self.prompt, a=self.a, b=self.b, id=self.id)]  # type: ignore[arg-type]


class CompareResult(_Response):
    id: str | None = None
    prob_a_wins: float = Field(description="P(a ≻ b) = sigmoid(score / τ).")
    score: float = Field(description="s(a ≻ b) = Σ_l λ_l s_l(a, b).")
    per_dimension: list[float] = Field(description="λ_l s_l(a, b), [K]; sums to `score`.")
    eigenvalues: list[float] = Field(description="λ(x), [K].")
    truncated: list[bool] = Field(description="[a, b] cut at max_length.")


class CompareResponse(_Response):
    model: str
    k: int
    tau: float
    results: list[CompareResult]
    usage: Usage


# --- operations --------------------------------------------------------------------------------


class HealthResponse(_Response):
    status: Literal["ok", "failed"]


class ReadyResponse(_Response):
    ready: bool
    status: Literal["loading", "warming_up", "ready", "draining", "failed"]


class InfoResponse(_Response):
    model: str
    revision: str | None
    source_format: str
    k: int
    tau: float
    gated: bool
    l2_normalize: bool
    dtype: str
    device: str
    max_length: int
    truncation: str
    auth_required: bool
    limits: dict[str, int]
    batching: dict[str, float]
    version: str
    extra: dict[str, Any] = Field(default_factory=dict)


# --- telemetry ---------------------------------------------------------------------------------


class TelemetryStep(_Response):
    """Sums and counts of one step (all lists have length K); see gprl_core/telemetry.py."""

    step: int
    k: int
    n_groups: list[int] = Field(description="Groups with a within-group variance on axis l.")
    sum_x: list[float] = Field(description="Σ over scored responses of x_l = λ_l·ŝ_l.")
    sum_x2: list[float] = Field(description="Σ x_l².")
    sum_within_var: list[float] = Field(
        description="Σ over groups of Var_i(x_l(i)) (ddof 0): ÷ n_groups is the drift statistic."
    )
    sum_eigenvalues: list[float] = Field(description="Σ over groups of λ_l.")
    sum_len_x: list[float] = Field(description="Σ response_tokens · x_l.")
    n_responses: int = Field(description="Scored responses.")
    n_eig_groups: int = Field(description="Groups counted in sum_eigenvalues.")
    sum_len: float = Field(description="Σ response_tokens over scored responses.")
    sum_len2: float = Field(description="Σ response_tokens².")


class TelemetryRecord(TelemetryStep):
    """One keyed record: the stats of one tagged /score call (per group size) on this replica."""

    key: str = Field(description="`Idempotency-Key` of the /score request, then `:<part>`.")


class TelemetryResponse(_Response):
    run_id: str
    steps: list[TelemetryStep] = Field(
        description="Per-step sums; with `by_key=true` only of records stored without a key."
    )
    records: list[TelemetryRecord] | None = Field(
        None, description="Only with `by_key=true`: every keyed record, for a merge by key."
    )


class TelemetryRun(_Response):
    run_id: str
    k: int
    steps: int
    first_step: int
    last_step: int
    records: int = Field(description="Tagged /score calls recorded.")


class TelemetryRunsResponse(_Response):
    runs: list[TelemetryRun]


# --- OpenRLHF ----------------------------------------------------------------------------------


class OpenRLHFRewardRequest(BaseModel):
    """OpenRLHF's remote reward payload (`/openrlhf/reward`); `prompts`/`labels` default to empty
    per query. Unknown fields are ignored, not refused: OpenRLHF versions add their own."""

    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list[Any] | None = None


Series = list[float | None]


class DriftSeriesResponse(BaseModel):
    """Column-major series over the run's T stored steps (per-axis fields: K lists of T)."""

    run_id: str
    k: int
    config: dict[str, float | int | str | list[float] | None] = Field(
        description="The DriftConfig of the replay (`axis_prior`: a list, or null)."
    )
    steps: list[int]
    variance: list[Series] = Field(description="Mean within-group variance of λ_l·ŝ_l.")
    alpha: list[Series] = Field(description="ᾱ_l(t), the EMA of the variance shares.")
    growth: list[Series] = Field(description="g_l(t), an axis's spread against its baseline.")
    weights: list[Series] = Field(description="m_l after the step (replayed controller).")
    drift: Series = Field(description="D(t) = KL(ᾱ(t) ‖ α(0)); null before the baseline.")
    threshold: Series = Field(description="τ_D the controller compared D with.")
    beta: Series
    clip_eps: Series
    active: list[bool] = Field(description="The replayed controller corrected at this step.")
    corrections: list[int] = Field(description="Corrections so far (cumulative).")
    over_exploited: list[int | None] = Field(description="l*, the axis with the largest growth.")
    n_responses: list[int]
    baseline: Series | None = Field(description="α(0) once the baseline steps are in.")
