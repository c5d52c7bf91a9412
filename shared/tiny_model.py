"""`gtr tiny-model`: a Qwen2.5-VL-architecture model with random weights, built offline.

The tokenizer is a byte-level BPE trained with `tokenizers` on a corpus of our env prompts and
JSON answers (byte-level, so any text still encodes). The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from shared.models import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Sizes: `tiny` for tests (~0.2M params), `small` for learning experiments on CPU (~5M),
# `wide`: Qwen2.5-VL-7B's real vocabulary (tokenizer, 152,064 embedding rows, untied head like the
# 7B), special-token ids, chat template and image processor (patch 14, merge 2, min/max pixels
# 3136 / 12845056), on a 2-layer, 256-wide body (~80M params, nearly all embedding and head), so
# that vocabulary- and image-sized costs are real while the rest runs on 2 cores. The vision
# merger's output width is the text hidden size by construction (it feeds the embeddings), so it
# cannot be the 7B's 3584 here; per-token activations at 3584 are derived in docs/scale.md.
SIZES = {
    "tiny": dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, inter=128,
                 v_hidden=32, v_depth=2, v_heads=2, v_inter=64, max_pixels=112 * 112),
    "small": dict(vocab=2048, hidden=256, layers=4, heads=4, kv_heads=2, inter=768,
                  v_hidden=96, v_depth=2, v_heads=2, v_inter=192, max_pixels=168 * 168),
    "wide": dict(vocab=152064, hidden=256, layers=2, heads=4, kv_heads=2, inter=512,
                 v_hidden=128, v_depth=2, v_heads=2, v_inter=256, max_pixels=12845056, min_pixels=3136,
                 tokenizer="qwen2", tie=False),
}

_RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
_SUITS = ["hearts", "diamonds", "clubs", "spades"]
_OBJECTS = ["apple", "mug", "cup", "plate", "knife", "bowl", "pan", "pot", "egg", "lettuce", "tomato",
            "potato", "bread", "soapbar", "cloth", "towel", "book", "pencil", "pen", "keychain",
            "cellphone", "creditcard", "watch", "vase", "statue", "candle", "spraybottle", "desklamp"]
_RECEPTACLES = ["cabinet", "countertop", "drawer", "fridge", "microwave", "sinkbasin", "stoveburner",
                "shelf", "desk", "dresser", "sidetable", "diningtable", "coffeetable", "garbagecan",
                "toilet", "bathtubbasin", "sofa", "armchair", "bed", "safe", "cart"]


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text like what the model reads and writes: env instructions, observations, JSON answers."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n):
        cards = [rng.choice(_RANKS) for _ in range(4)]
        nums = [rng.randint(1, 10) for _ in range(4)]
        formula = "".join(rng.choice([str(x), "+", "-", "*", "/", "(", ")"]) for x in nums)
        obj, rec = rng.choice(_OBJECTS), rng.choice(_RECEPTACLES)
        k = rng.randint(1, 12)
        lines += [
            "You are an expert 24 points card game player. You are observing these four cards in the image. "
            "Note that 'J', 'Q', and 'K' count as '10', and each card must be used once. Your goal is to "
            "output a formula that evaluates to 24 using numbers from the cards and operators such as "
            "'+', '-', '*', '/', '(', ')', and '='.",
            f"Your response should be a valid json file in the following format: "
            f'{{"cards": [x, y, z, w], "formula": "an partial formula", "thoughts": "{{first check whether the '
            f'current formula equals 24, then think about the next step}}", "action": "{{number or operator}}"}}',
            f'{{"cards": [{", ".join(map(str, nums))}], "formula": "{formula}", "thoughts": "The cards are '
            f'{" ".join(cards)} of {rng.choice(_SUITS)}. I can reach 24 with {formula}.", "action": "{rng.choice(["+", "-", "*", "/", "(", ")", "=", str(nums[0])])}"}}',
            f"You are in the middle of a room. Looking quickly around you, you see a {rec} {k}, a {rng.choice(_RECEPTACLES)} {rng.randint(1, 9)}.",
            f"Your task is to: put a {rng.choice(['clean', 'hot', 'cool', ''])} {obj} in {rec}.",
            f'{{"thoughts": "I need to find the {obj} first, it may be in the {rec} {k}.", "action": "go to {rec} {k}"}}',
            f'{{"thoughts": "The {obj} is here.", "action": "take {obj} {rng.randint(1, 3)} from {rec} {k}"}}',
            f"Your admissible actions of the current situation are: [go to {rec} {k}, open {rec} {k}, "
            f"examine {rec} {k}, look, inventory, put {obj} {k} in/on {rec} {k}, clean {obj} {k} with sinkbasin 1, "
            f"heat {obj} {k} with microwave 1, cool {obj} {k} with fridge 1, use desklamp 1].",
            f"You are playing number line. The target is {rng.randint(0, 5)} and the current position is "
            f'{rng.randint(0, 5)}. Answer with {{"thoughts": "...", "action": "+"}} or "-".',
            f"You are playing ezpoints: reach 12 with the cards {cards[0]} and {cards[1]}. Current formula: {formula}",
        ]
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Rayon threads can change merge order ties; one thread keeps the vocabulary reproducible.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "left"
    return fast


def build_config(size: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    s = SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2  # mrope sections (temporal, height, width) split the rotary half-dim
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tie = s.get("tie", True)
    text = dict(
        vocab_size=s["vocab"] if s.get("tokenizer") == "qwen2" else len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["inter"],
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": mrope},
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=tie, use_cache=True,
    )
    vision = dict(
        depth=s["v_depth"], hidden_size=s["v_hidden"], num_heads=s["v_heads"], intermediate_size=s["v_inter"],
        out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        window_size=112, fullatt_block_indexes=[s["v_depth"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=tie, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
    )


def build_tiny_model(out: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build and save the model, tokenizer and image processor; returns the directory."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    if spec.get("tokenizer") == "qwen2":
        from shared.qwen_tokenizer import build_qwen2_tokenizer

        tokenizer = build_qwen2_tokenizer()
    else:
        tokenizer = train_tokenizer(spec["vocab"], seed)
    config = build_config(size, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # The default init (std 0.02) leaves a tiny model's output nearly uniform; that is fine
    # for tests and what SFT-init starts from.
    model.eval()
    return save_model_dir(out, model, tokenizer, max_pixels=spec["max_pixels"], min_pixels=spec.get("min_pixels", 56 * 56),
                          chat_template=tokenizer.chat_template or CHAT_TEMPLATE)


def save_model_dir(out: Path, model, tokenizer, max_pixels: int | None = None, min_pixels: int = 56 * 56,
                   chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write a loadable model directory: weights, tokenizer, chat template, and (for VL models,
    `max_pixels` given) an image processor the stock AutoProcessor also understands."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if max_pixels is not None:
        try:
            from transformers import Qwen2VLImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import Qwen2VLImageProcessor as ImageProcessor

        ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
        # Make the stock AutoProcessor (GPU images with torchvision) assemble a Qwen2.5-VL processor.
        pp = json.loads((out / "preprocessor_config.json").read_text())
        pp["image_processor_type"] = "Qwen2VLImageProcessor"
        pp["processor_class"] = "Qwen2_5_VLProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
    _normalise_json(out)
    return out


def _normalise_json(out: Path) -> None:
    """Sort keys and drop version stamps so that two builds with one seed are byte-identical."""
    for f in out.glob("*.json"):
        data = json.loads(f.read_text())
        if isinstance(data, dict):
            data.pop("transformers_version", None)
        f.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
