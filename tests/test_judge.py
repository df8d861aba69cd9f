"""VIEScore judge with fake judges: prompt building, answer parsing, retries, and an HTTP endpoint on loopback."""
import base64
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minedit.errors import UserError
from minedit.eval.judge import HTTPJudge, LocalJudge, build_prompt, parse_scores, viescore

SRC, EDIT = b"\x89PNG-source-bytes", b"\x89PNG-edited-bytes"
INSTRUCTION = 'Is there anything round? Replace it with a "blue" square.'


def test_viescore():
    assert viescore(5, 5) == 1.0
    assert viescore(0, 5) == 0.5 and viescore(5, 0) == 0.5
    assert viescore(0, 0) == 0.0
    assert viescore(s_n=4, s_i=2) == pytest.approx(0.6)


def test_prompt():
    messages = build_prompt(INSTRUCTION)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "instruction_following" in messages[0]["content"] and "non_overediting" in messages[0]["content"]
    parts = messages[1]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert any(INSTRUCTION in t for t in texts)
    kinds = [p["type"] if p["type"] == "image" else p["text"] for p in parts]
    i_src, i_edit = [i for i, k in enumerate(kinds) if k == "image"]
    assert kinds[i_src - 1] == "Source image:" and kinds[i_edit - 1] == "Edited image:"


@pytest.mark.parametrize("text, expected", [
    ('{"instruction_following": 4, "non_overediting": 3, "reason": "fine"}', (4, 3)),
    ('Here you go:\n```json\n{"Instruction_Following": "5", "NON_OVEREDITING": 4.0}\n```\n', (5, 4)),
    ('Instruction following: 4\nNon-over-editing: 3', (4, 3)),
    ('**Instruction Following (0-5):** 2/5, **Over-editing (0–5)**: 1 out of 5', (2, 1)),
    ("{'instruction_following': 4, 'non_overediting': 2}", (4, 2)),  # Python dict, not JSON: regex fallback
    ('{"scores": {"S_i": 3, "S_n": 5}, "reason": "nested"}', (3, 5)),
    ('draft {"instruction_following": 1, "non_overediting": 1} final '
     '{"instruction_following": 4, "non_overediting": 5}', (4, 5)),  # the last complete object wins
    ('{"instruction_following": 3.5, "non_overediting": "2"}', (3.5, 2)),
    ('Instruction: remove the cat. Instruction following score: 5. Non over-editing score (S_n): 4', (5, 4)),
    ('{"instruction_following": 6, "non_overediting": 3}', None),   # out of range: invalid, not clamped
    ('instruction following: 4, over-editing: -1', None),
    ('{"instruction_following": 4, "reason": "no second score"}', None),
    ('{"instruction_following": "four", "non_overediting": 3}', None),
    ('{"instruction_following": true, "non_overediting": 3}', None),
    ('{"instruction_following": NaN, "non_overediting": 3}', None),
    ("I'm sorry, I cannot evaluate these images.", None),
    ("", None),
    (None, None),
    ("{" * 3000 + "[" * 3000, None),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_local_judge_gets_messages_and_images_in_order():
    calls = []

    def fake(messages, images):
        calls.append((messages, images))
        return 'Sure. {"instruction_following": 5, "non_overediting": 3, "reason": "ok"}'

    out = LocalJudge(fake).score(SRC, EDIT, INSTRUCTION)
    assert out["s_i"] == 5 and out["s_n"] == 3 and out["viescore"] == pytest.approx(0.8)
    assert "non_overediting" in out["raw"]
    assert len(calls) == 1 and calls[0] == (build_prompt(INSTRUCTION), [SRC, EDIT])


def test_local_judge_retries_once_then_gives_none():
    answers = iter(["no idea", '{"instruction_following": 9, "non_overediting": 9}', "unused"])
    calls = []

    def adversarial(messages, images):
        calls.append(1)
        return next(answers)

    out = LocalJudge(adversarial).score(SRC, EDIT, INSTRUCTION)
    assert len(calls) == 2
    assert out == {"s_i": None, "s_n": None, "viescore": None,
                   "raw": '{"instruction_following": 9, "non_overediting": 9}',
                   "error": "no usable scores in the answer (2 tries)"}

    answers = iter(["garbage", "instruction following: 2, non-over-editing: 4"])
    assert LocalJudge(lambda m, i: next(answers)).score(SRC, EDIT, "x")["viescore"] == pytest.approx(0.6)
    assert LocalJudge(lambda m, i: None).score(SRC, EDIT, "x")["viescore"] is None  # non-text answer


@pytest.fixture
def server(monkeypatch):
    """A canned chat-completions endpoint on 127.0.0.1; queue bodies (or (status, body)) in `state.replies`."""
    for var in ("no_proxy", "NO_PROXY"):  # never route the loopback test through a configured proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    state = type("State", (), {"replies": [], "requests": []})()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append((self.path, dict(self.headers), json.loads(body)))
            reply = state.replies.pop(0)
            status, reply = reply if isinstance(reply, tuple) else (200, reply)
            reply = reply.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _completion(content) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def test_http_judge_request_and_score(server):
    server.replies.append(_completion('```json\n{"instruction_following": 4, "non_overediting": 5}\n```'))
    out = HTTPJudge(server.url, "judge-model", api_key="sk-test", timeout=5).score(SRC, EDIT, INSTRUCTION)
    assert out["s_i"] == 4 and out["s_n"] == 5 and out["viescore"] == pytest.approx(0.9)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "system"
    parts = body["messages"][1]["content"]
    assert any(INSTRUCTION in p.get("text", "") for p in parts)
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    prefix = "data:image/png;base64,"
    assert all(u.startswith(prefix) for u in urls)
    assert [base64.b64decode(u[len(prefix):]) for u in urls] == [SRC, EDIT]  # source first, then the edit
    assert not any(p["type"] == "image" for p in parts)


def test_http_judge_malformed_twice(server):
    server.replies += [_completion("I think it looks nice."), "<html>not json</html>", _completion("unused")]
    out = HTTPJudge(server.url, "m", timeout=5).score(SRC, EDIT, INSTRUCTION)
    assert len(server.requests) == 2 and "Authorization" not in server.requests[0][1]
    assert out["viescore"] is None and out["s_i"] is None and out["raw"] == "<html>not json</html>"


def test_http_judge_retry_succeeds_and_content_parts(server):
    server.replies += [_completion("score: great"),
                       _completion([{"type": "text", "text": "Instruction following: 3, "},
                                     {"type": "text", "text": "non-over-editing: 5"}])]
    out = HTTPJudge(server.url, "m", timeout=5).score(SRC, EDIT, INSTRUCTION)
    assert len(server.requests) == 2 and out["viescore"] == pytest.approx(0.8)


def test_http_judge_unreachable_is_user_error():
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="unreachable"):
        HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=2).score(SRC, EDIT, "x")


def test_http_judge_error_status_is_user_error(server):
    server.replies.append((401, '{"error": {"message": "invalid api key"}}'))
    with pytest.raises(UserError, match="HTTP 401"):
        HTTPJudge(server.url, "m", api_key="wrong", timeout=5).score(SRC, EDIT, "x")


# ---- failures are missing, never 0 (issue 17) ----------------------------------------------------------------------
def test_local_judge_that_raises_is_retried_then_missing():
    calls = []

    def oom(messages, images):
        calls.append(1)
        raise RuntimeError("CUDA out of memory")

    out = LocalJudge(oom, retries=2, backoff=0).score(SRC, EDIT, "x")
    assert len(calls) == 3 and out["viescore"] is None and out["s_i"] is None
    assert out["error"] == "the judge raised RuntimeError: CUDA out of memory (3 tries)"
    flaky = iter([RuntimeError("busy"), '{"instruction_following": 5, "non_overediting": 5}'])

    def once_busy(messages, images):
        x = next(flaky)
        if isinstance(x, Exception):
            raise x
        return x

    assert LocalJudge(once_busy, backoff=0).score(SRC, EDIT, "x")["viescore"] == 1.0


def test_http_judge_server_errors_are_retried_then_missing(server):
    server.replies += [(503, "overloaded"), _completion('{"instruction_following": 1, "non_overediting": 4}')]
    out = HTTPJudge(server.url, "m", timeout=5, backoff=0).score(SRC, EDIT, "x")
    assert out["viescore"] == pytest.approx(0.5) and len(server.requests) == 2
    server.replies += [(500, "boom"), (429, "slow down"), (502, "bad gateway")]
    out = HTTPJudge(server.url, "m", timeout=5, retries=2, backoff=0).score(SRC, EDIT, "x")
    assert out["viescore"] is None and out["error"] == "HTTP 502 (3 tries)" and len(server.requests) == 5


def test_http_judge_timeout_is_missing(monkeypatch):
    """An endpoint that accepts the connection but never answers within the timeout."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        out = HTTPJudge(url, "m", timeout=0.3, retries=1, backoff=0).score(SRC, EDIT, "x")
    assert out["viescore"] is None and out["error"] == "no answer within 0.3 s (2 tries)"


def test_http_judge_gone_after_answering_is_missing(server):
    judge = HTTPJudge(server.url, "m", timeout=5, backoff=0)
    server.replies.append(_completion('{"instruction_following": 5, "non_overediting": 5}'))
    assert judge.score(SRC, EDIT, "x")["viescore"] == 1.0
    with socket.socket() as s:  # the server goes away: the same judge, now pointed at a closed port
        s.bind(("127.0.0.1", 0))
        judge.url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/chat/completions"
    out = judge.score(SRC, EDIT, "x")
    assert out["viescore"] is None and out["error"].startswith("connection failed")


def test_evaluate_counts_missing_judgements(server, tmp_path, capsys):
    """evaluate.py with a judge that fails on one edit of three: that edit is missing (not 0), the mean is over
    the two judged ones, and the results count the missing one."""
    import shutil

    import evaluate
    from minedit.toy import world as toyworld

    toyworld.generate(str(tmp_path / "world"), n=12, seed=3, size=32)
    rows = [json.loads(r) for r in (tmp_path / "world" / "train.jsonl").read_text().splitlines()][:3]
    (tmp_path / "preds").mkdir()
    for i, r in enumerate(rows):
        shutil.copy(tmp_path / "world" / r["target"], tmp_path / "preds" / f"{i:05d}.png")
    ok = _completion('{"instruction_following": 4, "non_overediting": 4}')
    server.replies += [ok, (500, "x"), (500, "x"), ok]  # edit 1 fails twice (1 + 1 retry): missing
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = evaluate.main(["--ckpt", os.path.join(root, "assets/toy/insightedit"), "--data",
                          str(tmp_path / "world/train.jsonl"), "--limit", "3", "--pred-dir", str(tmp_path / "preds"),
                          "--out", str(tmp_path / "r.json"), "--judge-url", server.url, "--judge-model", "m"])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["viescore_missing"] == 1
    assert [s["viescore"] for s in res["samples"]] == [0.8, None, 0.8]
    assert res["summary"]["overall"]["viescore"] == pytest.approx(0.8)  # a 0 would have given 0.533
    assert res["summary"]["overall"]["viescore_missing_rate"] == pytest.approx(1 / 3)
    assert "VIEScore missing for 1 of 3 edits (first: HTTP 500 (2 tries))" in capsys.readouterr().err
