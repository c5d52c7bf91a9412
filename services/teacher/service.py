"""The teacher's core, backend-agnostic: checkpoint intake, merge scheduling, versions.

It validates uploads against `backend.base_parameters()`, stores them, merges the chosen
checkpoints into one delta per base parameter (`merging.merge_adapters`) in a background
thread, and hands that delta to `backend.apply_delta(delta, version)`. The backend swaps it in
whole; requests keep being served by the previous version meanwhile.
"""

from __future__ import annotations

import hashlib
import math
import logging
import threading
import time

import torch

from pydantic import ValidationError

from shared.codecs import image_to_b64
from shared.schemas import (ChatMessage, CheckpointInfo, GenerateRequest, GenerateResult, ImagePart, LogitsItem,
                            LogitsRequest, LogitsResult, MergeReport, MergeSettings, MergeStats, RefusedMerge,
                            TeacherInfo, TextPart)
from services.teacher.adapters import Adapter, parse_adapter
from services.teacher.backends.base import TeacherBackend
from services.teacher.errors import (BaseMismatch, InvalidInput, MergeRefused, NonFiniteOutput, TooLarge,
                                     Unsupported)
from services.teacher.merging import merge_adapters, merge_weights
from services.teacher.store import CheckpointStore, StoredCheckpoint

log = logging.getLogger(__name__)


class TeacherService:
    def __init__(self, backend: TeacherBackend, store: CheckpointStore, merge: MergeSettings | None = None,
                 max_upload_bytes: int = 1 << 30, merge_device: str = "cpu", background: bool = True):
        self.backend = backend
        self.store = store
        self.settings = merge or MergeSettings()
        self.max_upload_bytes = max_upload_bytes
        self.merge_device = merge_device
        self.version = 0
        self.last_merge: MergeReport | None = None
        self.last_merge_error: str | None = None
        self.refused_merges = 0
        self.last_refused_merge: RefusedMerge | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._merge_lock = threading.Lock()
        self._merge_running = False
        self._bg_busy = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._base_shapes = backend.base_parameters()
        self._restore()
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._loop, name="teacher-merge", daemon=True)
            self._worker.start()
            if self._pending >= self.settings.merge_every and self._mergeable:
                self._wake.set()

    @property
    def _mergeable(self) -> bool:
        return self.settings.method != "none" and self.backend.supports_merge

    # ------------------------------------------------------------------ info

    def info(self) -> TeacherInfo:
        return TeacherInfo(version=self.version, backend=self.backend.name, base_model=self.backend.base_model,
                           tokenizer_fingerprint=self.backend.tokenizer_fingerprint, merge=self.settings,
                           checkpoints=len(self.store), last_merge=self.last_merge,
                           merge_running=self._merge_running, last_merge_error=self.last_merge_error,
                           pending_checkpoints=self._pending, refused_merges=self.refused_merges,
                           last_refused_merge=self.last_refused_merge,
                           served_checkpoints=list(self.last_merge.checkpoints) if self.last_merge else [])

    @staticmethod
    def checkpoint_info(c: StoredCheckpoint) -> CheckpointInfo:
        return CheckpointInfo(checkpoint_id=c.checkpoint_id, step=c.step, created=c.created, bytes=c.bytes,
                              rank=c.rank, alpha=c.alpha, modules=c.modules, use_rslora=c.use_rslora,
                              refused=c.refused)

    # ------------------------------------------------------------------ serving

    def logprobs(self, req: LogitsRequest) -> tuple[int, list[LogitsResult]]:
        """(version, results) of /v1/logits; refuses a tokenizer that is not the teacher's."""
        ours = self.backend.tokenizer_fingerprint
        if req.tokenizer_fingerprint and req.tokenizer_fingerprint != ours:
            raise BaseMismatch(f"tokenizer fingerprint {req.tokenizer_fingerprint} is not the teacher's ({ours}): "
                               "token ids would not line up", "tokenizer_mismatch")
        return self.backend.logprobs(req.items, req.temperature)

    def generate(self, req: GenerateRequest) -> tuple[int, list[GenerateResult]]:
        return self.backend.generate(req.items)

    # ------------------------------------------------------------------ checkpoints

    def add_checkpoint(self, model_bytes: bytes, config_bytes: bytes, step: int,
                       base_fingerprint: str | None = None) -> tuple[StoredCheckpoint, bool]:
        """Validate and store an upload; (record, merge_scheduled). Nothing is stored on error."""
        if not self.backend.supports_merge:
            raise Unsupported(f"the {self.backend.name} backend serves an external model: it takes no checkpoints")
        size = len(model_bytes) + len(config_bytes)
        if size > self.max_upload_bytes:
            raise TooLarge(f"upload of {size} bytes exceeds the limit of {self.max_upload_bytes}")
        if step < 0:
            raise InvalidInput(f"step must be >= 0, got {step}")
        if base_fingerprint is not None:
            ours = self.backend.model_fingerprint()
            if ours is not None and base_fingerprint != ours:
                raise BaseMismatch(f"adapter was trained on base {base_fingerprint}, this teacher serves {ours}")
        adapter = parse_adapter(model_bytes, config_bytes, self._base_shapes)
        same = self.store.find(hashlib.sha256(model_bytes).hexdigest(), hashlib.sha256(config_bytes).hexdigest(), step)
        if same is not None and self.settings.method == "latest" and same.seq != max(c.seq for c in self.store.list()):
            same = None  # latest serves the newest upload: an older twin must become the newest again
        if same is not None:
            # A client retrying an upload whose reply it lost: don't count the checkpoint twice.
            # The config is part of the key: the same weights under another alpha are another delta.
            log.info("upload repeats checkpoint %s (same weights, config and step): not stored again",
                     same.checkpoint_id)
            return same, False
        item = self.store.add(model_bytes, config_bytes, step, rank=adapter.rank, alpha=adapter.alpha,
                              use_rslora=adapter.use_rslora, modules=len(adapter.factors))
        with self._lock:
            self._pending += 1
            scheduled = self._mergeable and self._pending >= self.settings.merge_every
        if scheduled:
            self._wake.set()
        return item, scheduled

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        """Remove a checkpoint. The served teacher keeps its weights until the next merge."""
        self.store.delete(checkpoint_id)

    def _load(self, items: list[StoredCheckpoint]) -> tuple[list[Adapter], list[StoredCheckpoint]]:
        """The adapters of `items` that still pass validation, and those items. A checkpoint
        stored before a check existed (a poisoned one) is left out of every merge, loudly."""
        adapters, kept = [], []
        for c in items:
            model_bytes, config_bytes = self.store.files(c.checkpoint_id)
            try:
                adapters.append(parse_adapter(model_bytes, config_bytes, self._base_shapes))
            except (InvalidInput, BaseMismatch) as e:
                log.error("checkpoint %s fails validation and is left out of the merge: %s", c.checkpoint_id, e)
                continue
            kept.append(c)
        return adapters, kept

    def _select(self, settings: MergeSettings) -> list[StoredCheckpoint]:
        items = [c for c in self.store.list() if not c.refused]
        if settings.method == "latest":  # the newest upload, whatever its step (a new run may restart at 1)
            return [max(items, key=lambda c: c.seq)] if items else []
        return items[-settings.window:] if settings.window else items

    # ------------------------------------------------------------------ merging

    def merge_now(self) -> MergeReport:
        """Merge the selected checkpoints and serve the result as the next version."""
        if not self._mergeable:
            why = "merge method is none (static base teacher)" if self.backend.supports_merge else \
                f"the {self.backend.name} backend takes no checkpoints"
            return MergeReport(version=self.version, seconds=0.0, stats=MergeStats(method="none", skipped=why),
                               checkpoints=[])
        with self._merge_lock:
            with self._lock:
                pending_before = self._pending
                self._merge_running = True
            try:
                items = self._select(self.settings)
                report = self._build(items, self.settings, self.version + 1)
            except MergeRefused as e:
                self._refuse(e, items, quarantine=True)
                raise
            except Exception as e:
                self.last_merge_error = f"{type(e).__name__}: {e}"
                raise
            finally:
                self._merge_running = False
            with self._lock:
                # Uploads that arrived during the merge still count towards the next one.
                self._pending = max(0, self._pending - pending_before)
            self.last_merge_error = None
            return report

    def _build(self, items: list[StoredCheckpoint], settings: MergeSettings, version: int,
               exact: bool = False) -> MergeReport:
        """Merge `items` and serve the result as `version`. `exact`: every item must still pass
        validation (a restart rebuilding a recorded version), else MergeRefused."""
        t0 = time.perf_counter()
        adapters, kept = self._load(items)
        if exact and len(kept) != len(items):
            bad = sorted({c.checkpoint_id for c in items} - {c.checkpoint_id for c in kept})
            raise MergeRefused(f"checkpoints {bad} of version {version} fail validation")
        items = kept
        if settings.method == "latest" and items:
            # The policy role (DESIGN §3.4): W0 + this one adapter exactly, no merge. The backend
            # picks how (vLLM: its LoRA path, the dense reload for what that path ignores).
            load_s = time.perf_counter() - t0
            stats = {"method": "latest", "checkpoints": 1, "step": items[-1].step,
                     **self.backend.apply_adapter(adapters[-1], version)}
            return self._record(items[-1:], settings, version, stats, load_s, t0)
        delta, stats = self._merged_delta(adapters, settings)
        merge_s = time.perf_counter() - t0
        # hf probes the new weights before any request sees them (MergeRefused if not finite);
        # a backend that cannot (vLLM) is probed right after, and rolled back on failure.
        self.backend.apply_delta(delta, version)
        if not self.backend.probes_before_swap:
            try:
                self._probe_served()
            except MergeRefused:
                self._roll_back()
                raise
        return self._record(items, settings, version, stats, merge_s, t0)

    def _merged_delta(self, adapters: list[Adapter], settings: MergeSettings) -> tuple[dict | None, dict]:
        if not adapters:
            return None, {"method": settings.method, "checkpoints": 0}
        weights = merge_weights(len(adapters), settings.weighting, settings.ema_alpha)
        result = merge_adapters(adapters, weights, settings.method, settings.density, settings.scale,
                                device=self.merge_device)
        delta, stats = result.delta, result.stats
        stats["weights"] = [round(float(w), 6) for w in weights]
        bad = [n for n, t in delta.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise MergeRefused(f"the merged delta is not finite in {len(bad)} parameters ({bad[:3]})")
        return delta, stats

    def _probe_served(self) -> None:
        """Score a fixed chat (a small image and text: the vision tower takes part too) under the
        weights now served; MergeRefused if not finite. Text alone on a text-only model."""
        from PIL import Image

        image = ImagePart(type="image", image=image_to_b64(Image.new("RGB", (56, 56), (90, 30, 200))))
        text = TextPart(type="text", text="probe: which action?")
        for content in ([image, text], [text]):
            item = LogitsItem(messages=[ChatMessage(role="user", content=content)], completion_text='{"action": "+"}')
            try:
                self.backend.logprobs([item])
                return
            except NonFiniteOutput as e:
                raise MergeRefused("a probe request under the merged weights gave non-finite log-probs") from e
            except InvalidInput:  # a text-only model refuses the image: probe with text alone
                continue

    def _roll_back(self) -> None:
        """Serve the previous version's weights again (rebuilt from its checkpoints)."""
        prev = self.last_merge
        known = {c.checkpoint_id for c in self.store.list()}
        items = [self.store.get(i) for i in (prev.checkpoints if prev else []) if i in known]
        adapters, _ = self._load(items)
        delta, _ = self._merged_delta(adapters, self.settings) if prev else (None, {})
        self.backend.apply_delta(delta, self.version)
        log.warning("rolled back to version %d after a refused merge", self.version)

    def _record(self, items: list[StoredCheckpoint], settings: MergeSettings, version: int, stats: dict,
                merge_s: float, t0: float) -> MergeReport:
        seconds = time.perf_counter() - t0
        stats["merge_seconds"] = merge_s
        stats["apply_seconds"] = seconds - merge_s
        ids = [c.checkpoint_id for c in items]
        # Norms of huge (still finite) deltas overflow: such a statistic is unknown, not a number.
        stats = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
        report = MergeReport(version=version, seconds=seconds, stats=MergeStats(**stats), checkpoints=ids)
        with self._lock:
            self.version = version
            self.last_merge = report
        self.store.write_state({"version": version, "checkpoints": ids, "settings": settings.model_dump(),
                                "report": report.model_dump()})
        log.info("teacher version %d from %d checkpoints in %.2fs: %s", version, len(ids), seconds,
                 {k: v for k, v in stats.items() if k != "weights"})
        return report

    def _refuse(self, e: MergeRefused, items: list[StoredCheckpoint], quarantine: bool = False) -> None:
        """Record a refused merge: GET /v1/teacher reports it; the previous version keeps serving.

        `quarantine`: the checkpoints new since the served version are the suspects; they are
        marked refused and left out of later merges, so one bad upload does not block every
        merge after it (the client may re-upload a fixed adapter).
        """
        refused = RefusedMerge(at=time.time(), reason=e.detail, checkpoints=[c.checkpoint_id for c in items])
        if quarantine:
            served = set(self.last_merge.checkpoints) if self.last_merge else set()
            for c in items:
                if c.checkpoint_id not in served:
                    self.store.mark_refused(c.checkpoint_id)
        with self._lock:
            self.refused_merges += 1
            self.last_refused_merge = refused
        log.error("merge refused, still serving version %d: %s (checkpoints %s)", self.version, e.detail,
                  refused.checkpoints)

    def _restore(self) -> None:
        """Rebuild the teacher version recorded in the store (same checkpoints, same settings)."""
        state = self.store.read_state()
        known = {c.checkpoint_id for c in self.store.list()}
        if not state or not self.backend.supports_merge:
            self._pending = len(known)
            return
        version, ids = int(state.get("version", 0)), list(state.get("checkpoints", []))
        served = set(ids)
        self._pending = sum(1 for c in self.store.list() if c.checkpoint_id not in served
                            and c.seq > max((self.store.get(i).seq for i in ids if i in known), default=0))
        if version == 0:
            return
        try:
            settings = MergeSettings.model_validate(state.get("settings", {}))
        except ValidationError as e:
            log.warning("state.json has unusable merge settings (%s): rebuilding with the current ones", e)
            settings = self.settings
        missing = [i for i in ids if i not in known]
        items = [self.store.get(i) for i in ids if i in known]
        if not missing and (settings.method == "none" or not items):
            self.backend.apply_delta(None, version)
            self.version = version
            return
        try:
            if not missing:
                self._build(items, settings, version, exact=True)
                log.info("restored teacher version %d from %d checkpoints", version, len(items))
                return
            log.warning("checkpoints %s of teacher version %d are gone; merging the store as version %d",
                        missing, version, version + 1)
        except MergeRefused as e:
            # A recorded version that fails today's checks (stored before they existed) must not
            # come back: build a new version from what passes them.
            self._refuse(e, items)
        # The exact version cannot be rebuilt: build a new one from what the store holds.
        self.version = version
        try:
            if self._mergeable:
                self._build(self._select(self.settings), self.settings, version + 1)
                return
        except MergeRefused as e:
            self._refuse(e, self._select(self.settings))
        self.backend.apply_delta(None, version + 1)  # the base, as a new version
        self.version = version + 1
        self.store.write_state({"version": self.version, "checkpoints": [], "settings": self.settings.model_dump()})

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._bg_busy = True
            self._wake.clear()
            try:
                self.merge_now()
            except Exception:  # noqa: BLE001 - a failed merge keeps the old version serving
                log.exception("background merge failed; still serving version %d", self.version)
            finally:
                self._bg_busy = False
            with self._lock:
                again = self._mergeable and self._pending >= self.settings.merge_every
            if again:
                self._wake.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no merge is scheduled or running (for tests and clean shutdowns)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (self._wake.is_set() or self._bg_busy or self._merge_lock.locked()):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.backend.close()
