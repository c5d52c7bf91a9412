"""Qwen2's real tokenizer, built offline from the BPE ranks a PyPI package ships.

No hub here, so the 151,643 byte-level BPE tokens come from `qwen.tiktoken` inside the
`dashscope` wheel (Alibaba's SDK; `pip install 'gtr-turbo[wide]'`). Qwen2 / Qwen2.5 / Qwen2.5-VL
kept Qwen's regular vocabulary and pre-tokenizer regex and appended their own special tokens
from id 151643, so ranks + the specials below + Qwen2.5-VL's chat template give the same
token ids as the released `tokenizer.json` for text (our test checks the ids of the specials,
a round trip, and that single digits stay separate, as Qwen splits numbers).

The conversion is transformers' `TikTokenConverter` recipe (merges derived from the ranks),
with the ranks read by us so tiktoken itself is not needed.
"""

from __future__ import annotations

import base64
from pathlib import Path

# Qwen's pre-tokenizer: like cl100k but one digit per piece (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-VL's added tokens, in id order from 151643 (tokenizer_config.json of the release);
# the bool says whether the release marks it special (tool-call and FIM tokens are not).
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
FIRST_SPECIAL_ID = 151643

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the release).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ranks_file() -> Path:
    """Where the installed `dashscope` keeps Qwen's BPE ranks; a clear error when it is missing."""
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("dashscope") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError as e:
        raise RuntimeError("the real Qwen vocabulary comes from the `dashscope` package: "
                           "pip install 'gtr-turbo[wide]' (or dashscope==2.0.2)") from e
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: this dashscope version does not ship qwen.tiktoken "
                           "(2.0.2 does)")
    return path


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """`base64(token) rank` per line (tiktoken's format) -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def build_qwen2_tokenizer(path: str | Path | None = None):
    """A `PreTrainedTokenizerFast` with Qwen2.5-VL's vocabulary, special tokens and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_ranks(path or ranks_file())
    if len(ranks) != FIRST_SPECIAL_ID:
        raise RuntimeError(f"expected {FIRST_SPECIAL_ID} BPE ranks, found {len(ranks)}")
    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    # Every split of a token into two known tokens is a merge at that token's rank; with
    # ignore_merges (a whole pre-token in the vocabulary is taken as is) this reproduces
    # tiktoken's encoding (transformers' TikTokenConverter does the same).
    merges = []
    for tok, rank in ranks.items():
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, lr) for lr in local)
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(BPE(vocab, [(as_str(a), as_str(b)) for _, (a, b) in merges], fuse_unk=False))
    tok.model.ignore_merges = True
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=s) for t, s in QWEN2_ADDED_TOKENS])
    specials = [t for t, s in QWEN2_ADDED_TOKENS if s]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=specials[1:], chat_template=QWEN25_VL_CHAT_TEMPLATE,
        model_max_length=131072, errors="replace", clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast
