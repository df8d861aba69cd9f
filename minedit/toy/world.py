"""The toy world: drawn shape scenes with exact edits and instructions at three levels (DESIGN §10).

A scene is a plain background (white, gray or black) and 1-3 shapes that do not touch, each a (shape, colour,
size, centre). An edit changes the scene description and the target is re-rendered from it, so it is exact:
remove -> the shape is gone; add -> a new shape at a free place; replace -> another shape and/or colour with the
same centre and size. The mask is the union of the old and new footprints dilated by 1 px (L PNG, 255 = edit).

Instructions follow the Reason-Edit levels that InsightEdit evaluates on (the row's `category`):
  simple         names colour and shape ("remove the red circle"); only when that pair is unique in the scene;
  understanding  relative position / size, colour among alike shapes, counting ("make the left square green");
  reasoning      attribute knowledge ("remove the shape with three corners", "... the colour of grass",
                 "Is there anything round? Replace it with a blue square.").
Every referring expression is checked to fit exactly one shape, with positions compared at a margin of
0.15 x image side, so the target is well defined. Adds are under-determined by nature: the phrase fixes shape,
colour (size when it says one) and a region, and one free place in that region is drawn; the row's
`add_region` records the freedom (free sizes, box of centres) so that evaluation can accept any valid answer
(`minedit.toy.draw.valid_targets`, `nearest_target`).

Row texts: `instruction` (what trains: the simple phrasing on simple rows, the advanced one otherwise),
`simple_instruction` (colour+shape phrasing, plus size or position where colour+shape is not unique),
`advanced_instruction` ("" on simple rows), `optimized_instruction` (one canonical explicit template: MIND-Edit's
T_opt), `caption` and `target_caption`. Rows also carry the scene descriptions (`objects`, `target_objects`).

Choices the design left open: no anti-aliasing (exact palette pixels); sample i draws from numpy's
default_rng([seed, i]), so a file never depends on n; category = i mod 3 and kind = (i div 3) mod 3, balanced
exactly; the last round(n x eval_fraction) samples are the eval split; captions.jsonl holds the source and target
images of the train split only. The words and templates live in phrases.py (with VOCAB), the referring
expressions built from them in refer.py, drawing in draw.py; `python -m minedit.toy` (__main__.py) writes a world.
`cached_world` keeps one generated world per (VERSION, seed, n, size) for training runs to reuse.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .phrases import (
    SHAPES, COLOURS, BACKGROUNDS, BG_WEIGHTS, RADIUS, CATEGORIES, KINDS, COLOUR_OF, COLOUR_OF_PHRASE, REMOVE,
    REMOVE_Q, REPLACE, REPLACE_Q, RESHAPE, RESHAPE_Q, RECOLOUR, RECOLOUR_Q, ADD, OPTIMIZED, SIDE_WHERE, RELATIONS,
    CORNER, SAME_COLOUR, COPY, CAPTIONS, EMPTY_CAPTIONS,
)
from .draw import dilate, fits, footprint, place, render, where as _where
from .refer import explicit, new_desc, pick, reasoning, understanding

VERSION = 2  # bump when the generator's output changes: cached worlds are keyed by it
MARGIN = 0.15  # positions are compared at this fraction of the image side (refer.py's `margin`)
PLACE_SHARE = 0.3  # the share of a caption's objects whose place it names ("a red star at the top left")


def _articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


# ---------------------------------------------------------------- positions and captions
def _side_box(side: str | None, size: int) -> tuple[int, int, int, int]:
    lo, hi, big = math.ceil(0.4 * size) - 1, math.floor(0.6 * size) + 1, 10**9
    return {None: (0, big, 0, big), "left": (0, lo, 0, big), "right": (hi, big, 0, big),
            "top": (0, big, 0, lo), "bottom": (0, big, hi, big)}[side]


def caption(rng, background: str, objects: list[dict], size: int, place_share: float = PLACE_SHARE) -> str:
    """'a red circle and a small blue square on a white background'-style description of a scene, naming the
    place of each object with probability place_share."""
    if not objects:
        return _articles(pick(rng, EMPTY_CAPTIONS).format(b=background))
    parts = [f"a {o['size'] + ' ' if rng.random() < 0.5 else ''}{o['colour']} {o['shape']}"
             + (" " + _where(o, size) if rng.random() < place_share else "") for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return _articles(pick(rng, CAPTIONS).format(l=listed, b=background))


# ---------------------------------------------------------------- edits
def _edit_existing(rng, size, bg, objs, category, kind, margin):
    """Remove or replace one shape; returns the texts and the edited scene, or None to draw again."""
    t = int(rng.integers(len(objs)))
    o, named = objs[t], explicit(objs, t, margin)
    if named is None:
        return None
    if category == "simple":
        refs = [(named, None)] if named == f"the {o['colour']} {o['shape']}" else []
    elif category == "understanding":
        refs = [(r, None) for r in understanding(objs, t, margin)]
    else:
        refs = reasoning(rng, objs, t)
    if not refs:
        return None
    ref, question = pick(rng, refs)
    ask = question is not None and rng.random() < 0.5  # reasoning only: other levels have no question form

    def say(plain, asked, r, **kw):  # the question form only ever stands in for the advanced referent
        return pick(rng, asked).format(q=question, **kw) if ask and r is ref else pick(rng, plain).format(r=r, **kw)

    if kind == "remove":
        new, targets = None, objs[:t] + objs[t + 1:]
        advanced, simple = say(REMOVE, REMOVE_Q, ref), say(REMOVE, REMOVE_Q, named)
    else:
        mode = pick(rng, ("both", "colour", "shape"))
        colour = o["colour"] if mode == "shape" else pick(rng, [c for c in COLOURS if c not in (bg, o["colour"])])
        shape = o["shape"] if mode == "colour" else pick(rng, [s for s in SHAPES if s != o["shape"]])
        new = dict(o, shape=shape, colour=colour)
        targets = objs[:t] + [new] + objs[t + 1:]
        if not fits(new, objs[:t] + objs[t + 1:], size):
            return None
        by_shape, by_colour = (False, False)
        if category == "reasoning" and rng.random() < 0.5:
            by_shape, by_colour = pick(rng, ((True, False), (False, True), (True, True)))
        if mode == "colour":
            said = COLOUR_OF_PHRASE.format(pick(rng, COLOUR_OF[colour])) if by_colour else colour
            advanced, simple = say(RECOLOUR, RECOLOUR_Q, ref, c=said), say(RECOLOUR, RECOLOUR_Q, named, c=colour)
        elif mode == "shape":
            advanced = say(RESHAPE, RESHAPE_Q, ref, n=new_desc(rng, shape, by_shape=by_shape))
            simple = say(RESHAPE, RESHAPE_Q, named, n=new_desc(rng, shape))
        else:
            advanced = say(REPLACE, REPLACE_Q, ref, n=new_desc(rng, shape, colour, None, by_shape, by_colour))
            simple = say(REPLACE, REPLACE_Q, named, n=new_desc(rng, shape, colour))
    optimized = OPTIMIZED[kind].format(r=named, c=new and new["colour"], s=new and new["shape"])
    return dict(objects=targets, old=o, new=new, advanced=advanced, simple=simple, optimized=optimized)


def _edit_add(rng, size, bg, objs, category, margin):
    """Add one shape; the phrase fixes shape, colour and a region (see the module docstring)."""
    shape, size_word = pick(rng, SHAPES), pick(rng, RADIUS)
    colour = pick(rng, [c for c in COLOURS if c != bg])
    said_size = size_word if rng.random() < 0.5 else None
    box, where, copied = _side_box(None, size), "", False
    if category == "simple" or (category == "reasoning" and (not objs or rng.random() < 0.5)):
        side = pick(rng, (None, "left", "right", "top", "bottom"))
        box, where = _side_box(side, size), SIDE_WHERE.get(side, "")
        knows = (False, False) if category == "simple" else pick(rng, ((True, False), (False, True), (True, True)))
        desc = new_desc(rng, shape, colour, said_size, *knows)
    else:
        modes = ("relation", "corner", "same colour", "copy") if category == "understanding" else ("relation",)
        mode = pick(rng, modes)
        if mode != "corner":
            if not objs:
                return None
            a = int(rng.integers(len(objs)))
            if category == "understanding":
                plain = [explicit(objs, a, margin)] if explicit(objs, a, margin) else []
                anchors = plain + understanding(objs, a, margin)
            else:
                anchors = [r for r, _ in reasoning(rng, objs, a)]
            if not anchors:
                return None
            anchor, ao = pick(rng, anchors), objs[a]
        desc = new_desc(rng, shape, colour, said_size)
        if mode == "relation":
            side = pick(rng, RELATIONS)
            gap, near = (RADIUS[size_word] + RADIUS[ao["size"]]) * size, 0.2 * size
            x, y = ao["x"], ao["y"]
            box = {"left": (0, math.floor(x - gap), math.ceil(y - near), math.floor(y + near)),
                   "right": (math.ceil(x + gap), 10**9, math.ceil(y - near), math.floor(y + near)),
                   "top": (math.ceil(x - near), math.floor(x + near), 0, math.floor(y - gap)),
                   "bottom": (math.ceil(x - near), math.floor(x + near), math.ceil(y + gap), 10**9)}[side]
            where = RELATIONS[side].format(a=anchor)
        elif mode == "corner":
            v, h = pick(rng, ("top", "bottom")), pick(rng, ("left", "right"))
            bv, bh = _side_box(v, size), _side_box(h, size)
            box, where = (bh[0], bh[1], bv[2], bv[3]), CORNER.format(v=v, h=h)
        elif mode == "same colour":
            colour = ao["colour"]
            desc = pick(rng, SAME_COLOUR).format(z=said_size + " " if said_size else "", s=shape, a=anchor)
        else:
            shape, size_word, copied = ao["shape"], ao["size"], True
            colour = pick(rng, [c for c in COLOURS if c not in (bg, ao["colour"])])
            desc = pick(rng, COPY).format(c=colour, a=anchor)
    new = place(rng, size, objs, shape, size_word, box)
    if new is None:
        return None
    new["colour"] = colour
    # What the instruction leaves free (see valid_targets): the size unless it is said or copied, the centre in box.
    free = {"sizes": [size_word] if said_size or copied else list(RADIUS), "box": list(box)}
    advanced = pick(rng, ADD).format(n=desc, w=where)
    at = _where(new, size)
    simple = advanced if category == "simple" else pick(rng, ADD).format(n=new_desc(rng, shape, colour), w=" " + at)
    optimized = OPTIMIZED["add"].format(z=size_word, c=colour, s=shape, w=at)
    return dict(objects=objs + [new], old=None, new=new, advanced=advanced, simple=simple, optimized=optimized,
                free=free)


def _scene(rng, size):
    bg = list(BACKGROUNDS)[int(rng.choice(len(BACKGROUNDS), p=BG_WEIGHTS))]
    objs = []
    for _ in range(int(rng.integers(1, 4))):
        # Repeating a shape or a colour now and then makes "the left square" / "the red one" questions possible.
        shape = pick(rng, [p["shape"] for p in objs]) if objs and rng.random() < 0.35 else pick(rng, SHAPES)
        colour = pick(rng, [c for c in COLOURS if c != bg])
        if objs and rng.random() < 0.25 and objs[-1]["colour"] != bg:
            colour = objs[-1]["colour"]
        o = place(rng, size, objs, shape, pick(rng, RADIUS))
        if o is not None:
            objs.append(dict(o, colour=colour))
    return bg, objs


def sample(rng: np.random.Generator, size: int = 32, category: str | None = None, kind: str | None = None) -> dict:
    """One editing sample in memory: PIL `source`, `target` (RGB), `mask` (L) and every text and description."""
    category = category or pick(rng, CATEGORIES)
    kind = kind or pick(rng, KINDS)
    if category not in CATEGORIES or kind not in KINDS:
        raise ValueError(f"unknown category {category!r} or kind {kind!r} — use one of {CATEGORIES} / {KINDS}")
    margin = MARGIN * size
    for _ in range(1000):
        bg, objs = _scene(rng, size)
        if kind == "add":
            e = _edit_add(rng, size, bg, objs, category, margin)
        else:
            e = _edit_existing(rng, size, bg, objs, category, kind, margin) if objs else None
        if e is not None:
            break
    else:
        raise RuntimeError(f"could not draw a {category} {kind} edit at size {size} — use a size of at least 24")
    region = np.zeros((size, size), bool)
    for o in (e["old"], e["new"]):
        if o is not None:
            region |= footprint(o, size)
    simple = _articles(e["simple"])
    advanced = "" if category == "simple" else _articles(e["advanced"])
    return {"source": render(bg, objs, size), "target": render(bg, e["objects"], size),
            "mask": Image.fromarray(dilate(region).astype(np.uint8) * 255, "L"),
            "instruction": advanced or simple, "simple_instruction": simple, "advanced_instruction": advanced,
            "optimized_instruction": _articles(e["optimized"]), "category": category, "kind": kind,
            "caption": caption(rng, bg, objs, size), "target_caption": caption(rng, bg, e["objects"], size),
            "background": bg, "objects": objs, "target_objects": e["objects"],
            **({"add_region": e["free"]} if "free" in e else {})}


# ---------------------------------------------------------------- writer
def generate(out_dir, n: int, seed: int, size: int = 32, eval_fraction: float = 0.1) -> dict:
    """Write images/, train.jsonl, eval.jsonl, captions.jsonl and meta.json under out_dir; returns the meta."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r} — pass --n 1000 or similar")
    if not 24 <= size <= 1024:
        raise ValueError(f"size {size} is out of range — use a size between 24 and 1024 (32 or 64 are typical)")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction {eval_fraction} must be in [0, 1) — e.g. 0.1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_eval = min(n - 1, max(1 if n >= 2 and eval_fraction > 0 else 0, round(n * eval_fraction)))
    splits, captions = {"train": [], "eval": []}, []
    counts = {"category": dict.fromkeys(CATEGORIES, 0), "kind": dict.fromkeys(KINDS, 0)}
    for i in range(n):
        s = sample(np.random.default_rng([seed, i]), size, CATEGORIES[i % 3], KINDS[(i // 3) % 3])
        paths = {k: f"images/{i:06d}_{k}.png" for k in ("source", "target", "mask")}
        for k, p in paths.items():
            s[k].save(out / p, format="PNG")
        row = {"id": i, **paths, **{k: v for k, v in s.items() if k not in paths}}
        split = "eval" if i >= n - n_eval else "train"
        splits[split].append(row)
        counts["category"][row["category"]] += 1
        counts["kind"][row["kind"]] += 1
        if split == "train":
            captions += [{"image": paths["source"], "caption": row["caption"]},
                         {"image": paths["target"], "caption": row["target_caption"]}]
    for name, rows in (("train", splits["train"]), ("eval", splits["eval"]), ("captions", captions)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"version": VERSION, "seed": seed, "n": n, "size": size, "eval_fraction": eval_fraction,
            "n_train": n - n_eval, "n_eval": n_eval, "n_captions": len(captions), **counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: its presence means complete
    return meta


def cached_world(seed: int, n: int, size: int = 32, root=None, main: bool = True, barrier=None) -> str:
    """Folder of the toy world (seed, n, size), generated once under root ($MINEDIT_CACHE or ~/.cache/minedit).

    Only the `main` process generates (into a temporary folder renamed into place, so a killed run leaves nothing
    half-written); every process then waits at `barrier()` when one is given (distributed training)."""
    root = Path(root or os.environ.get("MINEDIT_CACHE") or Path.home() / ".cache" / "minedit")
    path = root / f"toyworld-v{VERSION}-seed{seed}-n{n}-px{size}"
    if main and not (path / "meta.json").is_file():
        tmp = root / f".{path.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, n, seed, size)
        try:
            os.replace(tmp, path)
        except OSError:  # another job finished the same world first
            shutil.rmtree(tmp, ignore_errors=True)
    if barrier is not None:
        barrier()
    if not (path / "meta.json").is_file():
        raise RuntimeError(f"toy world {path} is missing — generate it on the main process first")
    return str(path)
