"""Teacher guidance: the KL variant (`/v1/logits`) and the SFT variant (`/v1/generate`).

Both only ever guide thoughts, never actions (DESIGN §4). When the teacher cannot be reached
after the client's retries, the update runs without guidance and says so loudly (a WARNING
and the metric `teacher/unavailable = 1`), or, with `teacher.on_unavailable: wait`, the
trainer waits for it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from services.trainer.config import TrainConfig
from services.trainer.losses import kl_per_token
from services.trainer.spans import split_spans
from services.trainer.stored_prompt import StoredPrompt
from shared.client import RETRY_STATUS, ServiceError
from shared.schemas import CheckpointUploadResponse, GenerateItem, GenerateRequest, LogitsItem, LogitsRequest, TeacherInfo
from shared.teacher_client import TeacherClient, TeacherReplicas

if TYPE_CHECKING:  # rollout imports this module for the guidance strategies
    from services.trainer.rollout import RolloutStep

log = logging.getLogger(__name__)
R = TypeVar("R")


# --------------------------------------------------------------------------------- strategies


def kl_temperature(cfg: TrainConfig) -> float:
    """The one temperature both KL sides score at: the student's per-thought log-probs in the
    rollout and the teacher's /v1/logits. Untempered logits by default, else the sampling T."""
    return 1.0 if cfg.guidance.kl_temperature == "untempered" else cfg.generation.temperature


class Guidance:
    """What the training loop asks of a guidance mode, one object per `guidance.mode`
    (`make_guidance`); this base is `none`: no teacher, no shaping, no SFT loss."""

    mode = "none"
    uses_teacher = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def student_kl_temperature(self) -> float | None:
        """The rollout keeps each thought token's student log-prob at this temperature (None: not needed)."""
        return None

    @property
    def kl_beta(self) -> float:
        """The coefficient of A' = A - beta * KL_t in build_batch."""
        return 0.0

    def new_buffer(self) -> "ReplayBuffer | None":
        """The SFT replay buffer, saved in checkpoints (None when the mode has no SFT loss)."""
        return None

    def guide(self, link: "TeacherLink | None", steps: "list[RolloutStep]", tokenizer,
              buffer: "ReplayBuffer | None", seed: int) -> dict[str, Any]:
        """Ask the teacher about this update's steps; stores per-step results; returns metrics."""
        return {"teacher/kl_mean": None, "teacher/unavailable": 0}


class KLGuidance(Guidance):
    mode = "kl"
    uses_teacher = True

    @property
    def student_kl_temperature(self) -> float:
        return kl_temperature(self.cfg)

    @property
    def kl_beta(self) -> float:
        return self.cfg.guidance.beta

    def guide(self, link, steps, tokenizer, buffer, seed) -> dict[str, Any]:
        return kl_guidance(link, steps, self.cfg)


class SFTGuidance(Guidance):
    mode = "sft"
    uses_teacher = True

    def new_buffer(self) -> "ReplayBuffer":
        return ReplayBuffer(self.cfg.guidance.sft_buffer_size)

    def guide(self, link, steps, tokenizer, buffer, seed) -> dict[str, Any]:
        return sft_guidance(link, steps, self.cfg, tokenizer, buffer, seed)


GUIDANCE: dict[str, type[Guidance]] = {"none": Guidance, "kl": KLGuidance, "sft": SFTGuidance}


def make_guidance(cfg: TrainConfig) -> Guidance:
    return GUIDANCE[cfg.guidance.mode](cfg)


MAX_UNSENT = 32
"""Adapters kept for re-sending while the teacher is down (fewer when its merge window is smaller)."""


class TeacherLink:
    """The trainer's side of the teacher service, with the unavailable-teacher policy."""

    def __init__(self, cfg: TrainConfig, fingerprint: str | None = None, client: TeacherClient | None = None,
                 rank: int = 0):
        t = cfg.teacher
        self.settings = t
        self.fingerprint = fingerprint
        self.replicas = TeacherReplicas(t.urls, timeout=t.timeout_s, retries=t.retries, start=rank,
                                        clients=[client] if client is not None else None)
        self.client = self.replicas.clients[0]
        self.version_skew = 0
        """Replies this update whose teacher version differs from the newest one seen (replicas or
        a merge landing mid-update); `take_version_skew` reads and resets it."""
        self.merge_above: int | None = None
        """Set by a push that scheduled a merge: the teacher version that push's merge will exceed."""
        self.unsent: dict[int, Path] = {}
        """step -> a copy of the adapter that some replica did not take (it was down); re-sent first."""
        self.lacking: dict[int, set[int]] = {}
        """step -> the replicas (indexes into teacher.url) that still lack that kept adapter."""
        self.keep_unsent = MAX_UNSENT
        """How many unsent adapters the teacher's merge window wants (learned from /v1/teacher)."""
        self._unsent_root: Path | None = None

    def close(self) -> None:
        self.replicas.close()
        if self._unsent_root is not None:
            shutil.rmtree(self._unsent_root, ignore_errors=True)

    def _versions(self, what: str, versions: list[int]) -> int:
        newest = max(versions)
        skew = sum(v != newest for v in versions)
        if skew:
            log.warning("teacher version skew in %s: %d of %d replies not from version %d (versions %s)", what, skew,
                        len(versions), newest, sorted(set(versions)))
        self.version_skew += skew
        return newest

    def take_version_skew(self) -> int:
        n, self.version_skew = self.version_skew, 0
        return n

    def _call(self, what: str, fn: Callable[[], R]) -> R | None:
        """fn(), or None when the teacher is unreachable / not ready after the retries (skip
        policy). Any other error (e.g. 409 tokenizer mismatch) is a configuration problem: raised."""
        deadline = time.monotonic() + self.settings.wait_timeout_s
        while True:
            try:
                return fn()
            except ServiceError as e:
                if e.status is not None and e.status not in RETRY_STATUS:
                    raise
                if self.settings.on_unavailable == "wait" and time.monotonic() < deadline:
                    log.warning("teacher unavailable for %s (%s); waiting for it (teacher.on_unavailable=wait)", what, e)
                    try:
                        self.client.wait_ready(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
                    except ServiceError:
                        pass
                    continue
                log.warning("TEACHER UNAVAILABLE: %s failed after retries (%s); this update runs WITHOUT teacher "
                            "guidance (metric teacher/unavailable=1)", what, e)
                return None

    def logprobs(self, items: list[LogitsItem], temperature: float) -> tuple[int, list] | None:
        def run():
            bs = self.settings.batch_size
            reqs = [LogitsRequest(items=items[i:i + bs], temperature=temperature, tokenizer_fingerprint=self.fingerprint)
                    for i in range(0, len(items), bs)]
            replies = self.replicas.logits(reqs)  # spread over the replicas
            return self._versions("/v1/logits", [r.teacher_version for r in replies]), [x for r in replies for x in r.items]
        return self._call("/v1/logits", run)

    def generate(self, items: list[GenerateItem]) -> tuple[int, list] | None:
        def run():
            bs = self.settings.batch_size
            reqs = [GenerateRequest(items=items[i:i + bs]) for i in range(0, len(items), bs)]
            replies = self.replicas.generate(reqs)
            return self._versions("/v1/generate", [r.teacher_version for r in replies]), [x for r in replies for x in r.items]
        return self._call("/v1/generate", run)

    def info(self) -> TeacherInfo | None:
        """The first reachable replica's /v1/teacher."""
        info = self._call("/v1/teacher", lambda: self.replicas.map(lambda c, _r: c.info(), [None])[0])
        if info is not None:  # only the newest upload counts for `latest` / `none`; the last `window` otherwise
            m = info.merge
            self.keep_unsent = 1 if m.method in ("latest", "none") else min(MAX_UNSENT, m.window or MAX_UNSENT)
        return info

    def infos(self) -> list[TeacherInfo | ServiceError]:
        """Every replica's /v1/teacher (or the error it gave), in `teacher.url` order."""
        return self.replicas.each(lambda c: c.info())

    def traffic(self, route: str) -> list[int]:
        """[calls, request bytes, reply bytes] sent to `route` so far (the client counts them)."""
        per = [getattr(c, "traffic", {}).get(route, [0, 0, 0]) for c in self.replicas.clients]  # all replicas
        return [sum(x) for x in zip(*per, strict=True)]

    def traffic_metrics(self, route: str, before: list[int], prefix: str) -> dict[str, float]:
        """Mean request / reply body size per call since `before` (a `traffic(route)`), in KB."""
        n, sent, recv = (a - b for a, b in zip(self.traffic(route), before, strict=True))
        if n <= 0:
            return {}
        return {f"{prefix}_requests": n, f"{prefix}_request_kb": sent / n / 1024, f"{prefix}_reply_kb": recv / n / 1024}

    def push(self, adapter_dir: Path, step: int) -> CheckpointUploadResponse | None:
        """Upload the adapter of `step` to every teacher replica, so that each merges the same
        checkpoints and reaches the same version.

        A replica that did not take a checkpoint (down, not ready) gets it later: the adapter is
        kept (a copy on disk) with the replicas that lack it, and every push first re-sends the
        kept ones, oldest first, to the replicas that lack them. A replica still lacking an older
        one does not get a newer one before it, so each replica stores them in step order.
        Re-sending one that did arrive is harmless: the teacher dedups the same weights and step.
        Returns a reply of a replica that took this step; None when none did (the update then
        counts as not pushed)."""
        every = set(range(len(self.replicas)))
        blocked: set[int] = set()  # replicas still lacking an older checkpoint
        for old in sorted(self.unsent):
            lacking = self.lacking.get(old, every)
            targets = lacking - blocked
            if targets:
                try:  # not through the unavailable policy: a replica still down must not hold the run
                    took = set(self._push_to(self.unsent[old], old, targets))
                except ServiceError as e:
                    if e.status is not None and e.status not in RETRY_STATUS:
                        raise
                    took = set()
                if took:
                    log.info("re-sent the adapter of update %d to teacher replica(s) %s", old,
                             ", ".join(self.replicas.clients[i].base_url for i in sorted(took)))
                lacking = lacking - took
            blocked |= lacking
            if lacking:
                self.lacking[old] = lacking
            else:
                shutil.rmtree(self.unsent.pop(old), ignore_errors=True)
                self.lacking.pop(old, None)
        targets = every - blocked
        replies = self._call("POST /v1/checkpoints", lambda: self._push_to(adapter_dir, step, targets)) if targets else None
        replies = replies or {}
        lacking = every - set(replies)
        if lacking:
            self._keep_unsent(adapter_dir, step, lacking)
        return replies[min(replies)] if replies else None

    def _keep_unsent(self, adapter_dir: Path, step: int, lacking: set[int]) -> None:
        if self._unsent_root is None:
            self._unsent_root = Path(tempfile.mkdtemp(prefix="gtr-unsent-"))
        dest = self._unsent_root / f"step-{step}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(adapter_dir, dest)
        self.unsent[step], self.lacking[step] = dest, set(lacking)
        for old in sorted(self.unsent)[:-self.keep_unsent]:  # older than the teacher's merge window
            shutil.rmtree(self.unsent.pop(old), ignore_errors=True)
            self.lacking.pop(old, None)
        who = ("the teacher" if len(lacking) == len(self.replicas) else
               "teacher replica(s) " + ", ".join(self.replicas.clients[i].base_url for i in sorted(lacking)))
        log.warning("adapter of update %d not pushed to %s (down, or still lacking an older one): kept, with %d in "
                    "all, to re-send when it is back", step, who, len(self.unsent))

    def _push_to(self, adapter_dir: Path, step: int, targets: set[int]) -> dict[int, CheckpointUploadResponse]:
        """Upload to the replicas in `targets` (in parallel): {replica: reply} of those that took
        it. Raises when none did (the unavailable policy in `_call` decides), or at once on an
        error that is not about availability (a refused upload is a configuration problem)."""
        order = sorted(targets)
        clients = [self.replicas.clients[i] for i in order]
        replies = self.replicas.each(lambda c: c.upload_adapter(adapter_dir, step), clients=clients)
        ok: dict[int, CheckpointUploadResponse] = {}
        for i, c, r in zip(order, clients, replies, strict=True):
            if isinstance(r, ServiceError):
                if r.status is not None and r.status not in RETRY_STATUS:
                    raise r
                log.warning("teacher replica %s did not take checkpoint %d (%s): kept for it, to re-send",
                            c.base_url, step, r)
            else:
                ok[i] = r
        if not ok:
            raise next(r for r in replies if isinstance(r, ServiceError))
        return ok

    def await_pushed_merge(self) -> None:
        """Before asking the teacher: wait (teacher.await_merge_s) for the merge the last push
        scheduled, so this update is guided by the same version in every run with this seed.
        Gives up at once when the teacher is unreachable (the guidance then says so) or reports
        that merge failed (it keeps serving the old version)."""
        above, self.merge_above = self.merge_above, None
        if above is None or self.settings.await_merge_s <= 0:
            return
        deadline = time.monotonic() + self.settings.await_merge_s
        while True:
            info = self.info()
            if info is None or info.version > above:
                return
            if info.last_merge_error and not info.merge_running:
                log.warning("the teacher's merge failed (%s): this update is guided by version %d",
                            info.last_merge_error, info.version)
                return
            if time.monotonic() >= deadline:
                log.warning("the teacher did not serve the merge of the last checkpoint within %.0fs: this update "
                            "is guided by version %d", self.settings.await_merge_s, info.version)
                return
            time.sleep(0.1)

    def wait_for_version(self, above: int, timeout_s: float) -> int | None:
        """Poll /v1/teacher until every replica's version exceeds `above` (a scheduled merge landed);
        the lowest replica version."""
        deadline = time.monotonic() + timeout_s
        version = None
        while time.monotonic() < deadline:
            versions = [i.version for i in self.infos() if not isinstance(i, ServiceError)]
            version = min(versions) if versions else None
            if version is not None and version > above:
                return version
            time.sleep(0.2)
        return version


def push_adapter(link: TeacherLink, policy, step: int, cfg: TrainConfig, known_version: int | None) -> dict[str, Any]:
    """Upload the adapter peft's save_pretrained writes (key names untouched: the teacher maps them)."""
    with tempfile.TemporaryDirectory(prefix="gtr-adapter-") as tmp:
        policy.save_adapter(tmp)
        r = link.push(Path(tmp), step)
    # teacher/replicas_lagging: replicas that lack a checkpoint some other replica has (kept for them).
    lag = {"teacher/unsent": len(link.unsent), "teacher/replicas_lagging": len(set().union(*link.lacking.values()))}
    if r is None:
        return {"teacher/push_failed": 1, **lag}
    m: dict[str, Any] = {"teacher/push_failed": 0, **lag, "teacher/merge_scheduled": int(r.merge_scheduled)}
    if r.merge_scheduled and known_version is not None:
        link.merge_above = known_version  # the next update waits for this merge (await_pushed_merge)
    if cfg.teacher.wait_for_merge_s > 0 and r.merge_scheduled:
        v = link.wait_for_version(known_version if known_version is not None else -1, cfg.teacher.wait_for_merge_s)
        if v is not None:
            m["teacher/version_after_push"] = v
    return m


# --------------------------------------------------------------------------------- KL variant


def kl_guidance(link: TeacherLink, steps: "list[RolloutStep]", cfg: TrainConfig) -> dict[str, Any]:
    """Send each step's chat and its sampled thought tokens to /v1/logits; store KL_t per step.

    Steps with no parseable thought get no KL term (their format penalty already applies).
    """
    g = cfg.guidance
    guided = [s for s in steps if s.thought_ok and s.n_thought > 0]
    m: dict[str, Any] = {"teacher/unavailable": 0, "teacher/guided_frac": len(guided) / max(1, len(steps))}
    if not guided:
        m["teacher/kl_mean"] = 0.0
        info = link.info()  # nothing to score: still say which teacher is current
        m["teacher/version"] = info.version if info else None
        m["teacher/unavailable"] = int(info is None)
        return m
    items = [LogitsItem(messages=s.messages, completion_ids=s.tokens[:s.n_thought]) for s in guided]
    before = link.traffic("/v1/logits")
    res = link.logprobs(items, kl_temperature(cfg))
    m.update(link.traffic_metrics("/v1/logits", before, "teacher/logits"))
    if res is None:
        m.update({"teacher/unavailable": 1, "teacher/kl_mean": None, "teacher/guided_frac": 0.0})
        return m
    version, results = res
    kls, raw = [], []
    for s, r in zip(guided, results, strict=True):
        if list(r.token_ids) != s.tokens[:s.n_thought] or len(r.logprobs) != s.n_thought:
            raise RuntimeError(f"teacher scored other tokens than the {s.n_thought} sampled thought tokens "
                               f"({len(r.logprobs)} log-probs): a different tokenizer?")
        teacher_lp = torch.tensor(r.logprobs, dtype=torch.float32)
        k = kl_per_token(s.student_thought_lp, teacher_lp, g.kl_estimator)
        s.kl, s.kl_tokens, s.teacher_version = float(k.mean()), k.tolist(), version
        kls.append(s.kl)
        raw.append(float((s.student_thought_lp - teacher_lp).mean()))
    m.update({"teacher/kl_mean": float(np.mean(kls)), "teacher/kl_max": float(np.max(kls)),
              "teacher/k1_unclipped_mean": float(np.mean(raw)), "teacher/version": version})
    return m


# --------------------------------------------------------------------------------- SFT variant


@dataclass
class SFTExample:
    prompt: StoredPrompt
    ids: list[int]
    """The teacher's thought tokens followed by the agent's own action tokens."""
    n_thought: int
    """CE applies to ids[:n_thought] only."""


class ReplayBuffer:
    """Bounded FIFO of SFT examples (the oldest go first)."""

    def __init__(self, size: int):
        self.items: deque[SFTExample] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, ex: SFTExample) -> None:
        self.items.append(ex)

    def sample(self, n: int, rng: np.random.Generator) -> list[SFTExample]:
        if not self.items:
            return []
        idx = rng.choice(len(self.items), size=min(n, len(self.items)), replace=False)
        return [self.items[int(i)] for i in idx]

    def state(self) -> list[dict[str, Any]]:
        return [{"prompt": ex.prompt.state(), "ids": torch.tensor(ex.ids, dtype=torch.long), "n_thought": ex.n_thought}
                for ex in self.items]

    def load_state(self, state: list[dict[str, Any]]) -> None:
        self.items.clear()
        for d in state:
            self.items.append(SFTExample(StoredPrompt.from_state(d["prompt"]), d["ids"].tolist(), int(d["n_thought"])))


def sft_guidance(link: TeacherLink, steps: "list[RolloutStep]", cfg: TrainConfig, tokenizer, buffer: ReplayBuffer,
                 seed: int) -> dict[str, Any]:
    """Ask the teacher for a thought on each step's observation; keep the ones that parse."""
    g = cfg.guidance
    items = [GenerateItem(messages=s.messages, max_new_tokens=g.teacher_max_new_tokens or cfg.generation.max_new_tokens,
                          temperature=g.teacher_temperature, seed=seed + i) for i, s in enumerate(steps)]
    m: dict[str, Any] = {"teacher/unavailable": 0, "teacher/kl_mean": None}
    before = link.traffic("/v1/generate")
    res = link.generate(items)
    m.update(link.traffic_metrics("/v1/generate", before, "teacher/generate"))
    if res is None:
        m["teacher/unavailable"] = 1
        m["sft/buffer_size"] = len(buffer)
        return m
    version, results = res
    kept = 0
    for s, r in zip(steps, results, strict=True):
        s.teacher_version = version
        sp = split_spans(tokenizer, r.token_ids)
        if not sp.thought_ok:
            continue  # the teacher's failure is never the agent's penalty: dropped
        # The agent's own action follows the teacher's thought; CE never reaches it (causal, masked).
        own = split_spans(tokenizer, s.tokens)
        action = s.tokens[own.n_thought:] if own.has_action_key else list(r.token_ids[sp.n_thought:])
        buffer.add(SFTExample(s.prompt, list(r.token_ids[:sp.n_thought]) + list(action), sp.n_thought))
        kept += 1
    m.update({"teacher/version": version, "sft/teacher_parse_rate": kept / max(1, len(steps)),
              "sft/added": kept, "sft/buffer_size": len(buffer)})
    return m
