"""The released Qwen2.5-VL-3B / -7B architectures as configs, built offline (no hub).

Numbers from the releases' config.json. Used to count parameters exactly (on the meta device:
docs/scale.md's memory table) and to build random-weight models of the real size on a GPU
(scripts/gpu_check.sh). Special-token ids are Qwen2.5-VL's (shared.qwen_tokenizer).
"""

from __future__ import annotations

QWEN25_VL = {
    "3B": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)),
    "7B": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)),
}
IDS = dict(bos=151643, eos=151645, pad=151643, image=151655, video=151656, vision_start=151652, vision_end=151653)


def qwen25_vl_config(name: str, vision_overrides: dict | None = None, **text_overrides):
    """A `Qwen2_5_VLConfig` of the released `name` ("3B" or "7B"); `text_overrides` and
    `vision_overrides` shrink it (e.g. num_hidden_layers=2 for a CPU smoke test)."""
    from transformers import Qwen2_5_VLConfig

    if name not in QWEN25_VL:
        raise ValueError(f"unknown Qwen2.5-VL size {name!r}; choose one of {sorted(QWEN25_VL)}")
    spec = QWEN25_VL[name]
    text = {**spec["text"], **text_overrides}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    # The release's mrope_section is [16, 24, 24] for head_dim 128; same split rule for others.
    mrope = [16, 24, 24] if head_dim == 128 else [half - 2 * (half // 3), half // 3, half // 3]
    tie = text["tie_word_embeddings"]
    text.update(max_position_embeddings=128000, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                                  "mrope_section": mrope},
                bos_token_id=IDS["bos"], eos_token_id=IDS["eos"], pad_token_id=IDS["pad"], use_cache=True,
                rms_norm_eps=1e-6, hidden_act="silu")
    vision = {**spec["vision"], **(vision_overrides or {}), "out_hidden_size": text["hidden_size"], "patch_size": 14,
              "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
              "hidden_act": "silu", "in_channels": 3}
    depth = vision["depth"]
    vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < depth] or [depth - 1]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IDS["image"],
                            video_token_id=IDS["video"], vision_start_token_id=IDS["vision_start"],
                            vision_end_token_id=IDS["vision_end"], tie_word_embeddings=tie,
                            bos_token_id=IDS["bos"], eos_token_id=IDS["eos"], pad_token_id=IDS["pad"])


def lora_param_count(config, r: int, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")) -> int:
    """LoRA parameters (A: r x in, B: out x r) on `targets` of every language layer."""
    t = config.text_config
    h, i, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return t.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets)


def touched_param_count(config, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj")) -> int:
    """Base parameters a merged LoRA delta on `targets` changes (the teacher's W0 copies)."""
    t = config.text_config
    h, i, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    sizes = {"q_proj": h * h, "k_proj": h * kv, "v_proj": h * kv, "o_proj": h * h,
             "gate_proj": h * i, "up_proj": h * i, "down_proj": i * h}
    return t.num_hidden_layers * sum(sizes[m] for m in targets)
