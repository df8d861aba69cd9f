"""VIEScore with an MLLM judge (InsightEdit supplementary §1.2, eq. 1) — optional, off by default.

A multimodal judge sees the source image, the edited image and the instruction, and gives two integer scores from
0 (worst) to 5 (best): S_i, instruction following, and S_n, non-over-editing (nothing but the requested change
differs). They are combined as

    VIEScore = ½ (S_n / 5 + S_i / 5)        ∈ [0, 1]

``build_prompt`` writes the chat messages (OpenAI / Hugging Face chat format, images as ``{"type": "image"}``
placeholders, source first, then edit) and asks for one JSON object
``{"instruction_following": int, "non_overediting": int, "reason": str}``. ``parse_scores`` reads the answer
robustly: the last JSON object holding both scores (inside prose or a ```json fence, keys in any case or
spelling such as "Instruction Following" / "S_i" / "over-editing", values as numbers or numeric strings like "4"
or "4/5", possibly nested), else a regex fallback for "instruction following: 4 ... non-over-editing: 3". A score
outside [0, 5] makes the answer invalid (no clamping; non-integers within range are kept as given). It returns
None when it cannot find both, and never raises.

Judges: ``HTTPJudge`` posts to any OpenAI-compatible ``{base_url}/chat/completions`` (images as
``data:image/png;base64,...`` ``image_url`` parts) with ``urllib`` only; ``LocalJudge(fn)`` wraps any callable
``fn(messages, images) -> str`` for a local MLLM (``images`` are the PNG bytes in placeholder order; decode with
``PIL.Image.open(io.BytesIO(b))``).

Failures are never scores. A malformed answer, a timeout, a dropped connection, HTTP 408/429/5xx or an exception
from a local judge is asked again, ``retries`` more times with a doubling pause (``backoff`` seconds first); then
the edit's judgement is *missing*: ``viescore`` None and ``error`` saying why (evaluate.py leaves it out of the
means and reports how many are missing). Counting a failed call as 0 would silently lower the mean. What cannot be
fixed by asking again is a ``UserError``: HTTP 400/401/403/404 (wrong URL, model or key), or an endpoint that
never answered at all (wrong --judge-url).
"""
import base64
import http.client
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Protocol

from ..errors import UserError

SYSTEM_PROMPT = (
    "You are a strict evaluator of instruction-based image editing. You are given an editing instruction, the "
    "source image and the edited image produced from it. Rate the edit on two integer scales from 0 (worst) to "
    "5 (best):\n"
    "- instruction_following: how completely and correctly the edited image carries out the instruction "
    "(0 = not carried out or the wrong object / attribute was changed, 5 = carried out fully and exactly).\n"
    "- non_overediting: how well everything the instruction does not ask to change is kept from the source "
    "image (0 = the image is changed beyond recognition, 5 = nothing but the requested change differs).\n"
    'Answer with one JSON object and nothing else: {"instruction_following": <0-5>, "non_overediting": <0-5>, '
    '"reason": "<one short sentence>"}'
)


def viescore(s_n: float, s_i: float) -> float:
    """InsightEdit supplementary eq. 1: ½ (S_n/5 + S_i/5)."""
    return 0.5 * (s_n / 5 + s_i / 5)


def build_prompt(instruction: str) -> list[dict]:
    """Chat messages for the judge; the two ``{"type": "image"}`` parts are the source, then the edited image."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": f"Editing instruction: {instruction}"},
            {"type": "text", "text": "Source image:"},
            {"type": "image"},
            {"type": "text", "text": "Edited image:"},
            {"type": "image"},
            {"type": "text", "text": "Rate the edit. Reply with the JSON object only."},
        ]},
    ]


def _role(key: str) -> str | None:
    """Which score a JSON key names: "n" (non-over-editing), "i" (instruction following) or None."""
    k = re.sub(r"[^a-z0-9]", "", key.lower())
    if "overedit" in k or k == "sn":
        return "n"
    if "instruction" in k or k in ("si", "adherence"):
        return "i"
    return None


def _number(value) -> float | None:
    """A JSON value read as a number (int, float, "4", "4.0", "4/5"); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*", value)
        return float(m.group(1)) if m else None
    return None


def _scores_in(obj: dict) -> dict:
    """{"i": .., "n": ..} found in a JSON object, looking into nested objects too (outer keys win)."""
    found: dict = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            for role, x in _scores_in(value).items():
                found.setdefault(role, x)
        elif (role := _role(str(key))) is not None and (x := _number(value)) is not None:
            found[role] = x
    return found


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            end = i + 1
        else:
            if isinstance(obj, dict):
                yield obj
        i = text.find("{", end)


_RANGE_NOTE = re.compile(r"\(\s*0\s*(?:-|–|to)\s*5\s*\)", re.I)  # "(0-5)" in a label is not the score
_GAP = r"(?:[\s_-]*score)?(?:\s*\(s_?[in]\))?[^0-9a-z\n]{0,12}?(-?\d+(?:\.\d+)?)"
_SI = re.compile(r"(?:instruction[\s_-]*(?:following|adherence)?|\bs_?i\b)" + _GAP, re.I)
_SN = re.compile(r"(?:(?:(?:\bnon|\bno)[\s_-]*)?over[\s_-]*edit(?:ing|ed|s)?|\bs_?n\b)" + _GAP, re.I)


def parse_scores(text) -> tuple[float, float] | None:
    """(S_i, S_n) from a judge's answer, or None if both are not found or one is outside [0, 5]; never raises."""
    if not isinstance(text, str):
        return None
    found = None
    for obj in _json_objects(text):
        scores = _scores_in(obj)
        if len(scores) == 2:
            found = (scores["i"], scores["n"])  # the last complete object is the final answer
    if found is None:
        stripped = _RANGE_NOTE.sub(" ", text)
        si, sn = _SI.findall(stripped), _SN.findall(stripped)
        if not (si and sn):
            return None
        found = (float(si[-1]), float(sn[-1]))
    if not all(math.isfinite(x) and 0 <= x <= 5 for x in found):
        return None
    return found


class Judge(Protocol):
    def score(self, source_png: bytes, edited_png: bytes, instruction: str) -> dict:
        """-> {"s_i", "s_n", "viescore", "raw"}; the scores are None when the judge's answer was unusable."""


class JudgeUnavailable(Exception):
    """A judge call that failed in a way asking again may fix (timeout, 5xx, dropped connection)."""


class _ChatJudge:
    """Shared ``score``: build the prompt, ask, parse; ask again up to ``retries`` times on a malformed answer or a
    transient failure, then give the judgement as missing (None, with ``error``)."""

    retries: int
    backoff: float = 1.0

    def _ask(self, messages: list[dict], images: list[bytes]) -> str:
        raise NotImplementedError

    def ask(self, messages: list[dict], images: list[bytes]) -> str:
        """Any chat with ``{"type": "image"}`` placeholders (filled by ``images`` in order) -> the raw answer; the
        benchmarks' own judge prompts (protocols.py) go through here."""
        return self._ask(messages, images)

    def score(self, source_png: bytes, edited_png: bytes, instruction: str) -> dict:
        messages = build_prompt(instruction)
        raw, error = None, None
        for attempt in range(1 + self.retries):
            if attempt and error is not None and not error.startswith("no usable"):
                time.sleep(self.backoff * 2 ** (attempt - 1))  # a failing server gets a moment; garbage does not
            try:
                raw = self._ask(messages, [source_png, edited_png])
            except JudgeUnavailable as e:
                raw, error = None, str(e)
                continue
            parsed = parse_scores(raw)
            if parsed is not None:
                s_i, s_n = parsed
                return {"s_i": s_i, "s_n": s_n, "viescore": viescore(s_n, s_i), "raw": raw, "error": None}
            error = "no usable scores in the answer"
        return {"s_i": None, "s_n": None, "viescore": None, "raw": raw,
                "error": f"{error} ({1 + self.retries} tries)"}


class LocalJudge(_ChatJudge):
    """A judge backed by any callable ``fn(messages, images) -> str`` (e.g. a local MLLM and its chat template)."""

    def __init__(self, fn: Callable[[list[dict], list[bytes]], str], retries: int = 1, backoff: float = 1.0):
        self.fn, self.retries, self.backoff = fn, retries, backoff

    def _ask(self, messages, images):
        try:
            return self.fn(messages, images)
        except Exception as e:  # a local model's failure on one edit (out of memory, ...): asked again, then missing
            raise JudgeUnavailable(f"the judge raised {type(e).__name__}: {e}") from e


class HTTPJudge(_ChatJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint, e.g. ``base_url="http://host:8000/v1"``."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60,
                 retries: int = 1, max_tokens: int = 300, backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.max_tokens, self.backoff = retries, max_tokens, backoff
        self.answered = False  # has the endpoint ever answered? If not, "unreachable" means a wrong URL

    @staticmethod
    def _with_images(messages: list[dict], images: list[bytes]) -> list[dict]:
        """Replace the ``{"type": "image"}`` placeholders, in order, by ``image_url`` parts with data URLs."""
        pending = iter(images)
        out = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(next(pending)).decode("ascii")}}
                    if part.get("type") == "image" else part for part in content]
            out.append({**m, "content": content})
        if next(pending, None) is not None:
            raise ValueError("more images than image placeholders in the prompt")
        return out

    def _ask(self, messages, images):
        body = json.dumps({"model": self.model, "messages": self._with_images(messages, images),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            self.answered = True
            if e.code in (408, 429) or e.code >= 500:  # busy or failing for now: ask again
                raise JudgeUnavailable(f"HTTP {e.code}") from e
            raise UserError(f"judge endpoint {self.url} answered HTTP {e.code} — check --judge-url, the judge "
                            "model name and the API key") from e
        except http.client.HTTPException as e:  # the answer was cut off mid-way
            raise JudgeUnavailable(f"incomplete answer ({type(e).__name__})") from e
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                raise JudgeUnavailable(f"no answer within {self.timeout} s") from e
            if not self.answered:
                raise UserError(f"judge endpoint {self.url} unreachable ({e}) — check --judge-url") from e
            raise JudgeUnavailable(f"connection failed ({reason})") from e
        self.answered = True
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return text  # not a chat completion: recorded as the raw (malformed) answer
        if isinstance(content, list):  # content given as parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else json.dumps(content)
