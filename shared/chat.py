"""Chat encoding and completion scoring, shared by the trainer and the teacher.

Both sides must turn the same `messages` into the same token ids and image tensors, or the
teacher's log-probs don't line up with the student's tokens. This module is that single path:
`encode` builds a padded batch of (prompt + completion) with its images, and
`completion_logprobs` scores the completion tokens from one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from shared.codecs import b64_to_image
from shared.logprobs import DEFAULT_CHUNK, selective_logprobs


@dataclass
class EncodedBatch:
    inputs: dict[str, torch.Tensor]
    """Model kwargs: input_ids, attention_mask, mm_token_type_ids, and pixel_values /
    image_grid_thw when any item has an image. Left-padded."""
    prompt_lens: list[int]
    """Prompt length of each item, without padding."""
    completion_lens: list[int]
    """Completion length of each item (0 when only prompts were encoded)."""

    @property
    def width(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def completion_slice(self) -> int:
        """How many trailing positions hold every item's completion (left padding aligns ends)."""
        return max(self.completion_lens, default=0)


def split_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list]:
    """Decode the base64 images of a chat; return (template-ready messages, PIL images in order)."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for p in content:
            if p["type"] == "image":
                img = p["image"]
                images.append(b64_to_image(img) if isinstance(img, str) else img)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def encode_prompt(processor, messages, add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
    """One chat -> model inputs for its prompt (batch of 1, no padding)."""
    template_messages, images = split_messages(messages)
    text = processor.apply_chat_template(template_messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    enc = processor(**kwargs)
    if "mm_token_type_ids" not in enc:
        enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return dict(enc)


def encode(processor, prompts: Sequence[dict[str, torch.Tensor]], completions: Sequence[Sequence[int]] | None = None,
           device: torch.device | str = "cpu") -> EncodedBatch:
    """Left-pad a batch of encoded prompts, each followed by its completion ids.

    `prompts` come from `encode_prompt` (stored per rollout step, so PPO re-scores the exact
    prompt and image of the rollout). Passing mm_token_type_ids is required: without it
    transformers 5 silently falls back to 1-D positions (DESIGN §6).
    """
    pad_id = processor.tokenizer.pad_token_id
    completions = completions if completions is not None else [[] for _ in prompts]
    rows, types, prompt_lens, completion_lens = [], [], [], []
    for p, c in zip(prompts, completions, strict=True):
        ids = p["input_ids"][0].tolist()
        tt = p["mm_token_type_ids"][0].tolist()
        rows.append(ids + list(c))
        types.append(tt + [0] * len(c))
        prompt_lens.append(len(ids))
        completion_lens.append(len(c))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attention[i, width - len(r):] = 1
        mm_types[i, width - len(r):] = torch.tensor(t, dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types}
    pix = [p["pixel_values"] for p in prompts if "pixel_values" in p]
    if pix:
        inputs["pixel_values"] = torch.cat(pix, dim=0)
        inputs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts if "image_grid_thw" in p], dim=0)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return EncodedBatch(inputs, prompt_lens, completion_lens)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target], in fp32. logits [..., V], targets [...] -> [...]."""
    lp = F.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_logits(model, batch: EncodedBatch, **forward_kwargs):
    """One forward; returns (outputs, logits_B_K_V) where position k predicts the k-th of the
    last K tokens of each row (K = longest completion). The shift by one happens here: the
    logits that predict token j sit at position j-1."""
    k = batch.completion_slice()
    out = model(**batch.inputs, logits_to_keep=k + 1, **forward_kwargs)
    return out, out.logits[:, :-1, :] if k > 0 else out.logits[:, :0, :]


def completion_logprobs(model, batch: EncodedBatch, temperature: float = 1.0, top_k: int = 0,
                        chunk: int = DEFAULT_CHUNK):
    """Per-item log-probs of each completion token (fp32), plus the top-k of each position.

    Returns (logprobs: list[Tensor[L_i]], top: list[(ids[L_i,k], logprobs[L_i,k])] | None).
    The body runs once; the head then runs on the completion positions only, `chunk` of them at a
    time (shared.logprobs): never a [B, K, V] logits tensor (623 MB in bf16 at 8 x 256 x 152k).
    """
    k = batch.completion_slice()
    lens = batch.completion_lens
    targets = batch.inputs["input_ids"][:, batch.width - k:]
    body = getattr(model, "model", None)
    head = model.get_output_embeddings()
    if body is None or head is None:  # not a ForConditionalGeneration/CausalLM wrapper: plain logits
        _, logits = completion_logits(model, batch)
        hidden, head = logits, (lambda x: x)
    else:
        hidden = body(**batch.inputs, use_cache=False)[0][:, batch.width - k - 1:batch.width - 1]
    pos = torch.arange(k, device=targets.device)
    valid = pos.unsqueeze(0) >= (k - torch.tensor(lens, device=targets.device)).unsqueeze(1)
    # Row-major: each row's completion positions are contiguous (left padding), rows in order.
    lp_N, top_ids, top_lp = selective_logprobs(hidden[valid], targets[valid], head, temperature, top_k, chunk)
    out = list(lp_N.split(lens))
    if not top_k:
        return out, None
    return out, list(zip(top_ids.split(lens), top_lp.split(lens), strict=True))
