"""Images of the games, drawn with PIL by our own code (no copied card art).

Speed matters (every step renders one 300x300 image): fonts, card faces and each hand's table
are built once and cached; a step only copies the table and writes the formula on it.
Images are palette ("P" mode) PNGs: the static part is drawn in RGB with antialiasing and
quantised once (cached), the per-step text is drawn straight onto the palette image. Encoding a
palette PNG takes ~0.35 ms against ~1-2 ms for RGB (measured), and it is a third of the size;
clients that need RGB call `.convert("RGB")` (`shared.codecs.b64_to_image` does).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import threading
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 300
FELT = (53, 101, 77)  # RL4VLM's table colour, #35654d
SUIT_SYMBOL = {"H": "\u2665", "D": "\u2666", "S": "\u2660", "C": "\u2663"}
SUIT_COLOR = {"H": (200, 20, 30), "D": (200, 20, 30), "S": (15, 15, 15), "C": (15, 15, 15)}


def _font_path(bold: bool) -> str | None:
    """DejaVu (it has the suit glyphs): from the system, else the copy matplotlib ships."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    candidates = [Path("/usr/share/fonts/truetype/dejavu") / name]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / name)
    for c in candidates:
        if c.exists():
            return str(c)
    return None


_FONTS = threading.local()


def font(size: int, bold: bool = True) -> ImageFont.ImageFont:
    """A font per thread: FreeType faces must not be used by two threads at once, and the
    service renders in several worker threads."""
    cache = getattr(_FONTS, "cache", None)
    if cache is None:
        cache = _FONTS.cache = {}
    key = (size, bold)
    if key not in cache:
        path = _font_path(bold)
        # Pillow's bundled font has no suit glyphs, but ranks stay readable.
        cache[key] = ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
    return cache[key]


def rank_label(rank: int) -> str:
    return {1: "A", 11: "J", 12: "Q", 13: "K"}.get(rank, str(rank))


@lru_cache(maxsize=256)
def card_face(rank: int, suit: str, width: int, height: int) -> Image.Image:
    """A white card: rank and suit in two corners, a large rank and suit in the middle."""
    img = Image.new("RGB", (width, height), FELT)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, width - 1, height - 1), radius=max(3, width // 10), fill=(250, 250, 245),
                        outline=(30, 30, 30), width=2)
    color = SUIT_COLOR[suit]
    label, sym = rank_label(rank), SUIT_SYMBOL[suit]
    small = font(max(10, width // 5))
    d.text((4, 3), label, fill=color, font=small)
    d.text((4, 3 + small.size), sym, fill=color, font=small)
    d.text((width - 4, height - 3), label, fill=color, font=small, anchor="rd")
    big = font(max(14, int(width * 0.45)))
    d.text((width // 2, height // 2 - big.size // 3), label, fill=color, font=big, anchor="mm")
    d.text((width // 2, height // 2 + int(big.size * 0.7)), sym, fill=color, font=font(max(12, width // 3)), anchor="mm")
    return img


def card_table(cards: tuple[tuple[int, str], ...], target: int | None = None) -> Image.Image:
    """The felt with the cards side by side and the formula heading (the static part of a
    card-game image), in palette mode, ready for `draw_formula`."""
    return _card_table_p(tuple(cards), target).copy()


def bare_table(cards: tuple[tuple[int, str], ...], target: int | None = None) -> Image.Image:
    """The cached table itself (not a copy): read it, never draw on it."""
    return _card_table_p(tuple(cards), target)


@lru_cache(maxsize=4)
def _palette() -> Image.Image:
    """One fixed 64-colour palette for every card image, taken from a sample of all suits on the
    felt, so that card faces are quantised once each and a hand is only pasted together."""
    sample = Image.new("RGB", (4 * 70, 2 * 98), FELT)
    for i, suit in enumerate(SUITS_ORDER):
        sample.paste(card_face(10, suit, 67, 93), (i * 70, 0))
        sample.paste(card_face(12, suit, 40, 56), (i * 70, 98))
    d = ImageDraw.Draw(sample)
    d.text((2, 160), "Formula 0123456789", fill=(255, 255, 255), font=font(14, bold=False))
    return sample.quantize(colors=64, method=Image.Quantize.MEDIANCUT)


SUITS_ORDER = ("H", "D", "S", "C")


@lru_cache(maxsize=512)
def _card_face_p(rank: int, suit: str, width: int, height: int) -> Image.Image:
    return card_face(rank, suit, width, height).quantize(palette=_palette(), dither=Image.Dither.NONE)


@lru_cache(maxsize=8)
def _felt_p(n: int, target: int | None) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), FELT)
    d = ImageDraw.Draw(img)
    head = "Formula:" if target is None else f"Formula (target {target}):"
    d.text((10, int(SIZE * 0.76)), head, fill=(255, 255, 255), font=font(14, bold=False))
    return img.quantize(palette=_palette(), dither=Image.Dither.NONE)


@lru_cache(maxsize=1024)
def _card_table_p(cards: tuple[tuple[int, str], ...], target: int | None) -> Image.Image:
    img = _felt_p(len(cards), target).copy()
    n = len(cards)
    width = min(int(SIZE / n * 0.9), 110)
    height = int(width * 7 / 5)
    gap = (SIZE - n * width) / (n + 1)
    top = int(SIZE * 0.42 - height / 2)
    for i, (rank, suit) in enumerate(cards):
        img.paste(_card_face_p(rank, suit, width, height), (int(gap + i * (width + gap)), top))
    return img


def _quantize(img: Image.Image) -> Image.Image:
    # 64 colours hold the antialiased edges; the rest of the 256 stay free for text colours.
    return img.quantize(colors=64, method=Image.Quantize.FASTOCTREE)


def draw_formula(img: Image.Image, tokens: list[str]) -> Image.Image:
    """Write the formula under the cards, tokens separated by spaces so that "2" "4" never reads 24."""
    if not tokens:
        return img
    d = ImageDraw.Draw(img)
    f = font(18)
    text = " ".join(tokens)
    # Long formulas wrap onto a second line instead of running off the image.
    line1, line2 = text, ""
    if f.getlength(text) > SIZE - 20:
        cut = len(tokens) // 2
        line1, line2 = " ".join(tokens[:cut]), " ".join(tokens[cut:])
    d.text((10, int(SIZE * 0.83)), line1, fill=WHITE_INDEX, font=f)
    if line2:
        d.text((10, int(SIZE * 0.91)), line2, fill=WHITE_INDEX, font=f)
    return img


def _white_index() -> int:
    pal = _palette().getpalette()[: 64 * 3]
    colors = [tuple(pal[i: i + 3]) for i in range(0, len(pal), 3)]
    return max(range(len(colors)), key=lambda i: sum(colors[i]))


def _number_line_base(max_position: int) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, y = 25, SIZE - 25, 230
    d.line((left, y, right, y), fill=(0, 0, 0), width=3)
    f = font(14, bold=False)
    for p in range(max_position + 1):
        x = left + (right - left) * p / max(1, max_position)
        d.line((x, y - 8, x, y + 8), fill=(0, 0, 0), width=2)
        d.text((x, y + 12), str(p), fill=(0, 0, 0), font=f, anchor="mt")
    return img


def number_line(target: int, current: int, max_position: int) -> Image.Image:
    return _number_line(target, current, max_position).copy()


@lru_cache(maxsize=1024)
def _number_line(target: int, current: int, max_position: int) -> Image.Image:
    """RL4VLM's "Target: t" / "Current: c" text, plus both drawn on a number line (red triangle:
    target, blue disc: current) so that the state is visible without reading digits."""
    img = _number_line_base(max_position).copy()
    d = ImageDraw.Draw(img)
    f = font(36)
    d.text((30, 30), f"Target: {target}", fill=(200, 20, 30), font=f)
    d.text((30, 110), f"Current: {current}", fill=(20, 60, 200), font=f)
    left, right, y = 25, SIZE - 25, 230

    def x_of(p: int) -> float:
        return left + (right - left) * p / max(1, max_position)

    xt, xc = x_of(target), x_of(current)
    d.polygon([(xt - 10, y - 34), (xt + 10, y - 34), (xt, y - 14)], fill=(200, 20, 30))
    d.ellipse((xc - 9, y - 9, xc + 9, y + 9), fill=(20, 60, 200))
    return _quantize(img)


WHITE_INDEX = _white_index()


def to_png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def prefetch_table(cards: tuple[tuple[int, str], ...], target: int | None) -> None:
    """Draw a hand's table ahead of its first frame (into the table cache)."""
    bare_table(cards, target)
