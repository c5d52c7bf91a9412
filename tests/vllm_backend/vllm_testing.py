"""Tiny models that vLLM's CPU build can serve, built offline for the vLLM backend's test.

The project's tiny Qwen2.5-VL has head_dim 16, which vLLM's CPU attention refuses (it supports
32, 64, 80, ...). These builders keep its tokenizer and chat template (so scores line up with
the rest of the project) but use 2 attention heads of 32 dims.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.models import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from shared.tiny_model import SPECIAL_TOKENS, save_model_dir, train_tokenizer

TEXT = dict(vocab=1024, hidden=64, layers=2, heads=2, kv_heads=1, inter=128)


def build_tiny_qwen2(out: str | Path, seed: int = 0) -> Path:
    """A text-only Qwen2ForCausalLM (hidden 64, 2 layers, head_dim 32) with the project's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(TEXT["vocab"], seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT["hidden"], num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"], num_key_value_heads=TEXT["kv_heads"],
        intermediate_size=TEXT["inter"], max_position_embeddings=4096, rope_theta=10000.0,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=True, use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # std 0.02 leaves the output nearly uniform; a wider init gives log-probs that differ
    # between tokens, so a wrong position or a stale weight shows in the comparison.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.eval()
    return save_model_dir(out, model, tokenizer)


def build_tiny_vl(out: str | Path, seed: int = 0) -> Path:
    """A Qwen2.5-VL like `gtr tiny-model`'s, with head_dim 32 in the language model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(TEXT["vocab"], seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = TEXT["hidden"] // TEXT["heads"]
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT["hidden"], num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"], num_key_value_heads=TEXT["kv_heads"], intermediate_size=TEXT["inter"],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=10000.0,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=True, use_cache=True,
    )
    vision = dict(
        depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=TEXT["hidden"],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.eval()
    return save_model_dir(out, model, tokenizer, max_pixels=112 * 112)
