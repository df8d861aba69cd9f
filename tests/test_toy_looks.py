"""minedit/toy/looks.py: the colour, shape and place checks of a generated toy image pass every real scene
exactly, fail a scene drawn with the wrong shapes (or places) object by object, and fail an empty background; an
edit that repaints a shape it was not asked to touch fails where the background bar alone would pass it.
"""
import json

import numpy as np
import pytest

from minedit.eval.metrics import edit_scores, regions_kept
from minedit.toy.draw import footprint, render, where
from minedit.toy.looks import (best_shape, colours_right, drawn_shape_right, kept_regions, places_right,
                              shapes_right, template_ious)
from minedit.toy.phrases import RADIUS, SHAPES
from minedit.toy.world import generate


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, 60, seed=3)
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] + \
           [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()][:40]


def draw(rows, swap=None, size=32):
    """Each row's source scene rendered again, every object's shape replaced by swap(shape) when given."""
    scenes = [[{**o, "shape": swap(o["shape"]) if swap else o["shape"]} for o in r["objects"]] for r in rows]
    return np.stack([np.asarray(render(r["background"], objs, size)) for r, objs in zip(rows, scenes)])


def test_real_scenes_pass_exactly(rows):
    shapes = shapes_right(draw(rows), rows)
    assert shapes["objects"] >= 40  # enough objects with a colour of their own to mean something
    assert shapes["right"] == 1.0 and shapes["mean_iou"] == pytest.approx(1.0)
    assert colours_right(draw(rows), [r["caption"] for r in rows]) == 1.0


def test_wrong_shapes_fail_object_by_object(rows):
    """Every shape drawn as the next one in a cycle: each counted object is wrong."""
    cycle = {"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "star", "star": "circle"}
    shapes = shapes_right(draw(rows, cycle.get), rows)
    assert shapes["right"] == 0.0 and set(shapes["by_shape"].values()) == {0.0}
    # colours stay right: the colour check cannot see shapes, which is why the shape check exists
    assert colours_right(draw(rows, cycle.get), [r["caption"] for r in rows]) == 1.0


def test_a_blank_background_has_neither(rows):
    blank = np.stack([np.asarray(render(r["background"], [], 32)) for r in rows])
    assert shapes_right(blank, rows)["right"] == 0.0
    assert colours_right(blank, [r["caption"] for r in rows]) < 0.1


def test_best_shape_finds_a_lone_shape_off_its_centroid():
    """A triangle's centroid is not its drawing centre; the search around it still finds the exact template."""
    img = np.asarray(render("white", [{"shape": "triangle", "size": "large", "x": 15, "y": 14, "colour": "red"}], 32))
    mask = (img != 255).any(-1)
    assert best_shape(mask) == ("triangle", pytest.approx(1.0))


def test_a_stray_copy_does_not_hide_the_drawn_shape():
    """Only the largest region of the colour is judged: a star with a stray 2-pixel speck of its colour is still a
    star, and a blob beside a star that is larger than it decides the call."""
    star = {"shape": "star", "size": "large", "x": 10, "y": 10, "colour": "blue"}
    img = np.asarray(render("white", [star], 32)).copy()
    img[28, 28:30] = (30, 70, 230)
    row = {"caption": "a blue star on a white background", "objects": [star], "background": "white"}
    assert shapes_right(img[None], [row])["right"] == 1.0
    img = np.asarray(render("white", [star, {**star, "shape": "circle", "x": 22, "y": 22, "size": "large"}], 32))
    assert shapes_right(img[None], [row])["right"] == 0.0


def test_drawn_shape_right_judges_the_shape_an_edit_adds():
    """The exact target passes; the same edit with a square drawn for the circle, a large circle for a small one,
    a blob (a filled disc where a star goes) or nothing fails; a removal draws nothing and gives None."""
    square = {"shape": "square", "size": "small", "x": 8, "y": 8, "colour": "red"}
    circle = {"shape": "circle", "size": "small", "x": 22, "y": 22, "colour": "green"}
    mask = np.zeros((32, 32), bool)
    mask[15:30, 15:30] = True

    def edit(*objects):
        return np.asarray(render("white", [square, *objects], 32)).astype(np.float64)

    assert drawn_shape_right(edit(circle), [square], [square, circle], mask) is True
    assert drawn_shape_right(edit({**circle, "shape": "square"}), [square], [square, circle], mask) is False
    assert drawn_shape_right(edit({**circle, "size": "large"}), [square], [square, circle], mask) is False
    assert drawn_shape_right(edit(), [square], [square, circle], mask) is False
    star = {**circle, "shape": "star", "size": "large"}
    assert drawn_shape_right(edit(star), [square], [square, star], mask) is True
    assert drawn_shape_right(edit({**star, "shape": "circle"}), [square], [square, star], mask) is False
    # a recolour is judged too: the shape where the old one was, in its new colour
    blue = {**square, "colour": "blue"}
    whole = np.ones((32, 32), bool)
    assert drawn_shape_right(np.asarray(render("white", [blue], 32)), [square], [blue], whole) is True
    assert drawn_shape_right(np.asarray(render("white", [square], 32)), [square], [blue], whole) is False
    assert drawn_shape_right(edit(), [square, circle], [square], mask) is None


def test_every_exact_shape_wins_its_template_by_a_quarter():
    """The margin drawn_shape_right asks (0.1) is far below what an exact render gets: its own template matches
    exactly and every other (shape, size) at most 0.75 (a small circle against a small square)."""
    for shape in SHAPES:
        for size_word in RADIUS:
            fp = footprint({"shape": shape, "size": size_word, "x": 15, "y": 16}, 32)
            ious = template_ious(fp)
            assert ious.pop((shape, size_word)) == 1.0 and max(ious.values()) <= 0.75


def others_kept(image, target, objects, target_objects, mask):  # what evaluate.score_row asks, on 0..255 renders
    return regions_kept(image / 255, target / 255, kept_regions(objects, target_objects, mask))


def test_others_kept_fails_an_edit_that_repaints_a_shape_it_was_not_asked_to_touch():
    """Recolour the circle: the exact target keeps the square (True); the same edit that also turns the square
    orange, or smears it to the background, fails; a soft edge on the square's outline passes; a scene with
    nothing left to keep gives None."""
    square = {"shape": "square", "size": "large", "x": 8, "y": 8, "colour": "red"}
    circle = {"shape": "circle", "size": "small", "x": 22, "y": 22, "colour": "green"}
    blue = {**circle, "colour": "blue"}
    mask = footprint(circle, 32)
    target = np.asarray(render("white", [square, blue], 32)).astype(np.float64)
    assert others_kept(target, target, [square, circle], [square, blue], mask) is True
    orange = np.asarray(render("white", [{**square, "colour": "orange"}, blue], 32)).astype(np.float64)
    assert others_kept(orange, target, [square, circle], [square, blue], mask) is False
    gone = np.asarray(render("white", [blue], 32)).astype(np.float64)
    assert others_kept(gone, target, [square, circle], [square, blue], mask) is False
    soft = target.copy()
    rim = footprint(square, 32) & ~np.pad(footprint(square, 32), 1)[2:, 1:-1]  # the square's bottom row
    soft[rim] = 0.5 * soft[rim] + 0.5 * 255
    assert others_kept(soft, target, [square, circle], [square, blue], mask) is True
    # why the check exists: a small shape repainted is too few pixels for the 25 dB background bar to notice
    small = {**square, "size": "small", "colour": "orange"}  # turned yellow, as the audited edits did
    target = np.asarray(render("white", [small, blue], 32)).astype(np.float64)
    yellow = np.asarray(render("white", [{**small, "colour": "yellow"}, blue], 32)).astype(np.float64)
    assert edit_scores(yellow / 255, target / 255, target / 255, mask)["psnr_bg"] >= 25
    assert others_kept(yellow, target, [small, circle], [small, blue], mask) is False
    assert others_kept(target, target, [circle], [blue], mask) is None


def test_places_right_passes_every_real_scene_and_fails_each_moved_shape(rows):
    """Real scenes (every shape size and triangle offset, shapes near the thirds' borders too) are right exactly;
    each object whose place its caption names, moved into another third, is wrong; one moved within its third is
    still right."""
    assert places_right(draw(rows), rows)["right"] == 1.0 and places_right(draw(rows), rows)["objects"] >= 10

    def moved(o, step):  # the object shifted by `step` px along x, or None when that leaves the image
        x = o["x"] + step
        return dict(o, x=x) if 0 <= x < 32 else None

    for step, same in ((-13, False), (13, False), (-2, True), (2, True)):
        picked, images = [], []
        for r in rows:
            named = [o for o in r["objects"] if f"{o['colour']} {o['shape']} {where(o, 32)}" in r["caption"]]
            objs = [moved(o, step) if o in named else o for o in r["objects"]]
            if named and None not in objs and all((where(m, 32) == where(o, 32)) == same
                                                   for m, o in zip(objs, r["objects"]) if o in named):
                picked.append(r)
                images.append(np.asarray(render(r["background"], objs, 32)))
        result = places_right(np.stack(images), picked)
        assert result["objects"] >= 3 and result["right"] == (1.0 if same else 0.0), (step, result)
