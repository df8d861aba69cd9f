"""Step 4, instruction recaptioning (InsightEdit §3.1): a simple and an advanced instruction for every pair.

  simple     the template with its verb swapped for a synonym and the sentence re-shaped ("delete the cup",
             "get rid of the cup", "swap the cup for a vase"); the object's simple name is kept (no thesaurus
             of object names: a wrong synonym would make the pair false).
  advanced   (a) the detailed description from step 1 in place of the simple name, in another template
                 ("erase the mug on the desk, white with a blue handle");
             (b) a reasoning rewrite by the MLLM, naming the object only through a question about the image
                 ("What is the man holding? Change its colour to white."). The answer is kept only if it is one
                 line of at most `max_words` words, keeps an edit verb of its kind, and does not name the object
                 by its simple name (then it is no reasoning); otherwise (a) stands, and the miss is counted.

Row fields: `simple_instruction`, `advanced_instruction` (b if kept, else a), `instruction` (what train.py
trains on: the advanced one) and `category`: "reasoning" for (b), "understanding" for (a) — the detailed
description must be understood to find the object — and "simple" when there is no detailed description.
Choices are drawn from a generator seeded by the pair, so a resumed run writes the same texts.
"""
from __future__ import annotations

import re

import numpy as np

SIMPLE = {
    "remove": ("remove the {s}", "delete the {s}", "erase the {s}", "get rid of the {s}",
               "take the {s} out of the picture", "please remove the {s}"),
    "add": ("add a {s}", "put a {s} in the picture", "insert a {s}", "place a {s} in the image",
            "please add a {s}"),
    "replace": ("replace the {s} with a {t}", "swap the {s} for a {t}", "change the {s} into a {t}",
                "turn the {s} into a {t}", "make the {s} a {t}"),
}
DETAILED = {
    "remove": ("remove {d}", "delete {d} from the image", "erase {d}", "get rid of {d}"),
    "add": ("add {d}", "put {d} into the picture", "insert {d}"),
    "replace": ("replace {d} with a {t}", "change {d} into a {t}", "turn {d} into a {t}"),
}
VERBS = {
    "remove": ("remove", "delete", "erase", "rid", "take", "eliminate", "clear", "get"),
    "add": ("add", "put", "insert", "place", "draw", "include", "bring"),
    "replace": ("replace", "swap", "change", "turn", "make", "substitute", "transform", "convert"),
}
REASONING_PROMPT = (
    "Rewrite this image-editing instruction so that it refers to the object only indirectly, through a short "
    "question that needs some reasoning about the image, followed by the edit. Example: \"What is the man "
    "holding in his hands? Please change the colour of this object to white.\"\n"
    "Instruction: {instruction}\nThe object: {detailed}\n"
    "Answer with the rewritten instruction only, without naming \"{simple}\"."
)


def definite(description: str) -> str:
    """'a mug on the desk' -> 'the mug on the desk' (a description names one object in the image)."""
    d = " ".join(description.split()).strip(" .")
    return re.sub(r"^(?:a|an|one)\s+", "the ", d, flags=re.I) if d else d


def simple_variant(kind: str, source: str, target: str | None, rng: np.random.Generator) -> str:
    options = SIMPLE[kind]
    return options[int(rng.integers(len(options)))].format(s=source, t=target)


def detailed_variant(kind: str, detailed: str, target: str | None, rng: np.random.Generator) -> str:
    options = DETAILED[kind]
    d = definite(detailed) if kind != "add" else detailed  # an object to add is indefinite
    return options[int(rng.integers(len(options)))].format(d=d, t=target)


def parse_rewrite(text, kind: str, simple_name: str, template: str, max_words: int = 40) -> str | None:
    """The MLLM's reasoning rewrite, or None when it is unusable (see the module docstring)."""
    if not isinstance(text, str):
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) != 1:
        return None
    out = re.sub(r"^(?:rewritten instruction|instruction|answer)\s*:\s*", "", lines[0], flags=re.I).strip(" \"'`")
    words = re.findall(r"[a-z']+", out.lower())
    if not words or len(words) > max_words or out.lower().strip(" .") == template.lower().strip(" ."):
        return None
    if not any(w in VERBS[kind] for w in words):
        return None
    if re.search(r"\b" + re.escape(simple_name.lower()) + r"\b", out.lower()):
        return None
    return out


def recaption(pair: dict, image, mllm, rng: np.random.Generator, tally, reasoning: bool = True) -> dict:
    """The pair's texts: {"instruction", "simple_instruction", "advanced_instruction", "category"}."""
    obj, kind, new = pair["object"], pair["kind"], pair.get("new")
    simple = simple_variant(kind, obj["simple"], new, rng)
    has_detail = obj["detailed"].lower().strip(" .") != obj["simple"].lower()
    advanced, category = (detailed_variant(kind, obj["detailed"], new, rng), "understanding") if has_detail \
        else ("", "simple")
    if reasoning and kind != "add":  # an object to add is not in the source image: nothing to reason about
        prompt = REASONING_PROMPT.format(instruction=pair["instruction"], detailed=obj["detailed"],
                                         simple=obj["simple"])
        rewrite = parse_rewrite(mllm.ask(prompt, image), kind, obj["simple"], pair["instruction"])
        if rewrite is None:
            tally.note("recaption", "reasoning rewrite unusable, detailed template kept")
        else:
            advanced, category = rewrite, "reasoning"
            tally.note("recaption", "reasoning rewrite kept")
    return {"instruction": advanced or simple, "simple_instruction": simple, "advanced_instruction": advanced,
            "template_instruction": pair["instruction"], "category": category}
