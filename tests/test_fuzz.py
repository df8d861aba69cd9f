"""Property-based fuzzing (issue 17): random and mutated bytes as images, manifests and checkpoint config.json,
random judge answers, random values for every config field. The readers either succeed or raise the project's own
error type (UserError); nothing else ever escapes.

Budget: EXAMPLES examples per property (default 80; MINEDIT_FUZZ_EXAMPLES=5000 for a deep run), derandomized so CI
sees the same inputs every time; the whole file runs in about 15 s on one CPU core.
"""
import io
import json
import os
import warnings
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from minedit import checkpoint
from minedit.config import Config
from minedit.data import EditDataset, load_image, load_mask, read_manifest
from minedit.errors import UserError
from minedit.eval.judge import LocalJudge, parse_scores
from minedit.presets import apply_overrides, preset

EXAMPLES = int(os.environ.get("MINEDIT_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def seeds():
    """Small valid files in several formats: mutating them reaches deep into the decoders."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8))
    out = []
    for fmt, im in (("PNG", rgb), ("PNG", rgb.convert("P")), ("JPEG", rgb), ("GIF", rgb), ("BMP", rgb),
                    ("TIFF", rgb), ("WEBP", rgb), ("PNG", rgb.convert("I;16"))):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = seeds()


@st.composite
def mutated(draw, seeds):
    """A seed file with a few bytes overwritten, a cut, or bytes inserted; or plain random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op, at = draw(st.integers(0, 2)), draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            data = data[:at]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def only_user_errors(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resized mask warns; Pillow warns on odd files
        try:
            return fn(*args)
        except UserError:
            return None


@FUZZ
@given(data=mutated(SEEDS))
def test_images_from_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("img") / "x.img"
    path.write_bytes(data)
    im = only_user_errors(load_image, path)
    assert im is None or (im.mode == "RGB" and im.width * im.height > 0)
    m = only_user_errors(load_mask, path, (5, 4))
    assert m is None or (m.mode == "L" and m.size == (5, 4))


MANIFEST_SEED = [b'{"source": "a.png", "target": "a.png", "instruction": "x", "mask": "a.png"}\n',
                 b'{"image": "a.png", "caption": "c"}\r\n', b"\xef\xbb\xbf\n  \n", b'[1, {"source": null}]\n']


@FUZZ
@given(data=mutated(MANIFEST_SEED), kind=st.sampled_from(["edit", "caption", "infer"]))
def test_manifests_from_random_bytes(tmp_path_factory, data, kind):
    d = tmp_path_factory.mktemp("man")
    Image.new("RGB", (4, 4)).save(d / "a.png")
    (d / "m.jsonl").write_bytes(data)
    got = only_user_errors(read_manifest, d / "m.jsonl", kind)
    if got is not None:
        rows, bad = got
        assert all(isinstance(r["_line"], int) for r in rows) and all(isinstance(no, int) for no, _ in bad)
    if kind != "infer":
        ds = only_user_errors(EditDataset, [(d / "m.jsonl", 1.0)], 8, True, kind, 1.0)
        for i in range(len(ds) if ds is not None else 0):
            only_user_errors(ds.__getitem__, i)


FIELDS = {f.name: f for f in fields(Config)}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=8)


@st.composite
def config_json(draw):
    """A real config with some fields replaced by random JSON, unknown keys, or random bytes altogether."""
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(st.binary(max_size=200))
    if how == 1:
        return json.dumps(draw(JSON_VALUES)).encode()
    d = preset("insightedit", "toy", 3).to_dict()
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4)):
        d[name] = draw(JSON_VALUES)
    if how == 2:
        d[draw(st.text(max_size=6))] = 1
    text = json.dumps(d)  # NaN / Infinity appear as bare words, as Python writes them
    return text.encode() if how != 3 else text.encode()[: draw(st.integers(0, len(text)))]


@FUZZ
@given(data=config_json())
def test_checkpoint_config_from_random_json(tmp_path_factory, data):
    ck = tmp_path_factory.mktemp("ck")
    (ck / "config.json").write_bytes(data)
    cfg = only_user_errors(checkpoint.load_config, str(ck))
    if cfg is not None:  # what loads can be used: every field has its type, validate() answers with UserError
        only_user_errors(cfg.validate)
        checkpoint.check_compatible(cfg, cfg)


@FUZZ
@given(name=st.sampled_from(sorted(FIELDS)), value=st.text(max_size=12) | st.sampled_from(
    ["nan", "inf", "-inf", "-1", "0", "1e999", "1,2", "(True, 0)", "true", "", "9" * 30]))
def test_config_fields_from_random_text(name, value):
    cfg = preset("insightedit", "toy", 2)
    if only_user_errors(apply_overrides, cfg, [f"--{name}={value}"]) is not None:
        only_user_errors(cfg.validate)


ANSWERS = st.text(max_size=200) | st.builds(
    lambda pre, obj, post: pre + json.dumps(obj) + post, st.text(max_size=20),
    st.dictionaries(st.sampled_from(["instruction_following", "non_overediting", "S_i", "s_n", "Score", "x"]),
                    JSON_VALUES, max_size=4), st.text(max_size=20)) | st.sampled_from(
    ["instruction following: 4 non-over-editing: 99", '{"instruction_following": 1e999, "non_overediting": 2}',
     "{" * 500, '{"a": ' * 300 + "1" + "}" * 300])


@FUZZ
@given(answer=ANSWERS)
def test_judge_answers_never_raise(answer):
    got = parse_scores(answer)
    assert got is None or all(0 <= x <= 5 for x in got)
    out = LocalJudge(lambda m, i: answer, backoff=0).score(b"src", b"edit", "do it")
    assert (out["viescore"] is None) == (got is None)
    assert out["viescore"] is None or 0 <= out["viescore"] <= 1


@pytest.mark.parametrize("bad", [b"", b"\x00" * 10, b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\xff" * 40])
def test_known_nasty_images(tmp_path, bad):
    (tmp_path / "x.png").write_bytes(bad)
    with pytest.raises(UserError):
        load_image(tmp_path / "x.png")
