"""The design notes live in the repository (docs/DESIGN.md) and every citation of them resolves: no tracked file
points outside the repository, each "DESIGN §N" names a section that exists, and §4's stage table lists exactly
the (recipe, stage) pairs of the code's STAGE_TRAINABLE."""
import os
import re
import subprocess

from minedit.model import STAGE_TRAINABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "DESIGN.md")
# Built from pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "DESIGN", "/work/" + "shared")
CITATION = re.compile(r"DESIGN(?:\.md)? (§\d+(?:\s*[-–,]\s*§\d+)*)")


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk the tree instead
        names = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
                 for f in files if not any(part.startswith(".") for part in os.path.relpath(d, ROOT).split(os.sep)
                                           if part != ".")]
    for name in names:
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" not in data[:4096]:  # skip images, weights and other binary files
            yield name, data.decode("utf-8", errors="replace")


def doc_sections() -> set:
    with open(DOC, encoding="utf-8") as f:
        return {int(m) for m in re.findall(r"^## (\d+)\. ", f.read(), flags=re.M)}


def cited_sections(text: str) -> set:
    """Every section number a text cites: 'DESIGN §4, §7-§9' -> {4, 7, 8, 9}."""
    out = set()
    for group in CITATION.findall(text):
        for part in re.split(r"\s*,\s*", group):
            ends = [int(n) for n in re.findall(r"§(\d+)", part)]
            out.update(range(ends[0], ends[-1] + 1))
    return out


def test_citation_parser_reads_lists_and_ranges():
    assert cited_sections("train.py (DESIGN §4, §7-§9) and DESIGN.md §10; not InsightEdit §4.2") == {4, 7, 8, 9, 10}


def test_no_tracked_file_points_outside_the_repository():
    hits = [f"{name}:{i}" for name, text in tracked_text_files() for i, line in enumerate(text.splitlines(), 1)
            if any(s in line for s in OUTSIDE)]
    assert not hits, f"references to files outside the repository: {hits}"


def test_every_design_citation_names_an_existing_section():
    sections = doc_sections()
    assert sections == set(range(1, 11)), sections  # the numbering the code has always cited
    cited = {}
    for name, text in tracked_text_files():
        if name != "docs/DESIGN.md":
            for n in cited_sections(text):
                cited.setdefault(n, name)
    assert cited, "no DESIGN citations found: the pattern no longer matches how the code cites the notes"
    missing = {n: name for n, name in cited.items() if n not in sections}
    assert not missing, f"cited sections with no heading in docs/DESIGN.md: {missing}"


def test_stage_table_matches_the_code():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## 4.")[1].split("## 5.")[0]
    rows = set(re.findall(r"^\| (\w+) (\d)\b", section, flags=re.M))
    assert {(r, int(s)) for r, s in rows} == set(STAGE_TRAINABLE)
