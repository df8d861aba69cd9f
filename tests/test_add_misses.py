"""scripts/add_misses.py: each way of getting an add wrong, drawn on purpose, is the reason it reports."""
import json

import pytest

from conftest import run_script as run
from minedit.toy import draw as toydraw, world as toyworld
from minedit.toy.phrases import COLOURS

FIELD = "optimized_instruction"  # the explicit rewrite fixes size and region: every wrong answer is unambiguous
OTHER_SHAPE = {"circle": "star", "square": "diamond", "triangle": "square", "diamond": "circle", "star": "square"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    toyworld.generate(str(out), n=300, seed=5, size=32)
    return out


def elsewhere(row):
    """The new shape at a place the raw instruction allows, at least 4 px from every place its rewrite allows."""
    new, here = row["target_objects"][-1], toydraw.valid_targets(row, 32, FIELD)
    far = [o for o in toydraw.valid_targets(row, 32) if o["size"] == new["size"]
           and min(abs(o["x"] - h["x"]) + abs(o["y"] - h["y"]) for h in here) >= 4]
    return far[0] if far else None


def drawn(row, how):
    """The scene a model that gets an add wrong in way `how` draws (None: not drawable for this row)."""
    new, old = row["target_objects"][-1], row["objects"][0]
    if how == "nothing":
        return toydraw.render(row["background"], row["objects"], 32)
    if how == "scene":  # the new shape right, a neighbour recoloured
        colour = next(c for c in COLOURS if c not in (old["colour"], new["colour"]))
        return toydraw.render(row["background"], [dict(old, colour=colour)] + row["target_objects"][1:], 32)
    changed = {"right": lambda: new, "place": lambda: elsewhere(row),
               "size": lambda: dict(new, size="large" if new["size"] == "small" else "small"),
               "form": lambda: dict(new, shape=OTHER_SHAPE[new["shape"]])}[how]()
    return None if changed is None else toydraw.render(row["background"], row["objects"] + [changed], 32)


def misses(world, tmp_path, how):
    """Run the script on a results file whose add edits are all drawn wrong in way `how` -> its overall row."""
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]
    samples = []
    for i, row in enumerate(rows):
        image = drawn(row, how) if row["kind"] == "add" else None
        if image is not None:
            image.save(tmp_path / f"{how}{i}.png")
            samples.append({"index": i, "category": row["category"], "success": how == "right",
                            "pred": str(tmp_path / f"{how}{i}.png")})
    (tmp_path / f"{how}.json").write_text(json.dumps({"instruction_field": FIELD, "samples": samples}))
    r = run("scripts/add_misses.py", tmp_path / f"{how}.json", world / "eval.jsonl")  # the field it records
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert " ".join(lines[0].split()) == ("category adds succeeded nothing drawn wrong place wrong size wrong form "
                                          "rest of the scene")
    overall = next(line for line in lines if line.startswith("overall"))
    return dict(zip(["adds", "succeeded", "nothing drawn", "wrong place", "wrong size", "wrong form", "rest"],
                    map(int, overall.split()[1:])))


@pytest.mark.parametrize("how,reason", [("nothing", "nothing drawn"), ("place", "wrong place"),
                                        ("size", "wrong size"), ("form", "wrong form"), ("scene", "rest")])
def test_each_wrong_add_is_given_its_own_reason(world, tmp_path, how, reason):
    counts = misses(world, tmp_path, how)
    assert counts["adds"] >= 5 and counts["succeeded"] == 0
    assert counts[reason] == counts["adds"], counts
    assert sum(v for k, v in counts.items() if k not in ("adds", "succeeded", reason)) == 0, counts


def test_a_right_add_is_counted_as_succeeded_and_explained_by_nothing(world, tmp_path):
    counts = misses(world, tmp_path, "right")
    assert counts["adds"] >= 5 and counts["succeeded"] == counts["adds"]
    assert sum(v for k, v in counts.items() if k not in ("adds", "succeeded")) == 0


@pytest.mark.parametrize("results,says", [("{not json", "cannot read"),
                                          ('{"samples": [{"index": 99999}]}', "not a row of the manifest"),
                                          ('{"samples": []}', "holds no add edit")])
def test_a_results_file_that_is_not_one_is_an_error_line(world, tmp_path, results, says):
    (tmp_path / "bad.json").write_text(results)
    r = run("scripts/add_misses.py", tmp_path / "bad.json", world / "eval.jsonl")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr and "Traceback" not in r.stderr


def test_a_missing_edit_image_is_an_error_line(world, tmp_path):
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]
    i = next(i for i, r in enumerate(rows) if r["kind"] == "add")
    sample = {"index": i, "category": rows[i]["category"], "success": False, "pred": str(tmp_path / "gone.png")}
    (tmp_path / "r.json").write_text(json.dumps({"samples": [sample]}))
    r = run("scripts/add_misses.py", tmp_path / "r.json", world / "eval.jsonl")
    assert r.returncode == 2 and "gone.png" in r.stderr and "Traceback" not in r.stderr
