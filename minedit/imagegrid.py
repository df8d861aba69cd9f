"""The one image-grid drawer: rows of captioned cells -> one PIL image.

Every sheet minedit writes is drawn here: train.py's sample grids and evaluate.py's contact sheet (one cell per
row: source | target | edit, side by side, the instruction under it), evaluate.py's per-category grid (a row
label, then one such cell per edit) and infer.py's attention-map sheet (a title, then the source and one heat map
per token). The callers decide what goes in a cell; this file decides where it goes and how text fits.

    title (wrapped to the sheet's width)
    row label | cell  gap  cell  gap  ...          a cell: its image at the top left of a cell_w×cell_h box,
              | caption    caption                 its caption wrapped under it in up to `lines` lines
              gap
    row label | cell ...
"""
from __future__ import annotations

LINE_H = 12   # px per text line of PIL's default font


def side_by_side(images, side: int):
    """PIL images -> one image of them left to right, each resized to side×side (nearest: pixels stay crisp)."""
    from PIL import Image

    strip = Image.new("RGB", (side * len(images), side), "white")
    for k, img in enumerate(images):
        strip.paste(img.convert("RGB").resize((side, side), Image.NEAREST), (k * side, 0))
    return strip


def draw_grid(rows, cell: tuple[int, int], lines: int = 1, line_h: int = LINE_H, gap: int = 0,
              row_labels: list[str] | None = None, label_w: int = 0, title: str = ""):
    """rows: lists of (PIL image or None, caption) cells -> a PIL RGB image on white.

    cell: (w, h) of a cell's image box; an image of another size is resized to it (nearest). Captions wrap to
    the cell's width and are cut after `lines` lines; `gap` px separate cells and rows. `row_labels` (one per
    row) are drawn in a column `label_w` px wide, beside the middle of their row."""
    from PIL import Image, ImageDraw

    w, h = cell
    cols = max((len(r) for r in rows), default=1)
    width = label_w + cols * (w + gap)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # measures text before the sheet's height is known
    head = fit(draw, title, width - 4, lines=len(title))  # all of it
    top = 2 + line_h * len(head) if head else 0
    row_h = h + lines * line_h + gap
    sheet = Image.new("RGB", (width, top + max(1, len(rows)) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(head):
        draw.text((2, 1 + line_h * k), text, fill="black")
    for r, cells in enumerate(rows):
        y = top + r * row_h
        if row_labels:
            draw.text((4, y + h // 2 - 6), "".join(fit(draw, row_labels[r], label_w - 6, 1)), fill="black")
        for c, (img, caption) in enumerate(cells):
            x = label_w + c * (w + gap)
            if img is not None:
                img = img.convert("RGB")
                sheet.paste(img if img.size == (w, h) else img.resize((w, h), Image.NEAREST), (x, y))
            for n, text in enumerate(fit(draw, caption, w - 2, lines)):
                draw.text((x + 2, y + h + 1 + n * line_h), text, fill="black")
    return sheet


def fit(draw, text: str, width: int, lines: int) -> list[str]:
    """Greedy word wrap measured in the font's pixels: at most `lines` lines, none wider than `width` px (a word
    wider than a line is cut between characters)."""
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial) <= width:
            line = trial
            continue
        if line:
            out.append(line)
        line = word
        while len(line) > 1 and draw.textlength(line) > width:
            k = len(line) - 1
            while k > 1 and draw.textlength(line[:k]) > width:
                k -= 1
            out.append(line[:k])
            line = line[k:]
        if len(out) >= lines:
            break
    return (out + [line] if line else out)[:lines]
