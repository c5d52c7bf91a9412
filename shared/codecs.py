"""Codecs: image <-> base64 PNG, tensors <-> safetensors bytes (never pickles)."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image


class CodecError(ValueError):
    """Input that cannot be decoded; services map it to a 4xx."""


def image_to_b64(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Limits on a client's image, checked from the header before the pixels are decoded.
MAX_IMAGE_BYTES = 32 << 20
"""Encoded size (after base64)."""
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 8192
MAX_ASPECT_RATIO = 200
"""Qwen2-VL's processor refuses a longer side over 200x the shorter (`smart_resize`)."""
MAX_DECODED_BYTES = 4096 * 4096 * 4
"""Pixels x channels once decoded (an RGBA 4096x4096 image)."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""Only these decoders run on client bytes (PIL would otherwise try every format it knows)."""


def b64_to_image(data: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a base64 PNG/JPEG (a `data:` URL prefix is accepted) into an RGB PIL image.

    The size, sides, aspect ratio and decoded size come from the header and are checked before
    the pixels are decoded, so a decompression bomb costs nothing; PIL's own cap on text chunks
    (`PngImagePlugin.MAX_TEXT_CHUNK`, 1 MB) refuses a zTXt bomb. Every failure is a CodecError.
    """
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise CodecError(f"image is {len(data)} base64 characters; the limit is {MAX_IMAGE_BYTES} bytes encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CodecError(f"image is not valid base64: {e}") from e
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        w, h = img.size
        if w < 1 or h < 1:
            raise CodecError(f"image has no pixels ({w}x{h})")
        if max(w, h) > MAX_IMAGE_SIDE:
            raise CodecError(f"image too large: {w}x{h}; the longest side may be {MAX_IMAGE_SIDE}")
        if w * h > max_pixels:
            raise CodecError(f"image too large: {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            raise CodecError(f"image aspect ratio {w}x{h} exceeds {MAX_ASPECT_RATIO}:1 (the processor's limit)")
        if w * h * len(img.getbands()) > MAX_DECODED_BYTES:
            raise CodecError(f"image {w}x{h} in mode {img.mode} decodes to more than {MAX_DECODED_BYTES} bytes")
        img.load()
        return img.convert("RGB")
    except CodecError:
        raise
    except Image.DecompressionBombError as e:
        raise CodecError(f"image too large: {e}") from e
    # PIL raises a zoo for broken or hostile files: OSError, ValueError (a text chunk over
    # MAX_TEXT_CHUNK), SyntaxError (broken PNG chunks), EOFError, struct.error, ...
    except Exception as e:  # noqa: BLE001 - every decoder failure is the client's bad image
        raise CodecError(f"image cannot be decoded: {type(e).__name__}: {e}") from e


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
