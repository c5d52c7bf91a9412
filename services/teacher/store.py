"""The checkpoint store: uploaded adapters plus metadata on the teacher's volume.

Layout under the store directory:

    checkpoints/<checkpoint_id>/adapter_model.safetensors
    checkpoints/<checkpoint_id>/adapter_config.json
    checkpoints/<checkpoint_id>/meta.json
    state.json          the served teacher: version, the checkpoints and settings it was merged from
    tmp/                staging area; anything left there after a crash is removed at start

Every write goes to a fresh directory (or file) under `tmp/`, is fsynced, then `os.replace`d
into place: a crash leaves either the old store or the new one, never half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.teacher.errors import StoreFailed, UnknownCheckpoint

log = logging.getLogger(__name__)

MODEL_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
META_FILE = "meta.json"


@dataclass
class StoredCheckpoint:
    checkpoint_id: str
    seq: int
    """Upload order (monotonic within a store): the merge order of checkpoints with equal step."""
    step: int
    created: float
    bytes: int
    rank: int
    alpha: float
    use_rslora: bool
    modules: int
    sha256: str
    """Of the adapter weights."""
    config_sha256: str | None = None
    """Of the adapter config (None in stores written before it was recorded)."""
    refused: bool = False
    """A merge that first included it gave a non-finite teacher: left out of every merge since."""

    @property
    def order(self) -> tuple[int, int]:
        return (self.step, self.seq)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CheckpointStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.tmp_dir = self.root / "tmp"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.tmp_dir.exists():  # debris of an interrupted write: never part of the store
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._items: dict[str, StoredCheckpoint] = {}
        for d in sorted(self.ckpt_dir.iterdir()):
            try:
                meta = json.loads((d / META_FILE).read_text())
                item = StoredCheckpoint(**meta)
                if not (d / MODEL_FILE).exists() or not (d / CONFIG_FILE).exists():
                    raise FileNotFoundError("adapter files missing")
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable checkpoint directory %s: %s", d, e)
                continue
            self._items[item.checkpoint_id] = item
        self._next_seq = max((c.seq for c in self._items.values()), default=0) + 1
        log.info("checkpoint store %s: %d checkpoints", self.root, len(self._items))

    def list(self) -> list[StoredCheckpoint]:
        """Checkpoints oldest -> newest (by training step, then upload order)."""
        with self._lock:
            return sorted(self._items.values(), key=lambda c: c.order)

    def get(self, checkpoint_id: str) -> StoredCheckpoint:
        with self._lock:
            item = self._items.get(checkpoint_id)
        if item is None:
            raise UnknownCheckpoint(f"no checkpoint {checkpoint_id!r}")
        return item

    def find(self, sha256: str, config_sha256: str, step: int) -> StoredCheckpoint | None:
        """The stored checkpoint with these exact adapter weights, config and step, if any."""
        with self._lock:
            return next((c for c in self._items.values()
                         if (c.sha256, c.config_sha256, c.step) == (sha256, config_sha256, step)), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def files(self, checkpoint_id: str) -> tuple[bytes, bytes]:
        self.get(checkpoint_id)
        d = self.ckpt_dir / checkpoint_id
        return (d / MODEL_FILE).read_bytes(), (d / CONFIG_FILE).read_bytes()

    def add(self, model_bytes: bytes, config_bytes: bytes, step: int, rank: int, alpha: float,
            use_rslora: bool, modules: int) -> StoredCheckpoint:
        """Store a validated upload atomically; returns its record."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        cid = f"ckpt-{seq:06d}-step{step}"
        item = StoredCheckpoint(checkpoint_id=cid, seq=seq, step=step, created=time.time(),
                                bytes=len(model_bytes) + len(config_bytes), rank=rank, alpha=alpha,
                                use_rslora=use_rslora, modules=modules,
                                sha256=hashlib.sha256(model_bytes).hexdigest(),
                                config_sha256=hashlib.sha256(config_bytes).hexdigest())
        stage = self.tmp_dir / f"{cid}.{uuid.uuid4().hex}"
        try:
            stage.mkdir()
            _fsync_write(stage / MODEL_FILE, model_bytes)
            _fsync_write(stage / CONFIG_FILE, config_bytes)
            _fsync_write(stage / META_FILE, json.dumps(asdict(item), indent=1).encode())
            os.replace(stage, self.ckpt_dir / cid)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            raise StoreFailed(f"could not write checkpoint: {e}") from e
        with self._lock:
            self._items[cid] = item
        log.info("stored checkpoint %s (step %d, %d bytes)", cid, step, item.bytes)
        return item

    def mark_refused(self, checkpoint_id: str) -> None:
        """Flag a checkpoint as refused (its meta.json rewritten atomically)."""
        item = self.get(checkpoint_id)
        item.refused = True
        tmp = self.tmp_dir / f"meta.{uuid.uuid4().hex}.json"
        _fsync_write(tmp, json.dumps(asdict(item), indent=1).encode())
        os.replace(tmp, self.ckpt_dir / checkpoint_id / META_FILE)
        log.warning("checkpoint %s refused: left out of merges from now on", checkpoint_id)

    def delete(self, checkpoint_id: str) -> None:
        self.get(checkpoint_id)
        # Move out of the store first (atomic), then remove: a crash never leaves half a checkpoint.
        trash = self.tmp_dir / f"deleted-{checkpoint_id}.{uuid.uuid4().hex}"
        os.replace(self.ckpt_dir / checkpoint_id, trash)
        with self._lock:
            self._items.pop(checkpoint_id, None)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted checkpoint %s", checkpoint_id)

    # ------------------------------------------------------------------ served-teacher state

    def read_state(self) -> dict[str, Any] | None:
        f = self.root / "state.json"
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", f, e)
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.tmp_dir / f"state.{uuid.uuid4().hex}.json"
        _fsync_write(tmp, json.dumps(state, indent=1).encode())
        os.replace(tmp, self.root / "state.json")
