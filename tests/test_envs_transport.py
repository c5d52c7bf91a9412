"""A worker's exception crosses its pipe as itself when it can be rebuilt there, else as a
RuntimeError that names it (an env's own exception type may not survive unpickling)."""

from services.envs.base import EnvOptionError
from services.envs.transport import _portable


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # pickled with args=(message,), so it cannot be rebuilt
        super().__init__(f"{a}/{b}")


def test_a_typed_error_crosses_as_itself():
    e = EnvOptionError("bad option")
    assert _portable(e) is e


def test_an_error_that_cannot_be_rebuilt_crosses_as_a_named_stand_in():
    out = _portable(NeedsTwoArgs(1, 2))
    assert type(out) is RuntimeError and "NeedsTwoArgs" in str(out) and "1/2" in str(out)
