"""Pictures and tables of the command line and the demo: a colour palette, overlays, side-by-side panels
with titles and a legend, the labelled confusion matrix (PNG arrays), and plain-text result tables.

Text is drawn with PIL's default font (PIL comes with torchvision), so no font file is needed.
"""
from __future__ import annotations

import numpy as np

from primaps_fast import fileio

TITLE_HEIGHT = 18  # rows of the title band above each panel
GAP = 4  # white columns between panels
_INK = (0, 0, 0)
_WHITE = (255, 255, 255)


def palette(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 distinct colours; the last entry (ignored pixels) is black."""
    rng = np.random.default_rng(7)
    base = np.array([[128, 64, 128], [70, 130, 180], [107, 142, 35], [220, 20, 60], [250, 170, 30],
                     [0, 0, 142], [244, 35, 232], [70, 70, 70], [152, 251, 152], [255, 0, 0]], dtype=np.uint8)
    extra = rng.integers(40, 256, (max(0, n - len(base)), 3)).astype(np.uint8)
    return np.concatenate([np.concatenate([base, extra])[:n], np.zeros((1, 3), np.uint8)])


def colorize(ids: np.ndarray, n: int) -> np.ndarray:
    """``(H, W)`` ids in ``[0, n)`` (anything else is drawn black) -> ``(H, W, 3)`` uint8."""
    ids = np.asarray(ids)
    pal = palette(n)
    safe = np.where((ids >= 0) & (ids < n), ids, n)
    return pal[safe]


def blend(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha * color + (1 - alpha) * image``, rounded to uint8."""
    return (alpha * color.astype(np.float32) + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


# ----------------------------------------------------------------------------- text
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _fitting(texts, widths, sizes=(13, 11, 9)):
    """``(texts, font)``: the largest font of ``sizes`` at which every text fits its width in pixels (else
    the smallest, with the texts that still do not fit shortened with "...")."""
    for size in sizes:
        font = _font(size)
        if all(_text_width(t, font) <= w for t, w in zip(texts, widths)):
            return list(texts), font
    out = []
    for t, w in zip(texts, widths):
        cut = t
        while len(cut) > 1 and _text_width(cut, font) > w:
            cut = cut[:-2] + "…" if cut.endswith("…") else cut[:-1] + "…"
        out.append(cut)
    return out, font


def _put(draw, xy, text: str, font, fill, align: str = "c") -> None:
    """Draw ``text`` vertically centred on ``xy``, horizontally centred (``align="c"``), starting at it
    ("l") or ending at it ("r"). (Positions from the text's box: the bitmap font of old Pillow versions
    has no text anchors.)"""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = {"l": xy[0], "c": xy[0] - (x1 - x0) / 2, "r": xy[0] - (x1 - x0)}[align] - x0
    draw.text((x, xy[1] - (y1 - y0) / 2 - y0), text, fill=fill, font=font)


def _draw(array: np.ndarray):
    from PIL import Image, ImageDraw

    image = Image.fromarray(array)
    return image, ImageDraw.Draw(image)


# ----------------------------------------------------------------------------- panels
def titled_panels(panels, titles, *, gap: int = GAP) -> np.ndarray:
    """``(H, W_i, 3)`` uint8 panels side by side with white gaps, each under its title (a band of
    ``TITLE_HEIGHT`` rows): ``(TITLE_HEIGHT + H, sum W_i + gap * (n - 1), 3)``."""
    if len(panels) != len(titles):
        raise ValueError(f"titles: {len(titles)} titles for {len(panels)} panels")
    H = panels[0].shape[0]
    texts, font = _fitting(titles, [p.shape[1] - 2 for p in panels])
    row = []
    for i, (p, text) in enumerate(zip(panels, texts)):
        if i:
            row.append(np.full((TITLE_HEIGHT + H, gap, 3), 255, np.uint8))
        band, draw = _draw(np.full((TITLE_HEIGHT, p.shape[1], 3), 255, np.uint8))
        _put(draw, (p.shape[1] / 2, TITLE_HEIGHT / 2), text, font, _INK)
        row.append(np.concatenate([np.asarray(band), p], 0))
    return np.concatenate(row, 1)


def legend(names, colors, width: int, *, caption: str = "", swatch: int = 12) -> np.ndarray:
    """A white ``(rows, width, 3)`` legend: ``caption``, then a colour swatch and the name of every entry,
    wrapped to ``width`` pixels."""
    font = _font(12)
    items = ([(caption, _text_width(caption, font) + 10, None)] if caption else []) + [
        (name, swatch + 4 + _text_width(name, font) + 14, tuple(int(c) for c in color))
        for name, color in zip(names, colors)]
    lines, line, used = [], [], 0
    for item in items:
        if line and used + item[1] > width:
            lines.append(line)
            line, used = [], 0
        line.append(item)
        used += item[1]
    lines.append(line)
    row_h = swatch + 6
    image, draw = _draw(np.full((row_h * len(lines) + 4, width, 3), 255, np.uint8))
    for r, line in enumerate(lines):
        x, y = 4, 4 + r * row_h
        for text, w, color in line:
            if color is None:
                _put(draw, (x, y + swatch / 2), text, font, _INK, "l")
            else:
                draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color, outline=_INK)
                _put(draw, (x + swatch + 4, y + swatch / 2), text, font, _INK, "l")
            x += w
    return np.asarray(image)


def stack(*rows) -> np.ndarray:
    """Stack ``(H_i, W_i, 3)`` pictures vertically, left-aligned, padded with white to the widest."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                           for r in rows], 0)


# ----------------------------------------------------------------------------- confusion matrix
def cell_color(fraction: float) -> tuple:
    """Fill of a confusion cell holding ``fraction`` of its row: white (0) to dark blue (1)."""
    f = min(max(float(fraction), 0.0), 1.0)
    return (round(255 - 225 * f), round(255 - 175 * f), round(255 - 90 * f))


def confusion_picture(conf: np.ndarray, names, *, title: str | None = None, cell: int = 36) -> np.ndarray:
    """The row-normalised confusion matrix ``conf`` (K, K) (rows = ground-truth classes, columns = matched
    predictions) as an RGB array: cells shaded by the fraction of the row, each with its percentage,
    rows and columns labelled with ``names``, under a title that says how to read it."""
    from PIL import Image, ImageDraw

    conf = np.asarray(conf, dtype=np.float64)
    K = conf.shape[0]
    if conf.shape != (K, K) or len(names) != K:
        raise ValueError(f"conf: expected ({len(names)}, {len(names)}) for {len(names)} names, got {conf.shape}")
    rows = conf.sum(1, keepdims=True)
    frac = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    font, small = _font(12), _font(11)
    label_w = max(_text_width(n, font) for n in names) + 10
    heading = (f"{title}: " if title else "") + "rows = ground-truth class, columns = matched prediction, % of the row"
    top = 2 * TITLE_HEIGHT + label_w
    width = max(label_w + K * cell + 8, _text_width(heading, font) + 16)
    image = Image.new("RGB", (width, top + K * cell + 8), _WHITE)
    draw = ImageDraw.Draw(image)
    _put(draw, (8, TITLE_HEIGHT / 2), heading, font, _INK, "l")
    for i, name in enumerate(names):
        y = top + i * cell
        _put(draw, (label_w - 6, y + cell / 2), name, font, _INK, "r")
        # the column label, written along the column (rotated by 90 degrees)
        tag = Image.new("RGB", (label_w, cell), _WHITE)
        _put(ImageDraw.Draw(tag), (4, cell / 2), name, font, _INK, "l")
        image.paste(tag.rotate(90, expand=True), (label_w + i * cell, 2 * TITLE_HEIGHT))
        for j in range(K):
            x = label_w + j * cell
            empty = rows[i, 0] == 0
            fill = (230, 230, 230) if empty else cell_color(frac[i, j])
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=(200, 200, 200))
            value = "-" if empty else f"{100 * frac[i, j]:.0f}"
            ink = _WHITE if frac[i, j] > 0.5 else _INK
            _put(draw, (x + cell / 2, y + cell / 2), value, small, ink)
    return np.asarray(image)


def confusion_png(path, conf: np.ndarray, names, *, title: str | None = None) -> None:
    """Write :func:`confusion_picture` as a PNG file (atomically)."""
    fileio.write_png(path, confusion_picture(conf, names, title=title))


# ----------------------------------------------------------------------------- tables
def format_table(rows, header) -> str:
    """A Markdown table of ``rows`` (lists of cells) under ``header``, columns padded to equal width."""
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])
