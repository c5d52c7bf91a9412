"""HTTP API schemas of DESIGN §3, imported by both servers and clients.

Request models forbid unknown fields (a typo is a 422, not a silently ignored option);
response models allow extras so that an older client keeps working against a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


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
Seed = Annotated[int, Field(ge=0, le=2**64 - 1, description="A non-negative seed (at most 2^64 - 1).")]


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


class Observation(Response):
    image: str | None = None
    """Base64 PNG, or null for text-only envs."""
    text: str = ""
    """The env's textual observation (ALFWorld's room description, the current formula, ...)."""
    instruction: str = ""
    """The full task prompt the agent should see, with the JSON answer format."""
    admissible_actions: list[str] | None = None


class ObservationSpec(Response):
    """What every observation of an env holds, so a client can declare a true space for it."""

    image_shape: list[int] | None = None
    """[height, width, 3] of every observation image; null: the env sends no image."""
    admissible_actions: bool = False
    """Observations list the admissible actions (ALFWorld); otherwise that field is null."""


class EnvSpec(Response):
    env_id: str
    description: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    """Option names with their defaults."""
    actions: list[str] | None = None
    """The action vocabulary (null where it depends on the state, as in ALFWorld)."""
    max_steps: int | None = None
    observation: ObservationSpec = ObservationSpec()


class EnvList(Response):
    envs: list[EnvSpec]


class CreateSessionRequest(Request):
    env_id: str
    seed: Seed | None = None
    options: EnvOptions = Field(default_factory=dict)


class SessionResponse(Response):
    session_id: str
    observation: Observation
    info: dict[str, Any] = Field(default_factory=dict)


class ResetRequest(Request):
    seed: Seed | None = None
    options: EnvOptions | None = None


class ResetResponse(Response):
    observation: Observation
    info: dict[str, Any] = Field(default_factory=dict)


class StepRequest(Request):
    action: str


class StepResponse(Response):
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


class BatchStepResult(Response):
    """One per step of a batch, in order. A failed session gives `error` and no observation;
    the other steps of the batch still run."""

    session_id: str
    observation: Observation | None = None
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    error: ErrorResponse | None = None
    reset: ResetResponse | None = None
    """With `auto_reset`, when this step ended the episode: the next episode's start."""


# ------------------------------------------------------------------------ teacher service (§3.2)


class ImagePart(Request):
    type: Literal["image"]
    image: str
    """Base64 PNG (a data: URL is accepted)."""


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ImagePart | TextPart]


class LogitsItem(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    completion_ids: list[int] | None = None
    completion_text: str | None = None
    top_k: int | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _one_completion(self):
        if (self.completion_ids is None) == (self.completion_text is None):
            raise ValueError("give exactly one of completion_ids or completion_text")
        return self


class LogitsRequest(Request):
    items: list[LogitsItem] = Field(min_length=1)
    tokenizer_fingerprint: str | None = None
    temperature: float = Field(default=1.0, gt=0)
    """Score under logits / temperature (default untempered, DESIGN §4)."""


class LogitsResult(Response):
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class LogitsResponse(Response):
    teacher_version: int
    items: list[LogitsResult]


class GenerateItem(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    temperature: float = Field(default=1.0, ge=0)
    """0 means greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None


class GenerateRequest(Request):
    items: list[GenerateItem] = Field(min_length=1)


class GenerateResult(Response):
    text: str
    token_ids: list[int]
    logprobs: list[float]


class GenerateResponse(Response):
    teacher_version: int
    items: list[GenerateResult]


MergeMethod = Literal["ties", "linear", "none"]
Weighting = Literal["sma", "ema"]


class MergeSettings(Response):
    method: MergeMethod = "ties"
    density: float = 0.5
    weighting: Weighting = "sma"
    ema_alpha: float = 0.5
    window: int | None = None
    scale: float = 1.0
    merge_every: int = 1


class MergeReport(Response):
    version: int
    seconds: float
    stats: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[str] = Field(default_factory=list)


class TeacherInfo(Response):
    version: int
    backend: str
    base_model: str
    tokenizer_fingerprint: str
    merge: MergeSettings
    checkpoints: int
    last_merge: MergeReport | None = None
    merge_running: bool = False


class CheckpointInfo(Response):
    checkpoint_id: str
    step: int
    created: float
    bytes: int
    rank: int | None = None
    alpha: float | None = None


class CheckpointList(Response):
    checkpoints: list[CheckpointInfo]


class CheckpointUploadResponse(Response):
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
