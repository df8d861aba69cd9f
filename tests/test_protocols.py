"""The benchmarks' protocols: each formula against a hand computation or an independent reference, and
`evaluate.py --protocol ...` end to end on tiny folders and manifests with a tiny checkpoint."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minedit import checkpoint
from minedit.eval import protocols
from minedit.eval.judge import LocalJudge
from minedit.model import EditModel
from minedit.presets import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CLIP = os.path.join(ROOT, "assets", "toy", "base", "clip")


def test_ssim_gaussian_equals_scikit_image_gaussian_population():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((40, 33, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ref = structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert abs(protocols.ssim_gaussian(a, b) - ref) < 1e-10
    assert protocols.ssim_gaussian(a, a) == pytest.approx(1.0)


def test_reason_edit_background_weights_both_images_by_one_minus_mask():
    src, edit = np.zeros((16, 16, 3)), np.full((16, 16, 3), 0.1)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255  # the left half is the edit region: weighted out of both images
    r = protocols.reason_edit_background(src, edit, mask)
    # MSE over the whole image = 0.1² on the right half, 0 on the left: 0.005 -> 10·log10(1/0.005)
    assert r["psnr"] == pytest.approx(10 * math.log10(200))
    grey = mask.copy()
    grey[:, :8] = 51  # a JPEG grey of 51/255 = 0.2 keeps 80 % of the pixel
    r = protocols.reason_edit_background(src, edit, grey)
    assert r["psnr"] == pytest.approx(10 * math.log10(1 / ((0.01 * 0.64 + 0.01) / 2)))


def test_mask_bbox_is_smartedit_crop_box():
    mask = np.zeros((20, 20), np.uint8)
    mask[3:7, 2:10] = 200
    assert protocols.mask_bbox(mask) == (2, 3, 9, 6)  # last nonzero column/row, excluded by the crop
    assert protocols.mask_bbox(np.zeros((5, 5))) is None


def test_magicbrush_distances_by_hand():
    d = protocols.magicbrush_distances(np.full((4, 5, 3), 0.5), np.full((4, 5, 3), 0.25))
    assert d == {"l1": pytest.approx(0.25), "l2": pytest.approx(0.0625)}


def test_vie_overall_and_score_parsing():
    assert protocols.vie_overall([7, 4], [9, 6]) == {"sc": 4, "pq": 6, "o": pytest.approx(math.sqrt(24))}
    assert protocols.parse_score_list('sure: {"score": [7, "4"], "reasoning": "x"}') == [7.0, 4.0]
    assert protocols.parse_score_list('```json\n{"score": [3, 2]}\n``` then {"score": [8, 9]}') == [8.0, 9.0]
    for bad in ('{"score": [11, 3]}', '{"score": [3]}', "no json", None, '{"score": "7, 4"}'):
        assert protocols.parse_score_list(bad) is None


def test_gedit_scores_ask_sc_with_two_images_and_pq_with_one():
    seen = []

    def fake(messages, images):
        seen.append(len(images))
        return '{"score": [8, 5]}' if "instruction" in messages[0]["content"] else '{"score": [6, 9]}'

    s = protocols.gedit_scores(LocalJudge(fake), b"src", b"edit", "make it blue")
    assert seen == [2, 1]
    assert (s["sc"], s["pq"], s["o"]) == (5, 6, pytest.approx(math.sqrt(30)))
    broken = protocols.gedit_scores(LocalJudge(lambda m, i: "I refuse"), b"s", b"e", "x")
    assert broken["o"] is None and broken["sc_scores"] is None


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False).eval()
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    return str(path)


def test_dino_features_are_the_normalised_cls_token(tiny_vit):
    import torch.nn.functional as F
    from transformers import ViTModel

    model = ViTModel.from_pretrained(tiny_vit).eval()
    rng = np.random.default_rng(1)
    a, b = rng.random((37, 37, 3)), rng.random((37, 50, 3))
    f = protocols.dino_features(model, [a, b])
    # By hand: 37 = round(32·256/224), so `a` is only centre-cropped to 32 (offset 2), then ImageNet-normalised.
    x = torch.from_numpy(a[2:34, 2:34]).float().permute(2, 0, 1)[None]
    x = (x - torch.tensor(protocols.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(protocols.IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(f[0], F.normalize(cls, dim=-1)[0], atol=1e-5)
    assert f.norm(dim=-1).sub(1).abs().max() < 1e-5 and float(f[0] @ f[1]) < 0.999


# ---- end to end -----------------------------------------------------------------------------------------------
def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ip2p")
    torch.manual_seed(0)
    cfg = preset("ip2p", "toy")
    checkpoint.save_checkpoint(str(run_dir), 1, cfg, EditModel(cfg).checkpoint_state(2))
    return run_dir


def picture(path, seed, size=(40, 40)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def reason_edit(tmp_path):
    root = tmp_path / "Reason-Edit"
    for c, cat in enumerate(["1-Left-Right", "6-Reasoning"]):
        (root / cat).mkdir(parents=True)
        lines = []
        for i in range(2):
            picture(root / cat / f"{i}.png", 10 * c + i, (48, 40))
            m = np.zeros((40, 48), np.uint8)
            m[8:30, 10 + i:30] = 255
            Image.fromarray(m).save(root / cat / f"{i}_mask.jpg")
            lines.append(f"remove the left cup CLIP: a table with one cup {i}")
        (root / cat / f"{cat}_text.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_reason_edit_end_to_end(ckpt, reason_edit, tmp_path):
    out = tmp_path / "re.json"
    r = run("--protocol", "reason-edit", "--ckpt", ckpt, "--data", reason_edit, "--out", out, "--steps", 2,
            "--clip", TOY_CLIP)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    by = res["summary"]["by_category"]
    assert set(by["groups"]) == {"1-Left-Right", "6-Reasoning"} and by["overall"]["count"] == 4
    s = res["samples"][3]
    assert s["category"] == "6-Reasoning" and s["instruction"] == "remove the left cup"
    # PSNR by hand from the files: 256 px bicubic, mask nearest, both images × (1 − mask/255)
    src = np.asarray(Image.open(reason_edit / "6-Reasoning" / "1.png").resize((256, 256), Image.BICUBIC)) / 255
    edit = np.asarray(Image.open(s["pred"]).convert("RGB").resize((256, 256), Image.BICUBIC)) / 255
    m = np.asarray(Image.open(reason_edit / "6-Reasoning" / "1_mask.jpg").convert("L").resize((256, 256),
                                                                                             Image.NEAREST))
    w = 1 - m[..., None] / 255
    assert s["psnr"] == pytest.approx(10 * math.log10(1 / np.mean((src * w - edit * w) ** 2)), rel=1e-9)
    assert 0 <= s["clip_score"] <= 100
    assert np.mean([x["psnr"] for x in res["samples"][2:]]) == pytest.approx(by["groups"]["6-Reasoning"]["psnr"])


@pytest.mark.slow
def test_magicbrush_single_and_final_turn(ckpt, tmp_path, tiny_vit):
    rows = []
    for s in range(2):
        for t in (1, 2):
            for name, seed in (("in", 0), ("out", 1)):
                picture(tmp_path / f"{s}-{t}-{name}.png", 100 * s + 10 * t + seed)
            src = f"{s}-{t - 1}-out.png" if t > 1 else f"{s}-1-in.png"
            rows.append({"source": src, "target": f"{s}-{t}-out.png", "instruction": f"make it red {t}",
                         "img_id": f"s{s}", "turn_index": t, "local_caption": "a red ball"})
    rows.append({"source": "0-1-in.png", "target": "0-1-out.png", "instruction": "add a hat"})  # one-turn session
    with open(tmp_path / "mb.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "mb.json"
    r = run("--protocol", "magicbrush", "--ckpt", ckpt, "--data", tmp_path / "mb.jsonl", "--out", out,
            "--steps", 2, "--clip", TOY_CLIP, "--dino", tiny_vit)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    single, final = res["samples"]["single_turn"], res["samples"]["final_turn"]
    assert len(single) == 5 and len(final) == 3
    # final turn of session s0 is the model's turn-2 edit of its own turn-1 edit, scored against turn 2's target
    assert final[0]["pred"].endswith(os.path.join("final", "s0", "turn2.png"))
    edit = np.asarray(Image.open(final[0]["pred"]).convert("RGB").resize((40, 40), Image.BICUBIC)) / 255
    target = np.asarray(Image.open(tmp_path / "0-2-out.png")) / 255
    assert final[0]["l1"] == pytest.approx(np.abs(edit - target).mean())
    assert final[0]["l2"] == pytest.approx(((edit - target) ** 2).mean())
    assert all(-1 <= x[k] <= 1 for x in single[:4] for k in ("clip_i", "clip_t", "dino"))
    assert "clip_t" not in single[4] and "dino" in single[4]  # no local caption, no CLIP-T
    assert res["summary"]["single_turn"]["overall"]["count"] == 5


def test_bad_protocol_inputs_are_one_error_line(ckpt, reason_edit, tmp_path, capsys):
    from minedit.errors import run_cli
    import evaluate

    (reason_edit / "6-Reasoning" / "1_mask.jpg").unlink()
    cases = [(["--protocol", "pie"], "choose one of reason-edit, magicbrush, gedit"),
             (["--protocol", "reason-edit", "--data", reason_edit], "must pair up"),
             (["--protocol", "reason-edit", "--data", tmp_path / "none"], "not a folder"),
             (["--protocol", "gedit", "--data", reason_edit], "needs a judge"),
             (["--protocol", "magicbrush", "--data", reason_edit / "6-Reasoning" / "0.png"], "line 1")]
    with open(tmp_path / "mb.jsonl", "w") as f:
        f.write(json.dumps({"source": str(reason_edit / "1-Left-Right" / "0.png"), "instruction": "x",
                            "target": str(reason_edit / "1-Left-Right" / "1.png")}) + "\n")
    cases += [(["--protocol", "magicbrush", "--data", tmp_path / "mb.jsonl", "--dino", tmp_path / "no-dino"],
               "pass --dino with"),
              (["--protocol", "reason-edit", "--clip", tmp_path / "no-clip"], "pass --clip with")]
    if importlib.util.find_spec("lpips") is None:  # an optional extra asked for by name: say how to install it
        cases.append((["--protocol", "reason-edit", "--lpips", "squeeze"], "pip install lpips"))
    for args, says in cases:
        argv = ["--ckpt", str(ckpt), "--data", str(reason_edit), "--out", str(tmp_path / "o.json"), *map(str, args)]
        with pytest.raises(SystemExit) as e:
            run_cli(evaluate.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and says in err, err
    r = run("--protocol", "reason-edit", "--ckpt", ckpt, "--data", reason_edit, "--out", tmp_path / "o.json")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "must pair up" in r.stderr and not (tmp_path / "o.json").exists()


@pytest.fixture
def judge_url(monkeypatch):
    """A chat-completions endpoint on 127.0.0.1 that answers the SC prompt [8, 5] (or [2, 7] for a "blue" edit)
    and the PQ prompt [6, 9]."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = json.dumps(body["messages"])
            score = ([2, 7] if "blue" in text else [8, 5]) if "instruction" in body["messages"][0]["content"] \
                else [6, 9]
            reply = json.dumps({"choices": [{"message": {"content": json.dumps({"score": score})}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_gedit_end_to_end_per_task_type(ckpt, tmp_path, judge_url):
    rows = [{"source": "a.png", "instruction": "make the car blue", "task_type": "color_alter",
             "instruction_language": "en"},
            {"source": "a.png", "instruction": "add a dog", "task_type": "subject-add", "instruction_language": "en"},
            {"source": "a.png", "instruction": "add a cat", "task_type": "subject-add", "instruction_language": "cn"}]
    picture(tmp_path / "a.png", 0)
    with open(tmp_path / "g.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    r = run("--protocol", "gedit", "--ckpt", ckpt, "--data", tmp_path / "g.jsonl", "--out", tmp_path / "g.json",
            "--steps", 2, "--judge-url", judge_url)
    assert r.returncode == 0, r.stderr
    summary = json.load(open(tmp_path / "g.json"))["summary"]
    by = summary["by_task_type"]
    assert summary["by_language"]["groups"]["en"]["o"] == pytest.approx((math.sqrt(12) + math.sqrt(30)) / 2)
    # color_alter: SC = min(2, 7) = 2, PQ = min(6, 9) = 6, O = √12; subject-add: SC 5, PQ 6, O = √30
    assert by["groups"]["color_alter"]["o"] == pytest.approx(math.sqrt(12))
    assert by["groups"]["subject-add"]["sc"] == 5 and by["groups"]["subject-add"]["o"] == pytest.approx(math.sqrt(30))
    assert by["overall"]["o"] == pytest.approx((math.sqrt(12) + 2 * math.sqrt(30)) / 3)
    assert by["overall"]["pq"] == 6
