"""The exact prompt of a rollout step, stored compactly.

PPO must re-score each sample under the prompt and image of its rollout (DESIGN §5.3). Keeping
the processor's float32 pixel values for every step costs ~8x the image itself (the defect of
§5.7); we keep the token ids and the uint8 image, and recompute the pixel values when the step
is scored. The image processor is deterministic, so they come back bit-identical (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class StoredPrompt:
    input_ids: torch.Tensor
    """[1, L] the rollout's prompt ids."""
    mm_token_type_ids: torch.Tensor
    """[1, L] image positions (3-D mRoPE needs them)."""
    image_grid_thw: torch.Tensor | None = None
    image: np.ndarray | None = None
    """uint8 HxWx3, the image the processor saw."""

    def state(self) -> dict[str, torch.Tensor]:
        d = {"input_ids": self.input_ids, "mm_token_type_ids": self.mm_token_type_ids}
        if self.image is not None:
            d["image_grid_thw"] = self.image_grid_thw
            d["image"] = torch.from_numpy(np.array(self.image, dtype=np.uint8))  # a writable copy
        return d

    @classmethod
    def from_state(cls, d: dict[str, torch.Tensor]) -> "StoredPrompt":
        image = d.get("image")
        return cls(d["input_ids"], d["mm_token_type_ids"], d.get("image_grid_thw"),
                   None if image is None else image.numpy())


def store_prompt(prompt: dict[str, torch.Tensor], image: np.ndarray | None) -> StoredPrompt:
    """`prompt` from shared.chat.encode_prompt; `image` the uint8 array of its (single) image."""
    has_pixels = "pixel_values" in prompt
    if has_pixels != (image is not None):
        raise ValueError("a stored prompt needs its image exactly when the prompt has pixel values")
    grid = prompt.get("image_grid_thw")
    if grid is not None and grid.shape[0] != 1:
        raise ValueError(f"one image per prompt is supported, got {grid.shape[0]}")
    return StoredPrompt(prompt["input_ids"].cpu(), prompt["mm_token_type_ids"].cpu(),
                        None if grid is None else grid.cpu(), image)


def load_prompt(processor, p: StoredPrompt | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model inputs of a stored prompt (pixel values recomputed from the uint8 image)."""
    if isinstance(p, dict):
        return p
    out = {"input_ids": p.input_ids, "attention_mask": torch.ones_like(p.input_ids),
           "mm_token_type_ids": p.mm_token_type_ids}
    if p.image is not None:
        pix = processor.image_processor(images=[Image.fromarray(p.image)], return_tensors="pt")
        if not torch.equal(pix["image_grid_thw"], p.image_grid_thw):
            raise RuntimeError("recomputed image grid differs from the rollout's (image processor changed?)")
        out["pixel_values"] = pix["pixel_values"]
        out["image_grid_thw"] = pix["image_grid_thw"]
    return out
