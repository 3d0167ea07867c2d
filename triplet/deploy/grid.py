"""A picture of search results: one row per query, the query then its top-k, each with a caption.

Pillow only (no matplotlib, no torch), so search.py keeps its small deployment footprint.
"""
from PIL import Image, ImageDraw, ImageFont, ImageOps

from triplet.deploy.preprocess import open_rgb
from triplet.errors import UserError
from triplet.fileio import atomic_path

THUMB = 160
CAPTION = 36
GAP = 8


def _thumbnail(path):
    return ImageOps.pad(open_rgb(path), (THUMB, THUMB), color=(255, 255, 255))


def _shorten(text, limit=24):
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def draw_grid(rows, out_path):
    """``rows``: [(query path, [(path, score, caption), ...])]; writes a PNG atomically to ``out_path``."""
    columns = 1 + max((len(matches) for _, matches in rows), default=0)
    cell_w, cell_h = THUMB + GAP, THUMB + CAPTION + GAP
    sheet = Image.new("RGB", (GAP + columns * cell_w, GAP + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for r, (query, matches) in enumerate(rows):
        top = GAP + r * cell_h
        cells = [(query, ["query", _shorten(query.name if hasattr(query, "name") else str(query))], "#1f5fbf")]
        cells += [(path, [f"{rank}. {score:.3f}", _shorten(caption)], "#999999")
                  for rank, (path, score, caption) in enumerate(matches, 1)]
        for c, (path, lines, colour) in enumerate(cells):
            left = GAP + c * cell_w
            sheet.paste(_thumbnail(path), (left, top))
            draw.rectangle((left - 1, top - 1, left + THUMB, top + THUMB), outline=colour, width=2 if c == 0 else 1)
            for i, line in enumerate(lines):
                draw.text((left + 2, top + THUMB + 3 + 15 * i), line, fill="black", font=font)
    try:
        with atomic_path(out_path) as tmp:
            sheet.save(tmp, format="PNG")
    except OSError as e:
        raise UserError(f"--grid {out_path}: cannot write the picture ({e})") from e
