"""`gtr tiny-model --size wide`: Qwen2.5-VL-7B's real vocabulary, specials, template and image settings."""

from __future__ import annotations

import pytest

pytest.importorskip("dashscope", reason="the wide tokenizer needs the `wide` extra (dashscope)")

from shared.chat import encode_prompt  # noqa: E402
from shared.qwen_tokenizer import QWEN_PATTERN, build_qwen2_tokenizer, load_ranks, ranks_file  # noqa: E402
from shared.tiny_model import SIZES, build_config  # noqa: E402

TEXT = ('You are an expert 24 points card game player. {"cards": [10, 2, 3, 4], "formula": "(10+2)*2", '
        '"thoughts": "I can reach 24.", "action": "="}\n\n  Tabs\tand 12345 digits, Größe, 中文测试, emoji 🙂.')


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


def test_real_vocabulary_and_special_token_ids(tok):
    assert len(tok) == 151665  # 151643 BPE tokens + 22 added, as Qwen2.5-VL's tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151653, 151655, 151656]  # Qwen2.5-VL config ids
    assert tok("Hello world!", add_special_tokens=False)["input_ids"] == [9707, 1879, 0]
    assert tok("2024", add_special_tokens=False)["input_ids"] == [17, 15, 17, 19]  # Qwen: one digit per token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_encoding_equals_tiktoken_on_the_same_ranks(tok):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_ranks(ranks_file()), special_tokens={})
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == enc.encode(TEXT)
    assert tok.decode(ids) == TEXT


def test_wide_config_and_image_processor_settings(tok, tmp_path):
    from PIL import Image

    from shared.codecs import image_to_b64
    from shared.models import _processor_class
    from transformers import Qwen2VLImageProcessorPil

    cfg = build_config("wide", tok)
    assert cfg.text_config.vocab_size == 152064 and not cfg.tie_word_embeddings
    assert cfg.image_token_id == 151655 and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.spatial_merge_size == 2
    ip = Qwen2VLImageProcessorPil(min_pixels=SIZES["wide"]["min_pixels"], max_pixels=SIZES["wide"]["max_pixels"])
    proc = _processor_class()(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    img = Image.new("RGB", (300, 300), (0, 120, 0))  # a Points24 observation's size
    msgs = [{"role": "user", "content": [{"type": "image", "image": image_to_b64(img)},
                                         {"type": "text", "text": "hi"}]}]
    enc = encode_prompt(proc, msgs)
    # 300 -> 308 (a multiple of 28), 22 x 22 patches of 14, merged 2 x 2: 121 image tokens.
    assert enc["image_grid_thw"].tolist() == [[1, 22, 22]]
    assert int((enc["input_ids"] == 151655).sum()) == 121
    text = tok.decode(enc["input_ids"][0][:3])
    assert text.startswith("<|im_start|>system\n")
