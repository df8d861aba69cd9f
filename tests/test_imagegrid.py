"""The one grid drawer (minedit/imagegrid.py): where each cell lands, how captions fit, and that every sheet uses it."""
import ast
import os

import numpy as np
from PIL import Image

from minedit.imagegrid import draw_grid, fit, side_by_side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def solid(colour, size=(8, 6)):
    return Image.new("RGB", size, colour)


def test_cells_land_where_the_layout_says():
    w, h, gap, line_h, label_w = 8, 6, 3, 12, 20
    rows = [[(solid("red"), ""), (solid("blue"), "")], [(None, ""), (solid((0, 255, 0)), "")]]
    sheet = draw_grid(rows, (w, h), lines=2, line_h=line_h, gap=gap, row_labels=["a", "b"], label_w=label_w)
    row_h = h + 2 * line_h + gap
    assert sheet.size == (label_w + 2 * (w + gap), 2 * row_h)
    px = np.asarray(sheet)
    assert (px[0:h, label_w:label_w + w] == (255, 0, 0)).all()
    assert (px[0:h, label_w + w + gap:label_w + 2 * w + gap] == (0, 0, 255)).all()
    assert (px[row_h:row_h + h, label_w:label_w + w] == 255).all()  # an empty cell stays white
    assert (px[row_h:row_h + h, label_w + w + gap:label_w + 2 * w + gap] == (0, 255, 0)).all()
    assert (px[:, :label_w] < 255).any()  # the row labels are drawn in their column


def test_an_image_of_another_size_is_fitted_to_its_cell():
    small = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))  # 1×2: red | blue
    px = np.asarray(draw_grid([[(small, "")]], (10, 4)))
    assert (px[:4, :5] == (255, 0, 0)).all() and (px[:4, 5:10] == (0, 0, 255)).all()


def test_captions_wrap_to_the_cell_and_stop_after_lines():
    """Two cells side by side: the first one's long caption (words, and one word wider than a line) wraps inside
    its own width and stops after `lines` lines; the second cell's caption area stays white."""
    words = "word " * 20 + "m" * 40
    inked = lambda px: [bool((px[10 + 12 * k:10 + 12 * (k + 1)] < 128).any()) for k in range(len(px[10:]) // 12)]
    for lines in (1, 3, 12):
        px = np.asarray(draw_grid([[(None, words), (None, "")]], (60, 10), lines=lines).convert("L"))
        assert inked(px[:, :60]) == [True] * lines
        assert (px[:, 60:] == 255).all()


def test_fit_keeps_every_word_when_there_is_room():
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "remove the red circle on the left of the picture"
    out = fit(draw, text, 60, lines=99)
    assert " ".join(out) == text and len(out) > 1 and all(draw.textlength(s) <= 60 for s in out)
    cut = fit(draw, "x" * 50, 30, lines=99)
    assert "".join(cut) == "x" * 50 and all(draw.textlength(s) <= 30 for s in cut)


def test_title_wraps_above_the_rows():
    sheet = draw_grid([[(solid("red"), "")]], (8, 6), title="a title " * 30)
    top = sheet.height - (6 + 12)
    assert top > 12 and (np.asarray(sheet)[top:top + 6, :8] == (255, 0, 0)).all()


def test_side_by_side_keeps_order_and_pixels():
    strip = np.asarray(side_by_side([solid("red", (3, 5)), solid("blue", (7, 2))], 4))
    assert strip.shape == (4, 8, 3)
    assert (strip[:, :4] == (255, 0, 0)).all() and (strip[:, 4:] == (0, 0, 255)).all()


def test_no_other_sheet_lays_out_cells_by_hand():
    """Image.new + paste in a loop is the drawer's job: the writers of sheets only fill cells."""
    for rel in ("evaluate.py", "train.py", "minedit/sampler.py", "minedit/eval/attnsheet.py"):
        tree = ast.parse(open(os.path.join(ROOT, rel)).read())
        calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
        pastes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "paste"]
        assert "Image.new" not in calls and not pastes, rel
