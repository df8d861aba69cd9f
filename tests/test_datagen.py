"""minedit.datagen without model weights: the text logic against fixed model answers, the filter decisions, the
manifest and its resumption, fault handling, and the --toy-oracle run end to end into train.py."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from minedit.data import EditDataset, read_manifest
from minedit.datagen import __main__ as cli
from minedit.datagen.edits import make_pairs, parse_replacement, template
from minedit.datagen.manifest import Output, Tally, write_simple
from minedit.datagen.masks import check_mask, grow
from minedit.datagen.objects import OBJECTS_PROMPT, caption_and_objects, parse_objects
from minedit.datagen.quality import PQ_PROMPT, QualityFilter, decide, parse_pq
from minedit.datagen.recaption import SIMPLE, VERBS, definite, parse_rewrite, recaption
from minedit.datagen.run import Pipeline, run, toy_masker
from minedit.datagen.toy import ToyEditor, ToyOracle
from minedit.errors import UserError, run_cli
from minedit.eval.judge import LocalJudge

from conftest import ok, run_script

class Fixed:
    """A stand-in model: answers each question by the first key found in it, and records what it was asked."""

    def __init__(self, answers: dict, default: str = ""):
        self.answers, self.default, self.asked = answers, default, []

    def ask(self, text, image=None):
        self.asked.append((text, image is not None))
        return next((a for k, a in self.answers.items() if k in text), self.default)


# ---------------------------------------------------------------- step 1: object JSON
CLEAN = '[{"simple": "blue T-shirt", "detailed": "a shirt worn by the man"}, {"simple": "dog", "detailed": "a puppy"}]'


@pytest.mark.parametrize("answer,how", [
    (CLEAN, "ok"),
    ("Sure! Here are the objects:\n```json\n" + CLEAN + "\n```\nHope this helps.", "ok"),
    ("[{'simple': 'blue T-shirt', 'detailed': 'a shirt worn by the man'}, {'simple': 'dog', 'detailed': 'a puppy'},]",
     "repaired"),
    ("[{\u201csimple\u201d: \u201cblue T-shirt\u201d, \u201cdetailed\u201d: \u201ca shirt worn by the man\u201d}, "
     "{\u201csimple\u201d: \u201cdog\u201d, \u201cdetailed\u201d: \u201ca puppy\u201d}]", "repaired"),
    # cut off mid-way (the token limit): the complete objects are kept
    ('[{"simple": "blue T-shirt", "detailed": "a shirt worn by the man"}, {"simple": "dog", "detailed": "a puppy"}, '
     '{"simple": "ca', "repaired"),
])
def test_object_json_is_read_or_repaired(answer, how):
    objects, got = parse_objects(answer)
    assert got == how
    assert objects == [{"simple": "blue T-shirt", "detailed": "a shirt worn by the man"},
                       {"simple": "dog", "detailed": "a puppy"}]


def test_object_items_are_normalised():
    answer = json.dumps([{"Name": "The red car", "Description": "a car parked by the road."}, "lamp",
                         {"simple": "red car", "detailed": "again"}, {"simple": "", "detailed": "nameless"},
                         {"simple": "a very long name of an object indeed here", "detailed": "x"}, 7,
                         {"object": "cup"}])
    objects, how = parse_objects(answer)
    assert how == "ok"
    assert objects == [{"simple": "red car", "detailed": "a car parked by the road"},
                       {"simple": "lamp", "detailed": "lamp"}, {"simple": "cup", "detailed": "cup"}]
    assert len(parse_objects(json.dumps([f"thing {i}" for i in range(20)]), max_objects=5)[0]) == 5


@pytest.mark.parametrize("answer,how", [("", "unparseable"), ("I cannot see any objects.", "unparseable"),
                                        ("[]", "no objects"), ('[{"detailed": "no name"}]', "no objects"),
                                        (None, "unparseable"), ("{{{[[[", "unparseable")])
def test_object_answers_without_objects(answer, how):
    assert parse_objects(answer) == ([], how)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]{}",:\' abcsimpledetailed\n\\')), max_size=80))
def test_object_parser_never_raises(text):
    objects, how = parse_objects(text)
    assert how in ("ok", "repaired", "unparseable", "no objects")
    assert all(o["simple"] and o["detailed"] for o in objects)


def test_caption_then_objects_asks_the_image_then_the_text():
    mllm, llm = Fixed({"Describe": "A man in a blue T-shirt walks a dog."}), Fixed({"caption": CLEAN})
    caption, objects, how = caption_and_objects(mllm, llm, Image.new("RGB", (8, 8)))
    assert caption == "A man in a blue T-shirt walks a dog." and how == "ok" and len(objects) == 2
    assert mllm.asked[0][1] is True and llm.asked[0][1] is False  # the MLLM sees the image, the LLM does not
    assert llm.asked[0][0] == OBJECTS_PROMPT.format(caption=caption)


# ---------------------------------------------------------------- step 2: thresholds
def test_mask_thresholds_and_growth():
    m = np.zeros((10, 10), bool)
    assert check_mask(m, 0.01, 0.5) == "empty mask"
    m[0, 0] = True
    assert check_mask(m, 0.02, 0.5) == "mask too small" and check_mask(m, 0.01, 0.5) is None
    assert check_mask(np.ones((10, 10), bool), 0.01, 0.5) == "mask too large"
    g = grow(m, 2)
    assert g.sum() == 9 and g[:3, :3].all() and (grow(m, 0) == m).all()


# ---------------------------------------------------------------- step 3: pairs
class _Editor:
    def __init__(self, proposal):
        self.proposal, self.calls = proposal, []

    def remove(self, image, mask, obj, seed):
        self.calls.append("remove")
        return Image.new("RGB", image.size, "green")

    def propose(self, image, mask, obj):
        return self.proposal

    def draw(self, image, mask, obj, new, seed):
        return Image.new("RGB", image.size, "blue")


def test_pairs_templates_and_the_addition_swap():
    image, obj, tally = Image.new("RGB", (8, 8), "red"), {"simple": "cup", "detailed": "a white mug"}, Tally()
    editor = _Editor("vase")
    pairs = {p["kind"]: p for p in make_pairs(image, obj, np.ones((8, 8), bool), editor, 0, ("remove", "add",
                                                                                            "replace"), tally)}
    assert editor.calls == ["remove"]  # one inpainting serves removal and addition
    assert pairs["remove"]["instruction"] == "remove the cup" and pairs["add"]["instruction"] == "add the cup"
    assert pairs["replace"]["instruction"] == "replace the cup with the vase"
    assert pairs["add"]["source"] is pairs["remove"]["target"] and pairs["add"]["target"] is pairs["remove"]["source"]
    assert pairs["remove"]["source"] is image and pairs["replace"]["target"].getpixel((0, 0)) == (0, 0, 255)
    assert tally.counts["edits"] == {"kept: remove": 1, "kept: add": 1, "kept: replace": 1}
    tally = Tally()
    assert [p["kind"] for p in make_pairs(image, obj, np.ones((8, 8), bool), _Editor(None), 0, ("replace",),
                                          tally)] == []
    assert tally.counts["edits"] == {"dropped: replacement proposal unusable": 1}


@pytest.mark.parametrize("answer,name", [("A red apple.", "red apple"), ("Answer: vase", "vase"),
                                         ("the potted plant\nbecause it fits", "potted plant"),
                                         ('"Lamp"', "Lamp"), ("cup", None), ("The cup.", None), ("", None),
                                         ("a large and very shiny red apple", None), ("42", None), (None, None)])
def test_replacement_answers(answer, name):
    assert parse_replacement(answer, "cup") == name


# ---------------------------------------------------------------- step 4: recaption
REASONED = "What is the man holding in his hands? Please change the colour of this object to white."


def test_reasoning_rewrite_is_checked():
    assert parse_rewrite(REASONED, "replace", "cup", "replace the cup with the vase") == REASONED
    assert parse_rewrite("Rewritten instruction: " + REASONED, "replace", "cup", "x") == REASONED
    assert parse_rewrite("What is on the table? Replace the cup with a vase.", "replace", "cup", "x") is None
    assert parse_rewrite(REASONED + "\nSecond line.", "replace", "cup", "x") is None
    assert parse_rewrite("What is the man holding?", "replace", "cup", "x") is None  # no edit verb
    assert parse_rewrite("remove the cup", "remove", "mug", "remove the cup") is None  # the template again
    assert parse_rewrite(" ".join(["remove"] * 41), "remove", "mug", "x") is None


def test_recaption_fields_and_categories():
    obj = {"simple": "cup", "detailed": "a white mug with a blue handle"}
    pair = {"kind": "replace", "object": obj, "new": "vase", "instruction": template("replace", "cup", "vase")}
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    good, tally = recaption(pair, None, Fixed({"Rewrite": REASONED}), rng(), Tally()), Tally()
    assert good["category"] == "reasoning" and good["instruction"] == good["advanced_instruction"] == REASONED
    assert good["simple_instruction"] in [t.format(s="cup", t="vase") for t in SIMPLE["replace"]]
    assert good["template_instruction"] == "replace the cup with the vase"
    bad = recaption(pair, None, Fixed({"Rewrite": "replace the cup"}), rng(), tally)
    assert bad["category"] == "understanding" and "the white mug with a blue handle" in bad["instruction"]
    assert bad["simple_instruction"] == good["simple_instruction"]  # the same seed, the same choice
    assert tally.counts["recaption"] == {"reasoning rewrite unusable, detailed template kept": 1}
    plain = recaption(dict(pair, object={"simple": "cup", "detailed": "cup"}), None, Fixed({}), rng(), Tally(),
                      reasoning=False)
    assert plain["category"] == "simple" and plain["instruction"] == plain["simple_instruction"]
    asked = Fixed({"Rewrite": REASONED})
    add = recaption(dict(pair, kind="add", instruction="add the cup"), None, asked, rng(), Tally())
    assert asked.asked == [] and add["category"] == "understanding"  # nothing to reason about in an addition
    assert add["instruction"].endswith("a white mug with a blue handle") or "a white mug" in add["instruction"]
    assert definite("A mug on the desk.") == "the mug on the desk"
    assert all(any(v in t.split() or v in t for v in VERBS[k]) for k, ts in SIMPLE.items() for t in ts)


# ---------------------------------------------------------------- step 5: quality
def test_quality_decisions():
    sc = {"s_i": 4.0, "s_n": 5.0, "viescore": 0.9}
    reason, s = decide(sc, (4.0, 3.0), 3, 3)
    assert reason is None and (s["sc"], s["pq"]) == (4.0, 3.0) and s["overall"] == pytest.approx(12 ** 0.5)
    assert decide({"s_i": 2.0, "s_n": 5.0}, (5.0, 5.0), 3, 3)[0] == "semantic consistency below 3"
    assert decide(sc, (5.0, 2.5), 3, 3)[0] == "perceptual quality below 3"
    assert decide({"s_i": None, "s_n": None}, (5.0, 5.0), 3, 3)[0].startswith("judge answer unusable")
    assert decide(sc, None, 3, 3)[0] == "judge answer unusable (perceptual quality)"
    assert parse_pq('ok {"Naturalness": "4", "No artifacts": 5}') == (4.0, 5.0)
    assert parse_pq('{"naturalness": 6, "artifacts": 1}') is None and parse_pq("great image") is None


def test_quality_filter_asks_both_questions():
    asked = []

    def judge(messages, images):
        asked.append(len(images))
        if messages[0]["content"] == PQ_PROMPT:
            return '{"naturalness": 2, "artifacts": 4}'
        return '{"instruction_following": 5, "non_overediting": 4}'

    reason, scores = QualityFilter(LocalJudge(judge), 3, 3)(Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4)), "x")
    assert asked == [2, 1] and reason == "perceptual quality below 3"
    assert (scores["s_i"], scores["s_n"], scores["naturalness"], scores["viescore"]) == (5, 4, 2, 0.9)


# ---------------------------------------------------------------- the runner, the manifest, resumption
class Stop(Exception):
    pass


def toy_pipeline(oracle, stop_at=None, mllm=None):
    mllm = mllm or Fixed({"Describe": "shapes on a background", "Rewrite": "Which shape has corners? Remove it."})
    seen = []

    def describe(image_id, image):
        seen.append(image_id)
        if stop_at is not None and len(seen) == stop_at:
            raise KeyboardInterrupt  # a user's Ctrl-C: not a counted fault
        return mllm.ask("Describe", image), oracle.objects(image_id), "ok"

    return Pipeline(describe, toy_masker(oracle, 0.0, 0.9), lambda i: ToyEditor(oracle, i), mllm, seed=1)


def lines(path):
    return Path(path).read_text().splitlines()


def test_stopped_run_continues_to_the_same_manifest(tmp_path):
    oracle = ToyOracle(6, seed=3)
    full = Output(tmp_path / "full", {"s": 1})
    run(toy_pipeline(oracle), oracle.inputs(), full, progress=False)
    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(toy_pipeline(oracle, stop_at=4), oracle.inputs(), Output(out, {"s": 1}), progress=False)
    assert len(lines(out / "done.jsonl")) == 3
    # a run killed between writing an input's rows and marking it done, mid-way through a line
    with open(out / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"source": "x", "image_id": "toy-s3-00004"}) + "\n{\"source\": \"images/tor")
    tally = run(toy_pipeline(oracle), oracle.inputs(), Output(out, {"s": 1}), progress=False)
    for name in ("manifest.jsonl", "captions.jsonl", "done.jsonl"):
        assert lines(out / name) == lines(tmp_path / "full" / name), name
    assert tally.as_dict() == full.tally.as_dict()
    assert json.loads((out / "summary.json").read_text())["pairs_kept"] == len(lines(out / "manifest.jsonl")) > 0
    with pytest.raises(UserError, match="other settings"):
        Output(out, {"s": 2})


def test_manifest_rows_are_train_rows(tmp_path):
    oracle = ToyOracle(3, seed=5)
    out = Output(tmp_path, {})
    run(toy_pipeline(oracle), oracle.inputs(), out, progress=False)
    rows, bad = read_manifest(tmp_path / "manifest.jsonl")
    assert bad == [] and len(rows) == 3 * sum(len(oracle.objects(i)) for i, _ in oracle.inputs())
    for r in rows:
        assert r["kind"] in ("remove", "add", "replace") and r["category"] in ("simple", "understanding", "reasoning")
        assert r["simple_instruction"] and r["instruction"] and "scores" in r
        src, tgt = (np.asarray(Image.open(r[k]).convert("RGB")).astype(int) for k in ("source", "target"))
        m = np.asarray(Image.open(r["mask"])) > 0
        assert (src[~m] == tgt[~m]).all() and (src[m] != tgt[m]).any()  # the edit lies inside the mask only
    assert write_simple(tmp_path) == len(rows)
    simple, _ = read_manifest(tmp_path / "simple.jsonl")
    assert [r["instruction"] for r in simple] == [r["simple_instruction"] for r in rows]
    assert {r["category"] for r in simple} == {"simple"}
    item = EditDataset(str(tmp_path / "manifest.jsonl"), 32)[0]
    assert item["source"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)


def test_bad_inputs_and_failing_models_are_counted(tmp_path):
    oracle = ToyOracle(2, seed=0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    inputs = [("broken.png", tmp_path / "in" / "broken.png"), *oracle.inputs()]

    def describe(image_id, image):
        if image_id.endswith("00001"):
            raise RuntimeError("CUDA out of memory")
        return "c", [], "unparseable"

    pipe = Pipeline(describe, None, None, Fixed({}))
    tally = run(pipe, inputs, Output(tmp_path / "out", {}), progress=False)
    assert tally.counts["inputs"]["dropped: unreadable image"] == 1
    assert tally.counts["inputs"]["dropped: a model failed on it (RuntimeError; see errors.log)"] == 1
    assert tally.counts["objects"] == {"dropped: unparseable": 1}
    assert "CUDA out of memory" in (tmp_path / "out" / "errors.log").read_text()
    assert len(lines(tmp_path / "out" / "done.jsonl")) == 3


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_refusals(tmp_path, capsys):
    assert "--detector" in cli_error(["--toy-oracle", "--detector", "x", "--out", str(tmp_path / "o")], capsys)
    assert "--kinds" in cli_error(["--toy-oracle", "--kinds", "paint", "--out", str(tmp_path / "o")], capsys)
    assert "no image files" in cli_error(["--images", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    missing = str(tmp_path / "no-such-model")
    assert "--mllm" in cli_error(["--toy-oracle", "--mllm", missing, "--out", str(tmp_path / "o2")], capsys)


def test_cli_judge_down_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "o"
    err = cli_error(["--toy-oracle", "--n", "2", "--out", str(out), "--judge-url", "http://127.0.0.1:9/v1",
                     "--no-progress"], capsys)
    assert "unreachable" in err and "--judge-url" in err
    assert not (out / "done.jsonl").exists() and not (out / "manifest.jsonl").exists()


@pytest.mark.slow
def test_toy_oracle_end_to_end_trains(tmp_path):
    out = tmp_path / "data"
    p = ok(run_script("minedit.datagen", "--toy-oracle", "--n", 12, "--out", out, "--no-progress"))
    rows = [json.loads(x) for x in lines(out / "manifest.jsonl")]
    assert f"{len(rows)} pairs in" in p.stdout and "written" in p.stdout and "not run (no --judge-url)" in p.stdout
    assert {r["kind"] for r in rows} == {"remove", "add", "replace"} and len(lines(out / "captions.jsonl")) == 12
    assert len(lines(out / "simple.jsonl")) == len(rows)
    ok(run_script("train.py", "--recipe", "ip2p", "--stage", 2, "--data", out / "manifest.jsonl", "--out",
                  tmp_path / "run", "--max-steps", 3, "--batch-size", 4, "--sample-every", 0, "--log_every=1"))
    log = [json.loads(x) for x in lines(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)


def test_an_empty_caption_still_writes_the_source(tmp_path):
    oracle = ToyOracle(1, seed=2)
    pipe = toy_pipeline(oracle, mllm=Fixed({}, default=""))
    run(pipe, oracle.inputs(), Output(tmp_path, {}), progress=False)
    rows, bad = read_manifest(tmp_path / "manifest.jsonl")
    assert rows and bad == [] and not (tmp_path / "captions.jsonl").exists()


def test_judge_over_http_scores_and_drops(tmp_path, capsys):
    """The toy run with a judge behind a local OpenAI-compatible endpoint: replacements get a low instruction score
    and are dropped (kept in dropped.jsonl with the reason); the rest are kept with their scores."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            instruction = user[0]["text"] if isinstance(user, list) else ""
            if system == PQ_PROMPT:
                answer = {"naturalness": 4, "artifacts": 5}
            else:
                replace = any(w in instruction for w in ("replace", "swap", "change", "turn", "make"))
                answer = {"instruction_following": 1 if replace else 5, "non_overediting": 4}
            data = json.dumps({"choices": [{"message": {"content": json.dumps(answer)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert cli.main(["--toy-oracle", "--n", "3", "--out", str(tmp_path), "--judge-url", url, "--no-progress",
                         "--no-reasoning"]) == 0
    finally:
        server.shutdown()
    kept = [json.loads(x) for x in lines(tmp_path / "manifest.jsonl")]
    dropped = [json.loads(x) for x in lines(tmp_path / "dropped.jsonl")]
    assert kept and dropped and {r["kind"] for r in kept} == {"remove", "add"}
    assert {r["kind"] for r in dropped} == {"replace"}
    assert all(r["drop_reason"] == "semantic consistency below 3" and r["scores"]["s_i"] == 1 for r in dropped)
    assert all(r["scores"]["sc"] == 4 and r["scores"]["pq"] == 4 and r["scores"]["viescore"] == 0.9 for r in kept)
    out = capsys.readouterr().out
    assert "dropped: semantic consistency below 3" in out and "not run" not in out


def test_ctrl_c_is_one_line_and_a_rerun_finishes(tmp_path, capsys, monkeypatch):
    real_finish = Output.finish
    calls = []

    def finish_then_stop(self, *a):
        real_finish(self, *a)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Output, "finish", finish_then_stop)
    argv = ["--toy-oracle", "--n", "4", "--out", str(tmp_path), "--no-progress", "--no-reasoning"]
    assert cli.main(argv) == 130
    assert "stopped after 2 of 4 inputs" in capsys.readouterr().err
    monkeypatch.setattr(Output, "finish", real_finish)
    assert cli.main(argv) == 0 and len(lines(tmp_path / "done.jsonl")) == 4
