"""HTTP API schemas of DESIGN §3, imported by both servers and clients.

Request models forbid unknown fields (a typo is a 422, not a silently ignored option).
Response models (`DeclaredResponse`) declare every field a service sends: the route's
`response_model` drops anything undeclared, so `/docs` and the typed clients see exactly what
goes over the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, model_validator


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    # extra="allow" only until the env service declares every field it sends (issue 16);
    # new and teacher models derive from DeclaredResponse.
    model_config = ConfigDict(extra="allow")


class DeclaredResponse(BaseModel):
    """Every field declared: `response_model` drops anything else, and a client ignores fields
    it does not know (an older client keeps working against a newer server)."""

    model_config = ConfigDict(extra="ignore")


class ErrorResponse(Response):
    error: str
    detail: str


class Health(Response):
    status: str = "ok"
    service: str = ""


# --------------------------------------------------------------------------- env service (§3.1)

MAX_OPTIONS_DEPTH = 16
"""Env options nest at most this deep (a legal option is a flat value or a short list; a deeper
structure could not even be pickled to an env worker process)."""
Seed = Annotated[int, Field(ge=0, le=2**53, description="A non-negative seed, at most 2^53.")]
"""At most 2^53: exact as a JSON number in every client (a larger bound reads as a float, and a
float-based checker then counts seeds just above it as valid)."""


def _shallow(value: Any) -> Any:
    """Refuse options nested deeper than `MAX_OPTIONS_DEPTH` (iteratively: no recursion limit here)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_OPTIONS_DEPTH:
                raise ValueError(f"options nest deeper than {MAX_OPTIONS_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


EnvOptions = Annotated[dict[str, Any], AfterValidator(_shallow)]


class Observation(DeclaredResponse):
    image: str | None = None
    """Base64 PNG, or null for text-only envs."""
    text: str = ""
    """The env's textual observation (ALFWorld's room description, the current formula, ...)."""
    instruction: str = ""
    """The full task prompt the agent should see, with the JSON answer format."""
    admissible_actions: list[str] | None = None


class ObservationSpec(DeclaredResponse):
    """What every observation of an env holds, so a client can declare a true space for it."""

    image_shape: list[int] | None = None
    """[height, width, 3] of every observation image; null: the env sends no image."""
    admissible_actions: bool = False
    """Observations list the admissible actions (ALFWorld); otherwise that field is null."""


class EnvSpec(DeclaredResponse):
    env_id: str
    description: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    """Option names with their defaults."""
    actions: list[str] | None = None
    """The action vocabulary (null where it depends on the state, as in ALFWorld)."""
    max_steps: int | None = None
    observation: ObservationSpec = ObservationSpec()
    available: bool = True
    """The env can run on this server (its extra is installed, its data is there)."""
    unavailable_reason: str | None = None
    """Why not, and what to install, when `available` is false."""


class EnvList(DeclaredResponse):
    envs: list[EnvSpec]


class CreateSessionRequest(Request):
    env_id: str
    seed: Seed | None = None
    options: EnvOptions = Field(default_factory=dict)


class SessionResponse(DeclaredResponse):
    session_id: str
    observation: Observation
    info: dict[str, Any] = Field(default_factory=dict)


class ResetRequest(Request):
    seed: Seed | None = None
    options: EnvOptions | None = None


class ResetResponse(DeclaredResponse):
    observation: Observation
    info: dict[str, Any] = Field(default_factory=dict)


class StepRequest(Request):
    action: str


class StepResponse(DeclaredResponse):
    observation: Observation
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = Field(default_factory=dict)


class BatchStepItem(Request):
    session_id: str
    action: str


class BatchStepRequest(Request):
    steps: list[BatchStepItem] = Field(min_length=1)
    auto_reset: bool = False
    """Reset a session whose episode ended in the same call (no seed: its generator goes on); the
    new episode's first observation comes back in the result's `reset`."""


class BatchStepResult(DeclaredResponse):
    """One per step of a batch, in order. A failed session gives `error` and no observation;
    the other steps of the batch still run."""

    session_id: str
    observation: Observation | None = None
    """Null when the step failed (see `error`)."""
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    error: ErrorResponse | None = None
    reset: ResetResponse | None = None
    """With `auto_reset`, when this step ended the episode: the next episode's start."""


# ------------------------------------------------------------------------ teacher service (§3.2)

MIN_TEMPERATURE = 1e-3
"""Below this, logits / T overflows fp32 on real logit scales (1e-45 gives NaN log-probs)."""
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
"""Seeds are int64 (torch.Generator, vLLM); 2**64 or a negative seed is a 422, not a 500."""
TokenId = Annotated[int, Field(ge=0)]


def _valid_text(text: str, where: str) -> str:
    """Text must be encodable UTF-8: a lone surrogate (JSON "\\ud800") breaks tokenisers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 text (lone surrogate at {e.start})") from None
    return text


class ImagePart(Request):
    type: Literal["image"]
    image: str
    """Base64 PNG (a data: URL is accepted)."""


class TextPart(Request):
    type: Literal["text"]
    text: str

    @model_validator(mode="after")
    def _utf8(self):
        _valid_text(self.text, "text")
        return self


class ChatMessage(Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ImagePart | TextPart]

    @model_validator(mode="after")
    def _utf8(self):
        if isinstance(self.content, str):
            _valid_text(self.content, "content")
        return self


class LogitsItem(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    completion_ids: list[TokenId] | None = None
    completion_text: str | None = None
    top_k: int | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _one_completion(self):
        if (self.completion_ids is None) == (self.completion_text is None):
            raise ValueError("give exactly one of completion_ids or completion_text")
        if self.completion_text is not None:
            _valid_text(self.completion_text, "completion_text")
        return self


class LogitsRequest(Request):
    items: list[LogitsItem] = Field(min_length=1)
    tokenizer_fingerprint: str | None = None
    temperature: float = Field(default=1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Score under logits / temperature (default untempered, DESIGN §4)."""


class LogitsResult(DeclaredResponse):
    token_ids: list[TokenId]
    logprobs: list[FiniteFloat]
    """log p(token) under the served version; always finite (a NaN is an error, never a value)."""
    top_ids: list[list[TokenId]] | None = None
    top_logprobs: list[list[FiniteFloat]] | None = None


class LogitsResponse(DeclaredResponse):
    teacher_version: int = Field(ge=0)
    items: list[LogitsResult]


class GenerateItem(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    temperature: float = Field(default=1.0, ge=0, le=MAX_TEMPERATURE)
    """0 means greedy; otherwise at least 1e-3."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _temperature(self):
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        return self


class GenerateRequest(Request):
    items: list[GenerateItem] = Field(min_length=1)


class GenerateResult(DeclaredResponse):
    text: str
    token_ids: list[TokenId]
    logprobs: list[FiniteFloat]


class GenerateResponse(DeclaredResponse):
    teacher_version: int = Field(ge=0)
    items: list[GenerateResult]


MergeMethod = Literal["ties", "linear", "none", "latest"]
Weighting = Literal["sma", "ema"]


class MergeSettings(BaseModel):
    """How uploaded checkpoints become the teacher (DESIGN §4). Declared once: `gtr teacher serve`
    derives its flags (`--merge-method`, `--density`, ...) from these fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: MergeMethod = "ties"
    """ties | linear | none (none = the static base model: the paper's ablation) | latest (no merge:
    W0 + the newest upload exactly; the policy service's role, DESIGN §3.4)."""
    density: float = Field(default=0.5, gt=0, le=1)
    """TIES: fraction of each checkpoint's delta kept, by magnitude."""
    weighting: Weighting = "sma"
    """sma (uniform) or ema (alpha (1 - alpha)^age) checkpoint weights."""
    ema_alpha: float = Field(default=0.5, gt=0, le=1)
    """EMA weight alpha in alpha (1 - alpha)^age."""
    window: int | None = Field(default=None, ge=1)
    """Merge only the last N checkpoints (default: all)."""
    scale: float = Field(default=1.0, ge=0, le=10)
    """Multiply the merged delta (a large scale extrapolates past every checkpoint)."""
    merge_every: int = Field(default=1, ge=1)
    """Merge after every N uploads."""


class MergeStats(DeclaredResponse):
    """What a merge did (`merging.ModuleStats.summary` plus timings); absent fields did not apply."""

    method: str
    checkpoints: int = Field(default=0, ge=0)
    modules: int | None = Field(default=None, ge=0)
    entries: int | None = Field(default=None, ge=0)
    sign_conflict_fraction: float | None = Field(default=None, ge=0, le=1)
    kept_density: float | None = Field(default=None, ge=0, le=1)
    norm_ratio: float | None = Field(default=None, ge=0)
    """||tau_merged|| / mean_i ||tau_i|| over all merged modules."""
    merged_norm: float | None = Field(default=None, ge=0)
    mean_checkpoint_norm: float | None = Field(default=None, ge=0)
    weights: list[float] | None = None
    """Each merged checkpoint's weight, oldest first."""
    seconds: float | None = Field(default=None, ge=0)
    merge_seconds: float | None = Field(default=None, ge=0)
    apply_seconds: float | None = Field(default=None, ge=0)
    skipped: str | None = None
    """Why nothing was merged (method none, a backend that takes no checkpoints)."""
    step: int | None = None
    """latest: the served checkpoint's training step."""
    sync: Literal["dense", "lora", "lora+dense"] | None = None
    """latest: how the adapter reached the engine: vLLM's LoRA path, the dense in-place reload (hf, or
    the modules vLLM's LoRA ignores, such as the vision tower), or both."""
    lora_modules: int | None = Field(default=None, ge=0)
    dense_modules: int | None = Field(default=None, ge=0)
    dense_reload: bool | None = None
    """latest on vLLM: the engine's weights were reloaded (a dense part now, or one to undo)."""


class MergeReport(DeclaredResponse):
    version: int = Field(ge=0)
    seconds: float = Field(ge=0)
    stats: MergeStats
    checkpoints: list[str] = Field(default_factory=list)


class RefusedMerge(DeclaredResponse):
    """A merge whose result failed the health checks; the previous version kept serving."""

    at: float
    """Unix time of the refusal."""
    reason: str
    checkpoints: list[str] = Field(default_factory=list)


class TeacherInfo(DeclaredResponse):
    version: int = Field(ge=0)
    backend: str
    base_model: str
    tokenizer_fingerprint: str
    merge: MergeSettings
    checkpoints: int = Field(ge=0)
    last_merge: MergeReport | None = None
    merge_running: bool = False
    last_merge_error: str | None = None
    """The last merge's failure, until a merge succeeds."""
    pending_checkpoints: int = Field(default=0, ge=0)
    """Uploads not yet in the served version."""
    refused_merges: int = Field(default=0, ge=0)
    """Merges refused since start because the result was not finite."""
    last_refused_merge: RefusedMerge | None = None
    served_checkpoints: list[str] = Field(default_factory=list)
    """The checkpoints the served version was built from (latest: the one adapter it serves)."""


class CheckpointInfo(DeclaredResponse):
    checkpoint_id: str
    step: int = Field(ge=0)
    created: float
    bytes: int = Field(ge=0)
    rank: int | None = Field(default=None, ge=1)
    alpha: float | None = None
    modules: int | None = Field(default=None, ge=0)
    """LoRA modules in the adapter."""
    use_rslora: bool | None = None
    refused: bool = False
    """A merge that included it was refused (non-finite teacher): left out of merges."""


class CheckpointList(DeclaredResponse):
    checkpoints: list[CheckpointInfo]


class CheckpointUploadResponse(DeclaredResponse):
    checkpoint_id: str
    merge_scheduled: bool


# ------------------------------------------------------------------------ trainer service (§3.3)


class TrainerStatus(Response):
    phase: str
    """starting | rollout | teacher | ppo | checkpoint | eval | done | failed"""
    update: int
    updates_total: int
    env_steps: int
    success_rate: float | None = None
    mean_return: float | None = None
    teacher_version: int | None = None
    run_dir: str = ""
    guidance: str = "none"
    last_metrics: dict[str, Any] = Field(default_factory=dict)


class ActionResponse(Response):
    ok: bool = True
    detail: str = ""
