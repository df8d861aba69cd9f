"""The toy world's language: its palette, sizes, world knowledge and every phrasing template (DESIGN §10).

world.py draws scenes and edits and fills these templates; they live apart so that either file reads
in one sitting. VOCAB is every word a template can emit, as split by `tokenize_words`: the toy tokenizers are
built from it, so a word added to a template here reaches them without further changes.
"""
from __future__ import annotations

import re
import string

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 70, 230), "yellow": (250, 210, 0),
           "purple": (140, 40, 180), "orange": (250, 130, 0), "white": (255, 255, 255)}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (170, 170, 170), "black": (0, 0, 0)}
BG_WEIGHTS = (0.6, 0.2, 0.2)
RADIUS = {"small": 0.14, "large": 0.23}  # circumradius as a fraction of the image side
CATEGORIES = ("simple", "understanding", "reasoning")
KINDS = ("remove", "add", "replace")
NUMBERS, ORDINALS = {2: "two", 3: "three"}, ("first", "second", "third")

# World knowledge for the reasoning level.
COLOUR_OF = {"red": ("a ripe tomato", "a strawberry", "a fire truck"), "green": ("grass", "a leaf", "a frog"),
             "blue": ("the sky", "the sea"), "yellow": ("the sun", "a banana", "a lemon"),
             "purple": ("grapes", "a plum"), "orange": ("a carrot", "a pumpkin"), "white": ("snow", "milk")}
SHAPE_CLUES = (("that is round", {"circle"}), ("with no corners", {"circle"}), ("that could roll", {"circle"}),
               ("that looks like a ball", {"circle"}), ("with three corners", {"triangle"}),
               ("with three sides", {"triangle"}), ("with 3 corners", {"triangle"}),
               ("with four corners", {"square", "diamond"}), ("with four sides", {"square", "diamond"}),
               ("with a flat top and four sides", {"square"}), ("that stands on one corner", {"diamond"}),
               ("with five points", {"star"}), ("that you could see in the night sky", {"star"}))
NEW_SHAPE_CLUES = {"circle": ("{c}shape with no corners", "round {c}shape", "{c}shape that could roll"),
                   "triangle": ("{c}shape with three corners", "{c}shape with three sides"),
                   "square": ("{c}shape with a flat top and four sides",),
                   "diamond": ("{c}shape that stands on one corner",), "star": ("{c}shape with five points",)}
COLOUR_CLAUSES = ("with the colour of {}", "that has the colour of {}", "that is the colour of {}",
                  "coloured like {}")
NEW_COLOUR_CLAUSES = ("that has the colour of {}", "in the colour of {}", "coloured like {}")
COLOUR_OF_PHRASE = "the colour of {}"

# Phrasing templates: {r} referent, {q} question, {n} new shape, {c} colour, {w} where.
REMOVE = ("remove {r}", "delete {r}", "erase {r}", "take away {r}", "get rid of {r}", "please remove {r}",
          "remove {r} from the picture", "make {r} disappear")
REMOVE_Q = ("{q} Remove it.", "{q} Delete it.", "{q} Erase it.", "{q} Take it away.")
REPLACE = ("replace {r} with {n}", "turn {r} into {n}", "change {r} into {n}", "change {r} to {n}",
           "swap {r} for {n}", "make {r} into {n}")
REPLACE_Q = ("{q} Replace it with {n}.", "{q} Turn it into {n}.", "{q} Change it into {n}.")
RESHAPE = ("turn {r} into {n}", "change {r} into {n}", "reshape {r} into {n}", "make {r} into {n}")
RESHAPE_Q = ("{q} Turn it into {n}.", "{q} Change it into {n}.")
RECOLOUR = ("make {r} {c}", "paint {r} {c}", "colour {r} {c}", "color {r} {c}", "turn {r} {c}",
            "change the colour of {r} to {c}", "change the color of {r} to {c}")
RECOLOUR_Q = ("{q} Make it {c}.", "{q} Paint it {c}.")
ADD = ("add {n}{w}", "put {n}{w}", "place {n}{w}", "draw {n}{w}", "insert {n}{w}", "please add {n}{w}")
OPTIMIZED = {"remove": "remove {r}", "replace": "replace {r} with a {c} {s}", "add": "add a {z} {c} {s} {w}"}
QUESTIONS = ("Is there anything {}?", "Is there a shape {}?", "Can you find the shape {}?")
HEADS = ("the shape {}", "the thing {}", "the object {}")
NAMED_HEAD, COLOURED_HEAD = "the {s} {k}", "the {c} shape {k}"

# Understanding: {n} the noun of the group the target is compared within.
RELATIVE = {("x", 0): ("the left {n}", "the leftmost {n}", "the {n} on the left"),
            ("x", 1): ("the right {n}", "the rightmost {n}", "the {n} on the right"),
            ("y", 0): ("the top {n}", "the upper {n}", "the topmost {n}", "the highest {n}", "the {n} at the top"),
            ("y", 1): ("the bottom {n}", "the lower {n}", "the lowest {n}", "the {n} at the bottom")}
SIDE = {("x", 0): "left", ("x", 1): "right", ("y", 0): "top", ("y", 1): "bottom"}
BIGGER = ("the bigger {n}", "the larger {n}", "the biggest {n}", "the large {n}")
SMALLER = ("the smaller {n}", "the smallest {n}", "the small {n}", "the little {n}")
ALIKE = ("the {c} one of the {k} {p}", "the {c} one among the {p}")
COUNTING = ("the only shape that is not a {s}", "the shape that is not a {s}")
ORDINAL = "the {o} shape from the {side}"
EXPLICIT = {"left": "the {b} on the left", "right": "the {b} on the right", "top": "the {b} at the top",
            "bottom": "the {b} at the bottom"}
SIDE_WHERE = {"left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom"}
RELATIONS = {"left": " to the left of {a}", "right": " to the right of {a}", "top": " above {a}",
             "bottom": " below {a}"}
CORNER = " in the {v} {h} corner"
SAME_COLOUR = ("a {z}{s} with the same colour as {a}", "a {z}{s} in the same colour as {a}")
COPY = ("a {c} copy of {a}", "a copy of {a} in {c}")
WHERE = ("in the middle", "on the {h}", "at the {v}", "at the {v} {h}")
CAPTIONS = ("{l} on a {b} background", "a {b} background with {l}", "a picture of {l} on a {b} background",
            "{l} in front of a {b} background")
EMPTY_CAPTIONS = ("an empty {b} background", "a plain {b} background", "nothing but a {b} background")
LIST_JOINS = (", ", " and ")


def tokenize_words(text: str) -> list[str]:
    """Lower-case words (letters/digits) and single punctuation marks: the unit VOCAB is defined in."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def _literal_words(obj) -> set[str]:
    """Words of every string in a nested structure of templates, leaving out the {fields}."""
    if isinstance(obj, str):
        return set(tokenize_words(" ".join(lit for lit, *_ in string.Formatter().parse(obj))))
    if isinstance(obj, dict):  # string keys are words too (colour names); tuple keys are only indices
        obj = [*(k for k in obj if isinstance(k, str)), *obj.values()]
    return set().union(*(_literal_words(x) for x in obj if not isinstance(x, (int, float))))


VOCAB: list[str] = sorted(_literal_words([
    SHAPES, [s + "s" for s in SHAPES], COLOURS, BACKGROUNDS, RADIUS, NUMBERS, ORDINALS, COLOUR_OF, SHAPE_CLUES,
    NEW_SHAPE_CLUES, COLOUR_CLAUSES, NEW_COLOUR_CLAUSES, COLOUR_OF_PHRASE, REMOVE, REMOVE_Q, REPLACE, REPLACE_Q,
    RESHAPE, RESHAPE_Q, RECOLOUR, RECOLOUR_Q, ADD, OPTIMIZED, QUESTIONS, HEADS, NAMED_HEAD, COLOURED_HEAD,
    RELATIVE, SIDE, BIGGER, SMALLER, ALIKE, COUNTING, ORDINAL, EXPLICIT, SIDE_WHERE, RELATIONS, CORNER,
    SAME_COLOUR, COPY, WHERE, CAPTIONS, EMPTY_CAPTIONS, LIST_JOINS, "middle an a"]))
