"""The attention-map sheet: per recorded step, the source image, then one heat map per token over it.

Each panel is stretched from its own minimum to its maximum (where a token looks more than elsewhere, whatever
its weight); its label gives the token and its share of the attention averaged over the image (the shares of a
group sum to 100 %; the raw maps are in the .npz). Colours are a
hand-made black-purple-orange-yellow ramp blended over the grey source. The layout is imagegrid.draw_grid's.
"""
from __future__ import annotations

import numpy as np

CELL = 80        # the longer side of a panel, px
LABEL_H = 12     # the label strip under each panel
COLUMNS = 12     # panels per row (the source image included), wrapping after that
# (position in [0, 1], RGB): a perceptually ordered dark-to-bright ramp
RAMP = [(0.0, (0, 0, 4)), (0.3, (87, 16, 110)), (0.6, (188, 55, 84)), (0.8, (249, 142, 9)), (1.0, (252, 255, 164))]


def colorize(m: np.ndarray) -> np.ndarray:
    """h×w in [0, 1] -> h×w×3 uint8 along RAMP."""
    xs = [p for p, _ in RAMP]
    rgb = [np.interp(m, xs, [c[k] for _, c in RAMP]) for k in range(3)]
    return np.stack(rgb, -1).round().astype(np.uint8)


def panel(gray: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> "Image.Image":
    """One token's map m (h×w, latent grid) upsampled to `size` (w, h), stretched from its min to its max,
    over `gray` (h×w×3)."""
    from PIL import Image

    big = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    lo, hi = float(big.min()), float(big.max())
    big = np.clip((big - lo) / max(hi - lo, 1e-12), 0, 1)
    blend = 0.4 * gray + 0.6 * colorize(big).astype(np.float32)
    return Image.fromarray(blend.round().astype(np.uint8))


def render(source, text: np.ndarray, labels: list[str], image: np.ndarray | None, image_labels: list[str],
           timesteps: list[int], steps: list[int], ip_scale: float | None, hidden: int = 0):
    """source: PIL image; text: S×T×h×w, image: S×N×h×w or None (one row block per recorded step) -> PIL sheet.
    `hidden`: how many (padding) text tokens were left off the sheet, said in its header."""
    from PIL import Image, ImageDraw

    from ..imagegrid import draw_grid

    w0, h0 = source.size
    s = CELL / max(w0, h0)
    size = (max(1, round(w0 * s)), max(1, round(h0 * s)))
    src = source.convert("RGB").resize(size, Image.NEAREST if s >= 1 else Image.LANCZOS)
    gray = np.repeat(np.asarray(src.convert("L"), dtype=np.float32)[..., None], 3, -1)
    ImageDraw.Draw(src).rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(160, 160, 160))  # white on white
    names = list(labels) + list(image_labels)
    per_row = min(COLUMNS, 1 + len(names)) - 1  # panels per row, beside the source's column
    lam = "" if image is None else f"; img tokens: their own softmax, weight lambda={ip_scale:g}"
    lam += f"; {hidden} padding tokens not shown (in the .npz)" if hidden else ""
    title = ("cross-attention per token (conditional branch, mean over heads and layers); each panel stretched "
             f"min to max; % = the token's share{lam}")
    chars = max(3, size[0] // 6)  # ~6 px per character: a long token name is cut, its share stays in view
    rows = []
    for r, t in enumerate(timesteps):
        maps = list(text[r]) + ([] if image is None else list(image[r]))
        panels = [(panel(gray, m, size), f"{name[:chars - 4]} {100 * float(m.mean()):.0f}%")
                  for name, m in zip(names, maps)]
        step = f"step {steps[r] + 1}" if r < len(steps) else ""
        for k in range(0, len(panels), per_row):  # the source heads each step's block, then a blank column
            rows.append([(src, f"t={t} {step}") if k == 0 else (None, "")] + panels[k:k + per_row])
    return draw_grid(rows, size, line_h=LABEL_H, gap=2, title=title)
