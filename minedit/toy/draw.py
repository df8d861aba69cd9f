"""Drawing toy scenes, placing shapes, and the set of right answers to an add (DESIGN §10).

A scene object is a dict {shape, colour, size ("small"/"large"), x, y} with its centre in pixels; shapes are
drawn without anti-aliasing in exact palette colours, so a target image is exact and a mask is a footprint.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .phrases import BACKGROUNDS, COLOURS, RADIUS, WHERE


def draw_shape(draw: ImageDraw.ImageDraw, o: dict, size: int, fill) -> None:
    r, x, y = RADIUS[o["size"]] * size, o["x"], o["y"]
    if o["shape"] == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o["shape"] == "square":
        h = 0.8 * r  # a little inside the circumcircle so the areas of the shapes look alike
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:
        n, inner = {"triangle": (3, 1.0), "diamond": (4, 1.0), "star": (10, 0.45)}[o["shape"]]
        pts = [(x + r * (1 if k % 2 == 0 else inner) * math.sin(2 * math.pi * k / n),
                y - r * (1 if k % 2 == 0 else inner) * math.cos(2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(pts, fill=fill)


def render(background: str, objects: list[dict], size: int) -> Image.Image:
    """RGB image of a scene description, drawn in list order with exact palette colours."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o, size, COLOURS[o["colour"]])
    return img


def footprint(o: dict, size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(img), o, size, 255)
    return np.asarray(img) > 0


def dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (1 px, 8-neighbourhood)."""
    p, (h, w) = np.pad(m, 1), m.shape
    return np.logical_or.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def fits(o: dict, others: list[dict], size: int) -> bool:
    """The shape lies apart from every other one: not even its 1-px border touches them."""
    grown = dilate(footprint(o, size))
    return not any((grown & footprint(p, size)).any() for p in others)


def centre_range(size_word: str, size: int, box) -> tuple[int, int, int, int]:
    """box = (x0, x1, y0, y1) (inclusive) cut to the centres where a shape of this size stays 1 px inside."""
    lo, hi = math.ceil(RADIUS[size_word] * size) + 1, size - 2 - math.ceil(RADIUS[size_word] * size)
    return max(lo, box[0]), min(hi, box[1]), max(lo, box[2]), min(hi, box[3])


def place(rng, size, others, shape, size_word, box=(0, 10**9, 0, 10**9), tries=30):
    """A shape with its centre drawn in box = (x0, x1, y0, y1) (inclusive) that touches nothing, else None."""
    x0, x1, y0, y1 = centre_range(size_word, size, box)
    if x0 > x1 or y0 > y1:
        return None
    for _ in range(tries):
        o = {"shape": shape, "size": size_word, "x": int(rng.integers(x0, x1 + 1)), "y": int(rng.integers(y0, y1 + 1))}
        if fits(o, others, size):
            return o
    return None


def where(o: dict, size: int) -> str:
    """Canonical absolute position of a centre ("at the top left", "in the middle"): thirds split at 0.4 and 0.6
    of the side. The explicit rewrite of an add names its place this way."""
    h = "left" if o["x"] < 0.4 * size else "right" if o["x"] > 0.6 * size else None
    v = "top" if o["y"] < 0.4 * size else "bottom" if o["y"] > 0.6 * size else None
    return WHERE[(h is not None) + 2 * (v is not None)].format(h=h, v=v)


# ---------------------------------------------------------------- the right answers to an add
def valid_targets(row: dict, size: int, field: str = "instruction") -> list[dict]:
    """Every added shape that fulfils an add row's text `field`, placements that touch nothing:
      instruction            each free size x each centre in the row's `add_region` box (what `place` could draw);
      optimized_instruction  the explicit rewrite ("add a small red star at the top left") fixes the size and
                             names a region by `where`: the stored size x every centre with the same `where`.
    Other fields, and rows of other kinds, have exactly one valid target, the stored one, and give []."""
    free = row.get("add_region")
    if not free or field not in ("instruction", "optimized_instruction"):
        return []
    new, others = row["target_objects"][-1], row["objects"]
    sizes, box, region = free["sizes"], free["box"], None
    if field == "optimized_instruction":
        sizes, box, region = [new["size"]], (0, size, 0, size), where(new, size)
    out = []
    for size_word in sizes:
        x0, x1, y0, y1 = centre_range(size_word, size, box)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                o = {"shape": new["shape"], "size": size_word, "x": x, "y": y}
                if (region is None or where(o, size) == region) and fits(o, others, size):
                    out.append(dict(o, colour=new["colour"]))
    return out


def nearest_target(row: dict, pred: np.ndarray, field: str = "instruction"
                   ) -> tuple[Image.Image, Image.Image, int, list[dict]] | None:
    """For an add row: the valid target of its text `field` closest to `pred` (H x W x 3 in [0, 1]) in squared
    error -> (its image, its mask, how many valid targets there were, its objects). "Add a star at the top" has
    many right answers; an edit that draws the star anywhere the instruction allows is scored against that answer,
    not the one place the generator happened to draw. None when there is one valid target (see `valid_targets`)."""
    size = pred.shape[0]
    options = valid_targets(row, size, field)
    if not options:
        return None
    base = np.asarray(render(row["background"], row["objects"], size), np.float32) / 255
    best, best_err = None, float("inf")
    for o in options:
        fp = footprint(o, size)
        # A candidate target is the source scene with the new shape's footprint painted: no render per candidate.
        err = ((pred - np.where(fp[..., None], np.float32(COLOURS[o["colour"]]) / 255, base)) ** 2).sum()
        if err < best_err:
            best, best_err = o, err
    objects = row["objects"] + [best]
    mask = Image.fromarray(dilate(footprint(best, size)).astype(np.uint8) * 255, "L")
    return render(row["background"], objects, size), mask, len(options), objects
