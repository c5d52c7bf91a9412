"""Model and processor loading for Qwen2.5-VL-family directories.

Works both where torchvision imports (GPU images: the stock `AutoProcessor` path) and where it
does not (CPU machines, DESIGN §6): there `AutoProcessor` silently returns only the tokenizer,
so we assemble a `Qwen2_5_VLProcessor` without its video sub-processor by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens. The vision ones must never be sampled (DESIGN §6): a generated
# <|image_pad|> breaks the next forward, which expects one pad per image patch.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen2-VL's chat template, reduced to what we use (text and images; no video, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - PyPI torchvision beside the CPU torch raises RuntimeError
        return False
    return True


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the video sub-processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen2_5_VLImageOnlyProcessor


def load_processor(path: str | Path):
    """The processor of a Qwen2.5-VL model directory: tokenizer + image processor + template."""
    from transformers import AutoTokenizer

    path = Path(path)
    if torchvision_available():
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        if getattr(proc, "image_processor", None) is not None:
            return proc
    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    image_processor = ImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None) or _read_chat_template(path) or CHAT_TEMPLATE
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _read_chat_template(path: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.exists():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def load_model(path: str | Path, device: str | None = None, dtype: str | None = None):
    """A Qwen2.5-VL-family model from a local directory (never a hub id: nothing here reaches one)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (config.json missing); build one with `gtr tiny-model {path}`")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dt)
    model.to(dev)
    model.eval()
    return model


def load_model_and_processor(path: str | Path, device: str | None = None, dtype: str | None = None):
    return load_model(path, device, dtype), load_processor(path)


def vision_token_ids(tokenizer) -> list[int]:
    """Ids to pass as `suppress_tokens` to generation."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: two sides agree on token ids iff equal."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(config: Any) -> str:
    """Identifies a base architecture (not its weights): used to refuse foreign adapters."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = {k: d.get(k) for k in ("model_type", "architectures")}
    keep["text"] = {k: (d.get("text_config") or {}).get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
