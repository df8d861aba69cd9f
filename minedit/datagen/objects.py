"""Step 1, caption and object extraction (InsightEdit §3.1): the MLLM captions the image, an LLM lists its
physical objects as JSON, each {"simple": "blue T-shirt", "detailed": "a shirt worn by the man, ..."}.

Models answer loosely, so `parse_objects` reads the answer in three passes and says which one worked:
  "ok"        the first JSON list in the answer (inside prose or a ```json fence) loads as it is;
  "repaired"  it loads after mechanical fixes: curly quotes, single-quoted strings, trailing commas, Python
              literals, a list cut off mid-way (closed after its last complete object), or loose {...} objects
              without the surrounding list;
  otherwise   no objects (the caller skips the image and counts why).
Items are normalised: keys in any case, "name"/"object" for simple and "description" for detailed, a bare
string as both; a missing detailed description falls back to the simple name; an empty simple name, a name
longer than `max_words` words, and repeats (case-insensitive) are dropped.
"""
from __future__ import annotations

import json
import re

CAPTION_PROMPT = "Describe this image in one or two sentences: the scene and the objects in it."
OBJECTS_PROMPT = (
    "Here is the caption of an image: \"{caption}\"\n"
    "List the physical objects it mentions (things that could be removed from or added to the picture; not the "
    "background, the lighting or the style). For each give a short name and a detailed description of it in "
    "this image. Answer with a JSON list and nothing else, like "
    "[{{\"simple\": \"blue T-shirt\", \"detailed\": \"a shirt worn by the man, made of cotton, in a blue "
    "colour\"}}]"
)
_SIMPLE_KEYS = ("simple", "name", "object", "simple_caption", "label")
_DETAILED_KEYS = ("detailed", "description", "detailed_caption", "detail")


def _fixes(text: str) -> str:
    """Mechanical repairs of near-JSON: curly quotes, Python literals, single quotes, trailing commas."""
    t = text.translate(str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}))
    t = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", t)))
    if '"' not in t:  # a Python-style list of dicts: single quotes become JSON's
        t = t.replace("'", '"')
    return re.sub(r",\s*([\]}])", r"\1", t)


def _first_list(text: str):
    """The first JSON list that loads, starting at each '[' in turn; None if none does."""
    decoder = json.JSONDecoder()
    i = text.find("[")
    while i != -1:
        try:
            value, _ = decoder.raw_decode(text, i)
            if isinstance(value, list):
                return value
        except (ValueError, RecursionError):
            pass
        i = text.find("[", i + 1)
    return None


def _loose_objects(text: str) -> list:
    """Every flat {...} object that loads on its own (a list cut off, or objects without a list)."""
    found = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            found.append(json.loads(m.group(0)))
        except ValueError:
            continue
    return found


def _field(item: dict, keys) -> str:
    lowered = {re.sub(r"[^a-z_]", "", str(k).lower()): v for k, v in item.items()}
    for k in keys:
        v = lowered.get(k)
        if isinstance(v, str) and v.strip():
            return " ".join(v.split())
    return ""


def normalise(items, max_words: int = 6) -> list[dict]:
    out, seen = [], set()
    for item in items:
        if isinstance(item, str):
            simple = detailed = " ".join(item.split())
        elif isinstance(item, dict):
            simple, detailed = _field(item, _SIMPLE_KEYS), _field(item, _DETAILED_KEYS)
        else:
            continue
        simple = re.sub(r"^(?:the|a|an)\s+", "", simple.strip(" .,;:\"'"), flags=re.I)
        if not simple or len(simple.split()) > max_words or simple.lower() in seen:
            continue
        seen.add(simple.lower())
        out.append({"simple": simple, "detailed": detailed.strip(" .") or simple})
    return out


def parse_objects(text, max_objects: int = 8, max_words: int = 6) -> tuple[list[dict], str]:
    """(objects, how): how is "ok", "repaired", or "unparseable" / "no objects" with an empty list. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return [], "unparseable"
    attempts = (("ok", lambda: _first_list(text)), ("repaired", lambda: _first_list(_fixes(text))),
                ("repaired", lambda: _loose_objects(_fixes(text)) or None))
    for how, attempt in attempts:
        items = attempt()
        if items is not None:
            objects = normalise(items, max_words)[:max_objects]
            return (objects, how) if objects else ([], "no objects")
    return [], "unparseable"


def caption_and_objects(mllm, llm, image, max_objects: int = 8) -> tuple[str, list[dict], str]:
    """(caption, objects, how) for one image: the MLLM's caption, then the LLM's object list from it."""
    caption = " ".join(mllm.ask(CAPTION_PROMPT, image).split())
    if not caption:
        return "", [], "empty caption"
    objects, how = parse_objects(llm.ask(OBJECTS_PROMPT.format(caption=caption.replace('"', "'"))), max_objects)
    return caption, objects, how
