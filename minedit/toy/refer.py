"""Referring expressions of the toy world: the phrases that pick out exactly one shape of a scene.

Each level of InsightEdit's evaluation has its own kind (world.py's docstring lists them): `explicit` names
colour and shape (with size or position where those are not unique), `understanding` compares positions, sizes
and counts, `reasoning` goes through attribute knowledge ("the shape with three corners", "the colour of grass").
Every phrase returned here fits objs[t] and no other shape; positions are compared at `margin` pixels.
`new_desc` describes a shape that is not in the scene yet (the thing an add or a replace draws).
"""
from __future__ import annotations

from .phrases import (
    ALIKE, BIGGER, COLOURED_HEAD, COLOUR_CLAUSES, COLOUR_OF, COUNTING, EXPLICIT, HEADS, NAMED_HEAD,
    NEW_COLOUR_CLAUSES, NEW_SHAPE_CLUES, NUMBERS, ORDINAL, ORDINALS, QUESTIONS, RELATIVE, SHAPES, SHAPE_CLUES, SIDE,
    SMALLER,
)


def pick(rng, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def extreme(objs, members, t, axis, high, margin) -> bool:
    """objs[t] lies beyond every other member on `axis` (low side, or high side) by at least `margin`."""
    sign = 1 if high else -1
    return all(sign * (objs[t][axis] - objs[i][axis]) >= margin for i in members if i != t)


def explicit(objs, t, margin) -> str | None:
    """'the red square', adding size or position where colour+shape is not unique; None if nothing will do."""
    o, base = objs[t], f"{objs[t]['colour']} {objs[t]['shape']}"
    same = [i for i, p in enumerate(objs) if (p["colour"], p["shape"]) == (o["colour"], o["shape"])]
    if len(same) == 1:
        return f"the {base}"
    if sum(objs[i]["size"] == o["size"] for i in same) == 1:
        return f"the {o['size']} {base}"
    for (axis, high), side in SIDE.items():
        if extreme(objs, same, t, axis, high, margin):
            return EXPLICIT[side].format(b=base)
    return None


def understanding(objs, t, margin) -> list[str]:
    """Every understanding-level phrase that picks out objs[t] alone."""
    o, out = objs[t], []
    groups = [(list(range(len(objs))), "shape"),
              ([i for i, p in enumerate(objs) if p["shape"] == o["shape"]], o["shape"]),
              ([i for i, p in enumerate(objs) if p["colour"] == o["colour"]], f"{o['colour']} shape")]
    for members, noun in groups:
        if len(members) < 2:
            continue
        for (axis, high), phrases in RELATIVE.items():
            if extreme(objs, members, t, axis, high, margin):
                out += [p.format(n=noun) for p in phrases]
        if sum(objs[i]["size"] == o["size"] for i in members) == 1:
            out += [p.format(n=noun) for p in (BIGGER if o["size"] == "large" else SMALLER)]
    alike = groups[1][0]
    if len(alike) >= 2 and sum(objs[i]["colour"] == o["colour"] for i in alike) == 1:
        out += [p.format(c=o["colour"], k=NUMBERS[len(alike)], p=o["shape"] + "s") for p in ALIKE]
    for s in SHAPES:  # counting: the one odd shape among several alike
        if s != o["shape"] and sum(p["shape"] == s for p in objs) == len(objs) - 1 >= 2:
            out += [p.format(s=s) for p in COUNTING]
    if len(objs) == 3:
        for (axis, high), side in SIDE.items():
            order = sorted(range(3), key=lambda i: objs[i][axis], reverse=high)
            gaps = [abs(objs[order[k + 1]][axis] - objs[order[k]][axis]) for k in range(2)]
            if min(gaps) >= margin:
                out.append(ORDINAL.format(o=ORDINALS[order.index(t)], side=side))
    return out


def reasoning(rng, objs, t) -> list[tuple[str, str | None]]:
    """(noun phrase, question or None) pairs that pick out objs[t] alone through attribute knowledge."""
    o, out = objs[t], []
    for clause, shapes in SHAPE_CLUES:
        fit = [i for i, p in enumerate(objs) if p["shape"] in shapes]
        if fit == [t]:
            out.append((pick(rng, HEADS).format(clause), pick(rng, QUESTIONS).format(clause)))
        elif t in fit and [i for i in fit if objs[i]["colour"] == o["colour"]] == [t]:
            out.append((COLOURED_HEAD.format(c=o["colour"], k=clause), None))
    clause = pick(rng, COLOUR_CLAUSES).format(pick(rng, COLOUR_OF[o["colour"]]))
    same_colour = [i for i, p in enumerate(objs) if p["colour"] == o["colour"]]
    if same_colour == [t]:
        out.append((pick(rng, HEADS).format(clause), pick(rng, QUESTIONS).format(clause)))
    elif [i for i in same_colour if objs[i]["shape"] == o["shape"]] == [t]:
        out.append((NAMED_HEAD.format(s=o["shape"], k=clause), None))
    return out


def new_desc(rng, shape, colour=None, size_word=None, by_shape=False, by_colour=False) -> str:
    """'a small red circle'; with knowledge: 'a shape with three corners that has the colour of grass'."""
    c = "" if colour is None or by_colour else colour + " "
    core = pick(rng, NEW_SHAPE_CLUES[shape]).format(c=c) if by_shape else f"{c}{shape}"
    text = f"a {size_word + ' ' if size_word else ''}{core}"
    if by_colour:
        text += " " + pick(rng, NEW_COLOUR_CLAUSES).format(pick(rng, COLOUR_OF[colour]))
    return text
