"""The output folder: images, manifests written as the run goes, resumption, and the kept/dropped tally.

    OUT/images/       <id>.png (the input, re-saved as RGB PNG), <id>_o<k>_mask.png, <id>_o<k>_removed.png,
                      <id>_o<k>_replace.png — every file written to a temporary name, then renamed
    OUT/manifest.jsonl  kept pairs, the rows train.py --data reads (paths relative to OUT)
    OUT/simple.jsonl    the same pairs with `instruction` = the simple one (SimpleEdit), rewritten at the end
    OUT/dropped.jsonl   pairs the quality filter dropped, with their scores and reason (for inspection)
    OUT/captions.jsonl  {"image", "caption"} of every captioned input: stage-1 data (train.py --stage 1)
    OUT/done.jsonl      one line per finished input: {"id", "counts"} — the resumption record
    OUT/summary.json    the tally over all finished inputs, rewritten after each input

An input's rows are appended (and fsynced) before its line in done.jsonl; a run that starts again first drops
rows of inputs not in done.jsonl (a run stopped between the two) and any torn last line, then skips the inputs
done. So stopping at any point and rerunning gives the manifest one uninterrupted run would have written.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .. import fsio
from ..fsio import write_text
from ..errors import UserError

STEPS = ("inputs", "objects", "masks", "edits", "recaption", "quality", "written")
ROW_FILES = ("manifest.jsonl", "dropped.jsonl", "captions.jsonl")


class Tally:
    """counts[step][label]: "kept", "kept: detail", "dropped: reason", or a note."""

    def __init__(self, counts: dict | None = None):
        self.counts = {s: Counter((counts or {}).get(s, {})) for s in STEPS}

    def keep(self, step: str, detail: str | None = None) -> None:
        self.counts[step]["kept" + (f": {detail}" if detail else "")] += 1

    def drop(self, step: str, reason: str) -> None:
        self.counts[step][f"dropped: {reason}"] += 1

    def note(self, step: str, label: str, n: int = 1) -> None:
        self.counts[step][label] += n

    def add(self, other: "Tally") -> None:
        for s in STEPS:
            self.counts[s].update(other.counts[s])

    def as_dict(self) -> dict:
        return {s: dict(sorted(c.items())) for s, c in self.counts.items() if c}

    def lines(self) -> list[str]:
        out = []
        for step, c in self.as_dict().items():
            kept = sum(v for k, v in c.items() if k.startswith("kept"))
            dropped = sum(v for k, v in c.items() if k.startswith("dropped"))
            detail = ", ".join(f"{k} {v}" for k, v in c.items())
            out.append(f"{step:<10} kept {kept:>5}  dropped {dropped:>5}  ({detail})")
        return out


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn line (a run killed mid-write) is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def save_image(image, path: Path) -> None:
    fsio.save_image(image, str(path))


class Output:
    """The output folder of one run, opened for appending; `done` holds the ids already finished."""

    def __init__(self, out_dir, settings: dict):
        self.root = Path(out_dir)
        try:
            (self.root / "images").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {out_dir} ({e.strerror or e}) — choose a writable folder") from None
        finished = _read_jsonl(self.root / "done.jsonl")
        self.done = {r["id"] for r in finished if "id" in r}
        self._check_settings(settings)
        self.tally = Tally()
        for r in finished:
            self.tally.add(Tally(r.get("counts")))
        for name in (*ROW_FILES, "done.jsonl"):  # rows of an input stopped half-way go; the input is redone
            path = self.root / name
            if path.is_file():
                rows = _read_jsonl(path)
                key = "id" if name == "done.jsonl" else "image_id"
                keep = [r for r in rows if r.get(key) in self.done]
                if len(keep) != len(path.read_text(errors="replace").splitlines()):
                    write_text(str(path), "".join(json.dumps(r) + "\n" for r in keep))

    def _check_settings(self, settings: dict) -> None:
        """A rerun continues only the same run: other models or thresholds would mix two datasets in one file."""
        path = self.root / "settings.json"
        if path.is_file() and self.done:  # a run that finished nothing yet may change its flags
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise UserError(f"--out {self.root} holds a run with other settings ({', '.join(diff)}) — rerun "
                                "with the same flags to continue it, or choose a new --out")
        else:
            write_text(str(path), json.dumps(settings, indent=1) + "\n")

    def path(self, name: str) -> tuple[Path, str]:
        """(absolute path, path relative to the output folder) of an image file."""
        return self.root / "images" / name, f"images/{name}"

    def _append(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.root / name, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, image_id: str, rows: dict, tally: Tally) -> None:
        """Append an input's rows ({"manifest.jsonl": [...], ...}), then mark it done and update the summary."""
        for name in ROW_FILES:
            self._append(name, [dict(r, image_id=image_id) for r in rows.get(name, [])])
        self._append("done.jsonl", [{"id": image_id, "counts": tally.as_dict()}])
        self.done.add(image_id)
        self.tally.add(tally)
        summary = {"inputs_done": len(self.done), "pairs_kept": sum(self.tally.counts["written"].values()),
                   "tally": self.tally.as_dict()}
        write_text(str(self.root / "summary.json"), json.dumps(summary, indent=1) + "\n")


def write_simple(out_dir) -> int:
    """OUT/simple.jsonl from OUT/manifest.jsonl: each pair with its simple instruction (SimpleEdit); -> rows."""
    root = Path(out_dir)
    rows = [dict(r, instruction=r["simple_instruction"], category="simple")
            for r in _read_jsonl(root / "manifest.jsonl") if r.get("simple_instruction")]
    write_text(str(root / "simple.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
