"""Cross-attention maps (minedit/eval/attnmaps.py, infer.py --attention-maps): the recorded probabilities are the ones
each layer applies (P·V against the layer's own output), they are non-negative and sum to one over tokens, the
edit is bit-identical with and without recording, the maps follow the instruction, and the script writes them."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_unet
from minedit.data import load_image, to_tensor
from minedit.errors import UserError
from minedit.eval.attnmaps import AttentionRecorder, layer_grid, spread_steps, token_labels
from minedit.parts.decoupled_attention import DecoupledAttnProcessor, install_decoupled_attention
from minedit.sampler import edit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "assets", "toy", "insightedit")
EXAMPLE = os.path.join(ROOT, "assets", "toy", "example.png")


def heads(t, n):  # (B, L, n·d) -> (B, n, L, d)
    return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("hw", [(16, 16), (9, 13)])
@torch.no_grad()
def test_recorded_probabilities_are_the_attention_each_layer_applies(decoupled, hw):
    """Per layer, before any averaging: P ≥ 0, Σ_tokens P = 1 per pixel and head, and P·V (+ λ·P_img·V_img) is
    exactly what the layer feeds its output projection — for the conditional rows [:edits] of a 3-branch batch."""
    g = torch.Generator().manual_seed(0)
    edits, lam = 2, 0.6
    unet = tiny_unet()
    if decoupled:
        install_decoupled_attention(unet, scale=lam)
    x = torch.randn(3 * edits, 4, *hw, generator=g)
    text, image = torch.randn(3 * edits, 7, 32, generator=g), torch.randn(3 * edits, 4, 32, generator=g)
    kwargs = {"image_tokens": image} if decoupled else None
    fed = {}  # layer name -> the input of its to_out[0] (B×L×inner)
    cross = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    hooks = [m.to_out[0].register_forward_pre_hook(lambda mod, a, n=n: fed.__setitem__(n, a[0]))
             for n, m in cross.items()]
    with AttentionRecorder(unet, steps=[0, 2], edits=edits, keep_layers=True) as rec:
        for t in (900, 500, 100):
            unet(x, torch.tensor(t), text, cross_attention_kwargs=kwargs)
    for h in hooks:
        h.remove()
    assert rec.timesteps == [900, 100] and len(rec.layers) == 2
    assert set(rec.layers[-1]) == set(cross)
    sizes = set()
    for name, (p_txt, p_img) in rec.layers[-1].items():  # the last recorded call is the one `fed` saw
        attn = cross[name]
        sizes.add(p_txt.shape[2])
        for p in (p_txt, p_img) if decoupled else (p_txt,):
            assert p.min() >= 0
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6, rtol=0)
        z = p_txt @ heads(attn.to_v(text[:edits]), attn.heads)
        if decoupled:
            z = z + lam * p_img @ heads(attn.processor.to_v_ip(image[:edits]), attn.heads)
        else:
            assert p_img is None
        z = z.transpose(1, 2).flatten(2)
        torch.testing.assert_close(z, fed[name][:edits], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(z, fed[name][edits:2 * edits], atol=1e-3)  # another branch's rows differ
    assert len(sizes) == 2  # layers at two resolutions: the grid of each had to be found
    # After averaging over heads and layers and upsampling: still a distribution over tokens at every pixel.
    groups = [rec.text] + ([rec.image] if decoupled else [])
    assert rec.image == [] or decoupled
    for maps in groups:
        for m in maps:
            assert m.shape[0] == edits and m.shape[-2:] == hw and m.min() >= 0
            torch.testing.assert_close(m.sum(1), torch.ones(edits, *hw), atol=1e-5, rtol=0)
    assert (rec.ip_scale == lam) if decoupled else rec.ip_scale is None


def test_grid_and_steps():
    assert layer_grid(16 * 16, (16, 16)) == (16, 16) and layer_grid(5 * 7, (9, 13)) == (5, 7)
    assert layer_grid(3 * 4, (9, 13)) == (3, 4)
    with pytest.raises(ValueError):
        layer_grid(50, (16, 16))
    assert spread_steps(25) == [0, 12, 24] and spread_steps(2) == [0, 1] and spread_steps(1) == [0]


@pytest.fixture(scope="module")
def toy():
    from minedit.model import load_model
    return load_model(TOY)


def recorded_edit(model, instruction, steps=6, **kw):
    x = to_tensor(load_image(EXAMPLE))[None]
    with AttentionRecorder(model.unet, spread_steps(steps), text_encoder=model.text_encoder) as rec:
        out = edit(model, x, [instruction], steps=steps, seed=0, **kw)
    return out, rec


def test_shipped_model_maps_leave_the_edit_alone_and_follow_the_instruction(toy):
    """InsightEdit: 24 Q-Former query maps and 4 image-token maps; the edit is bit-identical with recording."""
    instruction = "Is there anything with four sides? Delete it."
    out, rec = recorded_edit(toy, instruction)
    plain = edit(toy, to_tensor(load_image(EXAMPLE))[None], [instruction], steps=6, seed=0)
    assert torch.equal(out, plain)
    assert any(isinstance(p, DecoupledAttnProcessor) for p in toy.unet.attn_processors.values())
    assert len(rec.text) == len(rec.image) == 3 and rec.ip_scale == toy.cfg.ip_scale
    assert rec.text[0].shape == (1, toy.cfg.text_max_length, 16, 16) and rec.image[0].shape == (1, 4, 16, 16)
    for m in rec.text + rec.image:
        assert m.min() >= 0
        torch.testing.assert_close(m.sum(1), torch.ones(1, 16, 16), atol=1e-5, rtol=0)
    labels, shown = token_labels(toy, rec, rec.text[0].shape[1])
    assert labels[:2] == ["q0", "q1"] and shown == len(labels)
    _, other = recorded_edit(toy, "make the circle blue")
    for a, b in zip(rec.text + rec.image, other.text + other.image):
        assert (a - b).abs().max() > 1e-3


@pytest.fixture(scope="module")
def ip2p():
    from minedit.model import EditModel
    from minedit.presets import preset
    torch.manual_seed(0)
    return EditModel(preset("ip2p", "toy")).eval()


def test_ip2p_maps_are_named_by_the_instructions_tokens(ip2p):
    out, rec = recorded_edit(ip2p, "remove the red circle", steps=3)
    assert torch.equal(out, edit(ip2p, to_tensor(load_image(EXAMPLE))[None], ["remove the red circle"], steps=3,
                                 seed=0))
    assert rec.image == [] and rec.ip_scale is None
    labels, shown = token_labels(ip2p, rec, rec.text[0].shape[1])
    words = [w for w in labels[:shown] if not w.startswith("<")]
    assert words == ["remove", "the", "red", "circle"] and all(w == "<pad>" for w in labels[shown:])
    _, other = recorded_edit(ip2p, "make the square green", steps=3)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(rec.text, other.text))


def test_mindedit_maps_are_named_by_the_decoded_topt():
    """MIND-Edit conditions the UNet on CLIP_text(T_opt): the labels are T_opt's tokens (the instruction's with
    use_topt=False), and v_insight's image tokens get their own maps."""
    from minedit.model import EditModel
    from minedit.presets import preset
    torch.manual_seed(0)
    model = EditModel(preset("mindedit", "toy", 2)).eval()
    tok = model.text_tokenizer
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # its T_opt is not empty
    for use_topt in (True, False):
        with AttentionRecorder(model.unet, [0], text_encoder=model.text_encoder) as rec:
            _, texts = edit(model, x, ["remove the red circle"], steps=1, seed=0, use_topt=use_topt,
                            return_texts=True)
        labels, shown = token_labels(model, rec, rec.text[0].shape[1])
        said = texts[0] if use_topt else "remove the red circle"
        assert said.strip()
        expected = tok.convert_ids_to_tokens(tok(said, truncation=True, max_length=model.cfg.text_max_length)
                                             .input_ids)
        assert labels[:shown] == [t.replace("</w>", "") for t in expected]
        assert len(rec.image) == 1 and rec.image[0].shape[1] == model.cfg.iaa_tokens


def run_infer(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_infer_edit_is_the_same_with_and_without_maps(tmp_path):
    import infer

    infer.main(["--out", str(tmp_path / "a.png"), "--steps", "4", "--attention-maps", str(tmp_path / "m.png")])
    infer.main(["--out", str(tmp_path / "b.png"), "--steps", "4"])
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m.npz").is_file()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.slow
def test_infer_writes_the_sheet_and_the_arrays(tmp_path):
    with_maps = run_infer("--out", tmp_path / "a.png", "--steps", 4, "--attention-maps", tmp_path / "maps.png")
    assert with_maps.returncode == 0, with_maps.stderr
    assert f"wrote {tmp_path / 'maps.png'} and {tmp_path / 'maps.npz'}" in with_maps.stdout
    z = np.load(tmp_path / "maps.npz")
    assert z["text"].shape == (3, 24, 16, 16) and z["image"].shape == (3, 4, 16, 16)
    assert list(z["steps"]) == [0, 2, 3] and z["timesteps"][0] > z["timesteps"][-1]
    assert list(z["text_labels"][:2]) == ["q0", "q1"] and list(z["image_labels"]) == ["img0", "img1", "img2", "img3"]
    np.testing.assert_allclose(z["text"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(z["image"].sum(1), 1, atol=1e-5)
    sheet = Image.open(tmp_path / "maps.png")
    assert sheet.width > 10 * 80 and sheet.height > 3 * 80  # the source + 28 panels, three steps
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_bad_maps_path_is_one_error_line(tmp_path):
    r = run_infer("--attention-maps", tmp_path / "maps.jpg")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and ".png" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--attention-maps", "/nonexistent/dir/m.png"], "does not exist"),
    (["--attention-maps", "m.npz"], "ending in .png"),
    (["--attention-maps", "READONLY/m.png"], "read-only"),
    (["--attention-maps", "OUT"], "also the edit's --out"),
    (["--attention-maps", "m.png", "--batch", "x.jsonl", "--out-dir", "d"], "drop --batch"),
])
def test_bad_maps_flags(tmp_path, monkeypatch, args, needle):
    import infer

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    args = [str(ro / "m.png") if a == "READONLY/m.png" else str(tmp_path / "o.png") if a == "OUT" else a
            for a in args]
    with pytest.raises(UserError, match=needle):
        infer.main(["--image", EXAMPLE, "--instruction", "remove it", "--out", str(tmp_path / "o.png"), *args])
