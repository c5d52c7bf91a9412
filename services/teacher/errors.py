"""The teacher core's typed errors. They know no HTTP: `app.py` maps each class to a status once.

Every error carries a stable `code` (clients and tests match on it) and a human `detail`.
Subclasses set a default code; a raise site may name a more precise one
(`InvalidInput("bad_adapter", ...)`).
"""

from __future__ import annotations


class TeacherError(Exception):
    """Base of everything the teacher (core or backend) refuses to do."""

    code = "teacher_error"

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def __reduce__(self):  # picklable with its code (vLLM workers send errors across processes)
        return (type(self), (self.detail, self.code))


class InvalidInput(TeacherError):
    """Malformed input: an adapter, image, token id, prompt or setting the teacher cannot use."""

    code = "bad_request"


class BaseMismatch(TeacherError):
    """An adapter trained on another base model, or a tokenizer that is not the teacher's."""

    code = "base_mismatch"


class UnknownCheckpoint(TeacherError):
    code = "unknown_checkpoint"


class TooLarge(TeacherError):
    """An upload, prompt or batch over the configured limits."""

    code = "too_large"


class Unsupported(TeacherError):
    """What this backend cannot do (uploads to the openai backend, /v1/logits there)."""

    code = "not_implemented"


class MergeRefused(TeacherError):
    """A merge whose result failed the health checks: the previous version keeps serving."""

    code = "merge_refused"


class StoreFailed(TeacherError):
    """The checkpoint store could not be written (disk full, permissions)."""

    code = "store_failed"


class NotReady(TeacherError):
    """The engine is not usable (still loading, or a probe failed)."""

    code = "not_ready"


class NonFiniteOutput(TeacherError):
    """The model produced NaN/inf: never sent as a log-prob."""

    code = "non_finite"


class UpstreamError(TeacherError):
    """The external endpoint of the openai backend failed."""

    code = "upstream_error"
