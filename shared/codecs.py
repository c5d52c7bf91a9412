"""Codecs: image <-> base64 PNG, tensors <-> safetensors bytes (never pickles)."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class CodecError(ValueError):
    """Input that cannot be decoded; services map it to a 4xx."""


def image_to_b64(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def b64_to_image(data: str, max_pixels: int = 4096 * 4096) -> Image.Image:
    """Decode a base64 PNG/JPEG (a `data:` URL prefix is accepted) into an RGB PIL image."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CodecError(f"image is not valid base64: {e}") from e
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > max_pixels:
            raise CodecError(f"image too large: {img.width}x{img.height}")
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise CodecError(f"image cannot be decoded: {e}") from e
    return img.convert("RGB")


def image_to_array(image: Image.Image) -> np.ndarray:
    """uint8 HxWx3: how trajectories store images (never float32, DESIGN §5.7)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def tensors_to_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def bytes_to_tensors(data: bytes) -> dict:
    """Parse safetensors bytes. Raises CodecError on anything else (a pickle included)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CodecError(f"not a valid safetensors file: {e}") from e
