"""Step 5, quality evaluation (InsightEdit §3.1, supplementary §1.2): an MLLM judge scores each pair 0-5 on
semantic consistency — instruction adherence S_i and non-over-editing S_n, minedit's existing VIEScore judge —
and on perceptual quality — naturalness and no-artifacts, asked here with one more prompt on the edited image.

Decision (the thresholds are flags): a pair is dropped when the judge's answers are unusable, when
SC = min(S_i, S_n) < min_sc, or when PQ = min(naturalness, artifacts) < min_pq (VIEScore's own reduction: a
pair is as good as its worst aspect). Every score is kept in the row's "scores", with the benchmark VIEScore of
supplementary eq. 1, ½(S_n/5 + S_i/5). The judge runs behind any OpenAI-compatible endpoint (`--judge-url`);
a judge that cannot be reached stops the run with one `error:` line (what was written stays; rerun continues).
Without a judge the step is not run and the summary says so.
"""
from __future__ import annotations

import io
import math

from ..eval.judge import HTTPJudge, _json_objects, _number
from ..eval.protocols import vie_overall

PQ_PROMPT = (
    "You are a strict evaluator of image quality. Rate this image, produced by an image editor, on two integer "
    "scales from 0 (worst) to 5 (best):\n"
    "- naturalness: how realistic and natural the image looks (lighting, shadows, proportions, sense of place);\n"
    "- artifacts: how free it is of visual defects (5 = no blur, distortion, seams, smudges or broken objects).\n"
    'Answer with one JSON object and nothing else: {"naturalness": <0-5>, "artifacts": <0-5>, '
    '"reason": "<one short sentence>"}'
)


def pq_messages() -> list[dict]:
    return [{"role": "system", "content": PQ_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": "Edited image:"}, {"type": "image"},
                                         {"type": "text", "text": "Rate it. Reply with the JSON object only."}]}]


def parse_pq(text) -> tuple[float, float] | None:
    """(naturalness, artifacts) from the judge's answer: the last JSON object holding both, each in [0, 5]."""
    if not isinstance(text, str):
        return None
    found = None
    for obj in _json_objects(text):
        keys = {"".join(c for c in str(k).lower() if c.isalpha()): v for k, v in obj.items()}
        nat = _number(keys.get("naturalness", keys.get("natural")))
        art = _number(keys.get("artifacts", keys.get("noartifacts", keys.get("artifact"))))
        if nat is not None and art is not None:
            found = (nat, art)
    if found is None or not all(math.isfinite(x) and 0 <= x <= 5 for x in found):
        return None
    return found


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decide(sc: dict, pq: tuple[float, float] | None, min_sc: float, min_pq: float) -> tuple[str | None, dict]:
    """(reason to drop or None, scores) from the judge's semantic-consistency result and PQ answer."""
    scores = {"s_i": sc.get("s_i"), "s_n": sc.get("s_n"), "viescore": sc.get("viescore"),
              "naturalness": pq[0] if pq else None, "artifacts": pq[1] if pq else None}
    if scores["s_i"] is None or scores["s_n"] is None:
        return "judge answer unusable (semantic consistency)", scores
    if pq is None:
        return "judge answer unusable (perceptual quality)", scores
    o = vie_overall((scores["s_i"], scores["s_n"]), pq)  # SC = min, PQ = min, O = sqrt(SC * PQ)
    scores.update(sc=o["sc"], pq=o["pq"], overall=o["o"])
    if scores["sc"] < min_sc:
        return f"semantic consistency below {min_sc:g}", scores
    if scores["pq"] < min_pq:
        return f"perceptual quality below {min_pq:g}", scores
    return None, scores


class QualityFilter:
    """Scores a pair with a chat judge (`HTTPJudge`, `LocalJudge`: anything with `score` and `ask`) and decides."""

    def __init__(self, judge, min_sc: float = 3, min_pq: float = 3):
        self.judge, self.min_sc, self.min_pq = judge, min_sc, min_pq

    @classmethod
    def from_url(cls, url: str, model: str, api_key: str | None, min_sc: float, min_pq: float, timeout: float = 120):
        return cls(HTTPJudge(url, model, api_key=api_key, timeout=timeout), min_sc, min_pq)

    def __call__(self, source, target, instruction: str) -> tuple[str | None, dict]:
        src, tgt = png(source), png(target)
        sc = self.judge.score(src, tgt, instruction)
        pq = None
        for _ in range(2):  # one more try on a malformed answer, as the semantic judge does
            pq = parse_pq(self.judge.ask(pq_messages(), [tgt]))
            if pq is not None:
                break
        return decide(sc, pq, self.min_sc, self.min_pq)
