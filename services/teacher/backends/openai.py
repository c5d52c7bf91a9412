"""The `openai` backend: an external OpenAI-compatible chat-completions endpoint as the teacher.

This is the original GTR's paid teacher (GPT-4o): `/v1/generate` forwards each item to
`{base_url}/chat/completions` with its images as data URLs; `/v1/logits` answers 501 (chat
completions give no log-probs of *given* tokens). It takes no checkpoints (`supports_merge`
is False) and its version is always 0.

Settings: `base_url` (or `$OPENAI_BASE_URL`), `model` (the remote model name), the API key from
the environment variable named by `api_key_env` (default `OPENAI_API_KEY`; never a flag, so it
stays out of process listings).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from shared.schemas import GenerateItem, GenerateResult, LogitsItem, LogitsResult
from services.teacher.backends.base import TeacherBackend
from services.teacher.errors import NotReady, Unsupported, UpstreamError

log = logging.getLogger(__name__)


def to_openai_messages(messages) -> list[dict[str, Any]]:
    """Our chat format -> OpenAI's: image parts become `image_url` parts with a data URL."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if p.type == "image":
                url = p.image if p.image.startswith("data:") else f"data:image/png;base64,{p.image}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


class OpenAIBackend(TeacherBackend):
    name = "openai"
    supports_merge = False

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_parallel: int = 8, transport: httpx.BaseTransport | None = None,
                 **_: Any):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.base_url = base_url.rstrip("/")
        self.model = str(model)
        key = os.environ.get(api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="openai")

    @property
    def base_model(self) -> str:
        return f"{self.model} @ {self.base_url}"

    @property
    def tokenizer_fingerprint(self) -> str:
        return f"openai:{self.model}"

    def base_parameters(self) -> dict[str, tuple[int, ...]]:
        return {}

    def apply_delta(self, delta, version: int) -> None:
        if delta:
            raise Unsupported("the openai backend serves an external model: no merging")

    def logprobs(self, items: list[LogitsItem], temperature: float = 1.0) -> tuple[int, list[LogitsResult]]:
        raise Unsupported("the openai backend cannot score given tokens (chat completions return no prompt "
                           "log-probs); use the hf or vllm backend for /v1/logits")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._http.post("/chat/completions", json=body)
        except httpx.TransportError as e:
            raise UpstreamError(f"{self.base_url}: {type(e).__name__}: {e}", "upstream_unreachable") from e
        if r.status_code >= 400:
            raise UpstreamError(f"{self.base_url}/chat/completions answered {r.status_code}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError as e:
            raise UpstreamError(f"upstream answered non-JSON: {r.text[:200]}") from e

    def _one(self, item: GenerateItem) -> GenerateResult:
        body: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(item.messages),
                                "max_tokens": item.max_new_tokens, "temperature": item.temperature,
                                "top_p": item.top_p, "logprobs": True}
        if item.seed is not None:
            body["seed"] = item.seed
        data = self._post(body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise UpstreamError(f"unexpected chat-completions reply: {str(data)[:300]}") from e
        content_lp = ((choice.get("logprobs") or {}).get("content")) or []
        return GenerateResult(text=text, token_ids=[], logprobs=[float(t.get("logprob", 0.0)) for t in content_lp])

    def generate(self, items: list[GenerateItem]) -> tuple[int, list[GenerateResult]]:
        return 0, list(self._pool.map(self._one, items))

    def check_ready(self) -> None:
        try:
            r = self._http.get("/models", timeout=10.0)
        except httpx.TransportError as e:
            raise NotReady(f"{self.base_url} unreachable: {e}") from e
        if r.status_code >= 400:
            raise NotReady(f"{self.base_url}/models answered {r.status_code}")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()
