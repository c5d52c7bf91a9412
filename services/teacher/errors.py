"""The teacher core's typed error: the app maps it to a JSON error with its status."""

from __future__ import annotations


class TeacherError(RuntimeError):
    """A request the teacher refuses; `status` is the HTTP status, `error` a stable code."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
