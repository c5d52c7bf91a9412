"""The trainer's configuration: YAML presets in configs/, overridden with `--set key=value`.

Every section forbids unknown keys (shared.config.StrictModel), so a typo fails at start-up
with its dotted path. Keys named in the issue are a contract for scripts: `model.path`,
`updates`, `run_dir`, `env.url`, `env.env_id`, `teacher.url`, `guidance.mode`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import StrictModel, load_config, url_list

LANGUAGE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(StrictModel):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """LoRA dropout for `gtr sft`'s training only: rollouts and the PPO update run with dropout
    off (DESIGN §4, §5.6), so the PPO ratio is exactly 1 before the first step."""
    target_modules: list[str] = Field(default_factory=lambda: list(LANGUAGE_TARGETS))
    """Module names inside the language model's layers."""
    vision: bool = False
    """Also put LoRA on the vision tower's linear layers (qkv, proj, MLP). vLLM teachers ignore them."""


class ModelSettings(StrictModel):
    path: str = ""
    """The base model directory (a Qwen2.5-VL-family model, or a `gtr sft` output)."""
    device: str = "auto"
    dtype: str = "auto"
    """Weights dtype: auto = bf16 on GPU, fp32 on CPU."""
    lora: LoraSettings = LoraSettings()
    value_head_hidden: int = Field(default=256, ge=1)
    gradient_checkpointing: bool = False
    autocast: bool = True
    """bf16 autocast for forwards on GPU (never on CPU, where everything runs in fp32)."""
    logprob_chunk: int = Field(default=256, ge=1)
    """Completion positions per chunk when scoring: the fp32 head, log-softmax and entropy run on
    at most this many positions at once (a [chunk, vocab] fp32 tensor: 156 MB at 256 x 152k)."""
    fsdp: bool = False
    """Under torchrun: shard the frozen language-model layers over the ranks with FSDP2's fully_shard
    (LoRA, value head, vision tower, embeddings and head stay replicated); every forward then runs
    on all ranks together (docs/distributed.md). Nothing to shard with one process."""


class EnvSettings(StrictModel):
    url: str | list[str] = "http://127.0.0.1:8100"
    """The env service, or several replicas (a YAML list, or URLs separated by commas): sessions are
    spread over them, and a failed replica's sessions are replaced on the others."""
    env_id: str = "points24"
    options: dict[str, Any] = Field(default_factory=dict)
    num_envs: int = Field(default=4, ge=1)
    num_steps: int = Field(default=8, ge=1)
    """Steps per env per update: one update's batch is num_envs x num_steps."""
    timeout_s: float = 60.0
    retries: int = 4
    """Retries of the idempotent routes (reads, session creation); steps and resets are sent once."""

    @field_validator("url")
    @classmethod
    def _urls(cls, v):
        url_list(v)  # fails at start-up on an empty list
        return v


class TeacherSettings(StrictModel):
    url: str | list[str] = "http://127.0.0.1:8200"
    """One teacher, or replicas: a comma-separated string or a YAML list. Requests spread over
    the replicas; every checkpoint is pushed to each of them."""
    push: Literal["auto", "always", "never"] = "auto"
    """Upload the adapter after each update. auto: when guidance is kl or sft."""
    on_unavailable: Literal["skip", "wait"] = "skip"
    """Teacher unreachable after retries: run the update without guidance (skip), or wait."""
    retries: int = 3
    timeout_s: float = 300.0
    wait_timeout_s: float = 3600.0
    """With on_unavailable=wait: how long to wait before failing the run."""
    batch_size: int = Field(default=16, ge=1)
    """Items per /v1/logits or /v1/generate request."""
    wait_for_merge_s: float = 0.0
    """After a push, poll /v1/teacher up to this long for the new version (0: do not wait)."""
    await_merge_s: float = Field(default=600.0, ge=0)
    """Before the next update asks the teacher, wait up to this long until it serves the merge
    its last push scheduled (the merge runs in the background during the rollout). The guidance
    then never depends on which finished first, so a seeded run is reproducible. 0: use whatever
    version the teacher serves when asked."""
    checkpoints_per_update: Literal[1, "epochs"] = 1
    """1: push the adapter once, after the update. epochs: after every PPO epoch, as the official
    GTR-Turbo code does (more checkpoints in the teacher's window, each one epoch apart)."""

    @field_validator("url")
    @classmethod
    def _urls(cls, v):
        url_list(v)  # fails at start-up on an empty list
        return v

    @property
    def urls(self) -> list[str]:
        return url_list(self.url)


class GuidanceSettings(StrictModel):
    mode: Literal["none", "kl", "sft"] = "none"
    beta: float = Field(default=0.1, ge=0)
    """KL coefficient: A' = A - beta * KL_t."""
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"
    kl_temperature: Literal["untempered", "sampling"] = "untempered"
    """Score both sides from untempered logits (default) or both at the sampling temperature."""
    kl_before_norm: bool = True
    """Subtract beta*KL before advantage normalisation (DESIGN §4) or after it."""
    sft_alpha: float = Field(default=1.0, ge=0)
    sft_buffer_size: int = Field(default=256, ge=1)
    sft_batch_size: int = Field(default=4, ge=1)
    """Replay samples per optimizer step."""
    teacher_max_new_tokens: int | None = None
    """Defaults to generation.max_new_tokens."""
    teacher_temperature: float = Field(default=0.7, ge=0)
    kl_apply: Literal["advantage", "return"] = "advantage"
    """advantage: A' = A - beta*KL_t, value targets untouched (DESIGN §4). return: the official
    GTR-Turbo code's rule, beta*KL_t subtracted from the GAE returns, so it also enters the value
    targets (and, through A = R - V, the advantages)."""
    gate: Literal["none", "teacher_not_worse"] = "none"
    """teacher_not_worse: skip guidance on updates where the latest teacher eval (eval.teacher_every)
    scored below the student; each decision is logged (guidance/gate_open)."""


class EvalSettings(StrictModel):
    teacher_every: int = Field(default=0, ge=0)
    """Every N updates (and once before the first), evaluate the merged teacher as a policy
    (through /v1/generate) and the student on the same fixed seeds (0 = off): the paper's Figure 2."""
    episodes: int = Field(default=16, ge=1)
    seed: int = 200_000
    """Episodes use seeds seed, seed+1, ...: the same for teacher and student at every evaluation."""
    greedy: bool = False
    """Greedy decoding for both (else sampled at generation.temperature, the rollout temperature)."""
    max_steps: int = Field(default=50, ge=1)
    num_envs: int = Field(default=8, ge=1)


class GenerationSettings(StrictModel):
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, ge=1)


class RolloutSettings(StrictModel):
    """Where rollout tokens are sampled (DESIGN §3.4). PPO is exact either way: the old log-prob
    is always the trainer's own fp32 re-score of the sampled tokens."""

    engine: Literal["local", "service"] = "local"
    """local: transformers `generate` inside the trainer. service: the policy service at `url`
    (`gtr policy serve`, vLLM or hf), which the trainer syncs its adapter into before each rollout."""
    url: str | list[str] = "http://127.0.0.1:8400"
    """One policy service, or several replicas (a YAML list or commas): each gets every adapter,
    and rollout batches are spread over them."""
    tis_cap: float | None = Field(default=None, gt=0)
    """Truncated importance sampling: weight each sample's policy loss by
    min(pi_trainer / pi_sampler, tis_cap) (off when null; service engine only)."""
    sync_timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for the policy service to serve a just-uploaded adapter (and to be ready)."""
    timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=3, ge=0)
    batch_size: int = Field(default=64, ge=1)
    """Items per /v1/generate request."""

    @field_validator("url")
    @classmethod
    def _urls(cls, v):
        url_list(v)  # fails at start-up on an empty list
        return v


class RewardSettings(StrictModel):
    format_ok: float = 0.0
    """Added to the env reward when info.format_ok is true (Points24 +3, ALFWorld +5 in the paper)."""
    format_bad: float = 0.0
    """Added when info.format_ok is false (Points24 -2, ALFWorld -5)."""


class PPOSettings(StrictModel):
    lr: float = Field(default=1e-5, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = 0.0
    epochs: int = Field(default=1, ge=1)
    minibatch_size: int = Field(default=16, ge=1)
    """Steps per optimizer step."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Steps per forward: gradients accumulate over minibatch_size / micro_batch_size forwards."""
    clip_coef: float = 0.2
    vf_clip: float | None = 0.2
    """The value loss's own clip range (null: unclipped)."""
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = Field(default=1.0, gt=0)
    gamma: float = 0.9
    gae_lambda: float = 0.95
    norm_adv: bool = True
    thought_coef: float = Field(default=0.5, ge=0)
    """RL4VLM's lambda: log pi = lambda * sum(thought) + sum(action). 0.5 Points24, 0.2 ALFWorld."""


class ServiceSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int | None = 8300
    """0 or null: no HTTP service."""


class DistributedSettings(StrictModel):
    timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait in a collective (torch.distributed's process-group timeout): a rank that died
    or hung stops the others after this long with a message naming the collective."""


class LoggingSettings(StrictModel):
    tensorboard: bool = True
    samples_per_update: int = Field(default=2, ge=0)
    progress: bool = True


class TrainConfig(StrictModel):
    model: ModelSettings = ModelSettings()
    env: EnvSettings = EnvSettings()
    teacher: TeacherSettings = TeacherSettings()
    guidance: GuidanceSettings = GuidanceSettings()
    generation: GenerationSettings = GenerationSettings()
    rollout: RolloutSettings = RolloutSettings()
    reward: RewardSettings = RewardSettings()
    ppo: PPOSettings = PPOSettings()
    trainer: ServiceSettings = ServiceSettings()
    logging: LoggingSettings = LoggingSettings()
    distributed: DistributedSettings = DistributedSettings()
    eval: EvalSettings = EvalSettings()
    updates: int = Field(default=10, ge=1)
    """Total PPO updates of the run (the cosine LR spans all of them)."""
    run_dir: str = "runs/train"
    seed: int = 0
    resume: bool = False
    save_every: int = Field(default=1, ge=1)
    """Save a resumable checkpoint every N updates (and always at the end)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) for the run: what a seeded run on GPU needs (with
    CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment). A seeded CPU run is reproducible without it."""

    @model_validator(mode="after")
    def _check(self):
        if self.ppo.minibatch_size % self.ppo.micro_batch_size:
            raise ValueError("ppo.minibatch_size must be a multiple of ppo.micro_batch_size")
        return self

    @property
    def batch_size(self) -> int:
        return self.env.num_envs * self.env.num_steps

    @property
    def minibatches_per_epoch(self) -> int:
        return math.ceil(self.batch_size / self.ppo.minibatch_size)

    @property
    def total_optimizer_steps(self) -> int:
        return self.updates * self.ppo.epochs * self.minibatches_per_epoch

    def pushes(self) -> bool:
        if self.teacher.push == "auto":
            return self.guidance.mode != "none"
        return self.teacher.push == "always"


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
