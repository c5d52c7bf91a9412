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
from shared.models import VISION_SPECIAL_TOKENS
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


class ChatInputError(ValueError):
    """A chat the model must not see (services map it to a 4xx)."""


class PromptTooLarge(ChatInputError):
    """More text or images than the limits (services map it to 413)."""


MAX_TEXT_BYTES = 1 << 20
"""Text of one chat, in UTF-8 bytes, checked before tokenising (a 10 MB prompt took 28 s to
tokenise before its 413). ~250k tokens of English: far above any context we serve."""
MAX_IMAGES = 16
"""Images in one chat (each decodes to up to 64 MB and a few thousand vision tokens)."""


def check_text(text: str, where: str = "text") -> str:
    """Refuse text that would corrupt the encoding: the vision special tokens (the processor
    expands each `<|image_pad|>` into an image's patches, so one in the text misaligns every
    image, or breaks the forward without one) and lone surrogates (not encodable UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatInputError(f"{where} is not valid UTF-8 text (lone surrogate at {e.start})") from None
    found = [t for t in VISION_SPECIAL_TOKENS if t in text]
    if found:
        raise ChatInputError(f"{where} holds the vision special tokens {found}: images go in image parts only")
    return text


def split_messages(messages: Sequence[dict[str, Any]], max_text_bytes: int = MAX_TEXT_BYTES,
                   max_images: int = MAX_IMAGES) -> tuple[list[dict[str, Any]], list]:
    """Check a chat and decode its base64 images; return (template-ready messages, PIL images in order).

    Raises ChatInputError (vision tokens in text, lone surrogates), PromptTooLarge (text or image
    count over the limits, checked before anything is decoded or tokenised) or CodecError (images).
    """
    texts, n_images = [], 0
    for m in messages:
        c = m["content"]
        texts += [c] if isinstance(c, str) else [p["text"] for p in c if p["type"] != "image"]
        n_images += 0 if isinstance(c, str) else sum(p["type"] == "image" for p in c)
    # chars <= UTF-8 bytes: the cheap count first, the exact one only when it passes
    if sum(map(len, texts)) > max_text_bytes or \
            sum(len(t.encode("utf-8", "replace")) for t in texts) > max_text_bytes:
        raise PromptTooLarge(f"the chat's text exceeds {max_text_bytes} bytes")
    if n_images > max_images:
        raise PromptTooLarge(f"the chat has {n_images} images; the limit is {max_images}")
    out, images = [], []
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": check_text(content, f"message {i}")})
            continue
        parts = []
        for p in content:
            if p["type"] == "image":
                img = p["image"]
                images.append(b64_to_image(img) if isinstance(img, str) else img)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": check_text(p["text"], f"message {i}")})
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


def fp32_head(model, vocab_chunk: int = 16384):
    """The model's output head computed in fp32: [n, H] hidden states (any dtype) -> [n, V] fp32 logits.

    DESIGN §4: log-probs in fp32. A bf16 head rounds each logit to ~3 significant digits before
    the log-softmax; the student scores with an fp32 head (services/trainer/policy.py), so the
    teacher must too, or identical weights on both sides leave a KL floor (~1e-4 on the tiny
    model in bf16, growing with logit scale). The weight is cast a block of `vocab_chunk` rows
    at a time: no persistent fp32 copy of the head (2.2 GB at Qwen-7B's 152k x 3584).
    """
    head = model.get_output_embeddings()

    def apply(h: torch.Tensor) -> torch.Tensor:
        w, h32 = head.weight, h.float()
        if w.dtype == torch.float32:
            out = F.linear(h32, w)
        else:
            out = torch.cat([F.linear(h32, w[i:i + vocab_chunk].float())
                             for i in range(0, w.shape[0], vocab_chunk)], dim=-1)
        if getattr(head, "bias", None) is not None:
            out = out + head.bias.float()
        return out

    return apply


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
    if body is None or model.get_output_embeddings() is None:  # no CausalLM wrapper: plain logits
        _, logits = completion_logits(model, batch)
        hidden, head = logits, (lambda x: x)
    else:
        hidden = body(**batch.inputs, use_cache=False)[0][:, batch.width - k - 1:batch.width - 1]
        head = fp32_head(model)
    pos = torch.arange(k, device=targets.device)
    valid = pos.unsqueeze(0) >= (k - torch.tensor(lens, device=targets.device)).unsqueeze(1)
    # Row-major: each row's completion positions are contiguous (left padding), rows in order.
    lp_N, top_ids, top_lp = selective_logprobs(hidden[valid], targets[valid], head, temperature, top_k, chunk)
    out = list(lp_N.split(lens))
    if not top_k:
        return out, None
    return out, list(zip(top_ids.split(lens), top_lp.split(lens), strict=True))
