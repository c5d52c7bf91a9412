"""Teacher backends behind one interface (`base.TeacherBackend`), imported lazily by name.

`make_backend("hf", model=DIR, device=..., dtype=..., max_tokens=...)`,
`make_backend("vllm", model=DIR, ...)`, `make_backend("openai", model=NAME, base_url=...)`.
"""

from __future__ import annotations

from typing import Any

from services.teacher.backends.base import TeacherBackend

BACKENDS = ("hf", "vllm", "openai")

__all__ = ["BACKENDS", "TeacherBackend", "make_backend"]


def make_backend(name: str, **settings: Any) -> TeacherBackend:
    """Build the backend `name`; optional dependencies are imported only for the one asked for."""
    if name == "hf":
        from services.teacher.backends.hf import HFBackend

        return HFBackend(**settings)
    if name == "openai":
        from services.teacher.backends.openai import OpenAIBackend

        return OpenAIBackend(**settings)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError("the vllm teacher backend needs vLLM: pip install 'gtr-turbo[vllm]' "
                              "(a CUDA machine; see the README's teacher section for the CPU build)") from e
        from services.teacher.backends import vllm as vllm_backend

        cls = getattr(vllm_backend, "VLLMBackend", None)
        if cls is None:
            raise ImportError("services.teacher.backends.vllm defines no VLLMBackend class")
        return cls(**settings)
    raise ValueError(f"unknown teacher backend {name!r}; choose one of {', '.join(BACKENDS)}")
