"""The interface every teacher backend implements (hf, vllm, openai).

The service core (checkpoint store, merging, versioning) is backend-agnostic: it computes the
merged delta `tau` per base parameter and hands it to `apply_delta`; the backend serves
`W0 + tau` from then on. Parameter names are the base model's transformers names, as in
`AutoModelForImageTextToText.from_pretrained(...).named_parameters()`
(e.g. `model.language_model.layers.0.self_attn.q_proj.weight`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from shared.schemas import GenerateItem, GenerateResult, LogitsItem, LogitsResult
from shared.chat import MAX_TEXT_BYTES, ChatInputError, PromptTooLarge, check_text
from shared.codecs import CodecError
from services.teacher.errors import InvalidInput, NonFiniteOutput, TooLarge

if TYPE_CHECKING:
    from services.teacher.adapters import Adapter


@contextmanager
def client_input():
    """Turn the input errors of shared.chat / shared.codecs into the teacher's typed errors."""
    try:
        yield
    except PromptTooLarge as e:
        raise TooLarge(str(e)) from e
    except ChatInputError as e:
        raise InvalidInput(str(e), "bad_prompt") from e
    except CodecError as e:
        raise InvalidInput(str(e), "bad_image") from e


def completion_text(text: str, index: int) -> str:
    """A completion given as text, checked like message text before it is tokenised."""
    if len(text) > MAX_TEXT_BYTES or len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
        raise TooLarge(f"item {index}: completion_text exceeds {MAX_TEXT_BYTES} bytes")
    with client_input():
        return check_text(text, f"item {index}: completion_text")


def check_finite(values: torch.Tensor | list[float], what: str) -> None:
    """Raise NonFiniteOutput unless every value is finite: a response never carries NaN or inf
    (JSON would turn them into null, and a KL-guided trainer dies on them an update later)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteOutput(f"{what} are not finite: the served weights or this input make the model overflow")


class TeacherBackend(ABC):
    """Backends raise the typed errors of `services.teacher.errors` (InvalidInput, TooLarge, ...)."""

    name: str = "base"
    probes_before_swap: bool = False
    """True when `apply_delta` itself checks the new weights (a probe forward) before any request
    sees them and restores the old ones on failure (hf). Otherwise the service probes right after
    and rolls back."""
    supports_merge: bool = True
    """False for backends that serve an external model (openai): uploads answer 501."""

    @property
    @abstractmethod
    def base_model(self) -> str:
        """A human-readable id of the base model (its directory)."""

    @property
    @abstractmethod
    def tokenizer_fingerprint(self) -> str:
        """`shared.models.tokenizer_fingerprint` of the tokenizer this backend scores with."""

    @abstractmethod
    def base_parameters(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the base model's parameters by name: uploads are validated against them."""

    def model_fingerprint(self) -> str | None:
        """`shared.models.model_fingerprint` of the base config, or None if unknown.

        Optional: an upload's `base_fingerprint` form field is compared to it (409 on mismatch).
        """
        return None

    @abstractmethod
    def apply_delta(self, delta: dict[str, torch.Tensor] | None, version: int) -> None:
        """Serve `W0 + delta` (exactly; `None` = the base weights) as `version` from now on.

        Atomic from the requests' point of view: a request is served wholly by the old or
        wholly by the new weights, and reports the version that served it.
        """

    def apply_adapter(self, adapter: "Adapter", version: int) -> dict[str, Any]:
        """Serve `W0 + adapter` (one LoRA adapter, exactly: no merge) as `version`; returns stats.

        The policy role (`--merge-method latest`, DESIGN §3.4). This default folds the adapter's
        full delta `scaling * B @ A` into the weights through `apply_delta`; the vllm backend
        overrides it with vLLM's own LoRA support (adapter-only sync).
        """
        delta = {name: f.delta() for name, f in adapter.factors.items()}
        self.apply_delta(delta, version)
        return {"sync": "dense", "dense_modules": len(delta), "lora_modules": 0}

    @abstractmethod
    def logprobs(self, items: list[LogitsItem], temperature: float = 1.0) -> tuple[int, list[LogitsResult]]:
        """(version, results): the log-prob of each given completion token, one forward."""

    @abstractmethod
    def generate(self, items: list[GenerateItem]) -> tuple[int, list[GenerateResult]]:
        """(version, results)."""

    @abstractmethod
    def check_ready(self) -> None:
        """Exercise the engine (a one-token forward); raise if it is not usable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine."""
