"""scripts/place_probe.py: does a toy base's text tower tell places apart, and does its prior move a shape when
only the place words of a caption change?"""
import json
from pathlib import Path

import numpy as np
import torch

from conftest import import_script, ok, run_python
from minedit.presets import preset
from minedit.toy.draw import render

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "place_probe.py"
BASE = ROOT / "assets" / "toy" / "base"


def load_script():
    return import_script(SCRIPT)


def shipped_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    cfg = preset("insightedit", "toy")
    return (cfg, UNet2DConditionModel.from_pretrained(BASE / "sd", subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(BASE / "sd", subfolder="vae").eval(),
            CLIPTextModel.from_pretrained(BASE / "sd", subfolder="text_encoder").eval(),
            AutoTokenizer.from_pretrained(BASE / "sd" / "tokenizer"))


def test_state_similarity_is_the_cosine_at_the_differing_words_only():
    script = load_script()
    cfg, _, _, text_encoder, tok = shipped_parts()
    a, b = ["a white background with a large red star at the top left"], ["a white background with a large red star "
                                                                         "at the bottom right"]
    ids = [tok(x, padding="max_length", max_length=cfg.text_max_length, return_tensors="pt").input_ids for x in (a, b)]
    with torch.no_grad():
        h = [text_encoder(i).last_hidden_state[0] for i in ids]
    differ = (ids[0] != ids[1])[0].nonzero().flatten()
    assert len(differ) == 2  # "top left" / "bottom right"
    by_hand = np.mean([float(h[0][k] @ h[1][k] / (h[0][k].norm() * h[1][k].norm())) for k in differ])
    assert abs(script.state_similarity(text_encoder, tok, cfg, a, b) - by_hand) < 1e-5


def test_drawn_place_reads_a_rendered_shape_and_misses_an_absent_colour():
    script = load_script()
    for x, y, place in ((6, 6, "at the top left"), (16, 26, "at the bottom"), (26, 16, "on the right")):
        image = np.asarray(render("white", [{"shape": "square", "size": "large", "x": x, "y": y, "colour": "red"}],
                                  32), np.float32)
        got, c = script.drawn_place(image, "red")
        assert got == place and np.allclose(c, (x, y), atol=1)
        assert script.drawn_place(image, "blue")[0] is None


def test_a_text_tower_blind_to_every_word_moves_nothing_and_the_last_x0_is_the_image():
    """The nine place variants of a caption start from the same noise: with a text tower that returns the same
    states for every caption the nine images are the same, so the shape moves 0 px; and the x0 prediction of
    DDIM's last step is the final image, so 'decided' ends at 1 wherever a shape was found."""
    script = load_script()
    cfg, unet, vae, text_encoder, tok = shipped_parts()
    cfg.vae_channels = tuple(vae.config.block_out_channels)

    fixed = tok(["a white background with a large red circle"], padding="max_length",
                max_length=cfg.text_max_length, return_tensors="pt").input_ids

    class Blind(torch.nn.Module):  # reads every caption as the same one (whose red shape the probe looks for)
        def forward(self, ids):
            return type("Out", (), {"last_hidden_state": text_encoder(fixed.expand_as(ids)).last_hidden_state})

    blind = script.probe(unet, vae, Blind(), tok, cfg, n=1)
    assert blind["places_right"] > 0  # a red shape was found (in one place of the nine, the same in each)
    assert blind["mean_move_px"] < 1e-9 and len(set(map(tuple, blind["mean_centroid_by_place"].values()))) == 1
    assert blind["text_state_cosine"]["place_words"] > 0.999 and len(blind["decided"]) == cfg.steps
    real = script.probe(unet, vae, text_encoder, tok, cfg, n=1)
    assert real["decided"][-1]["agrees_with_final"] == 1.0 and real["captions"] == 9
    assert real["text_state_cosine"]["colour_word"] < 0.999


def test_the_script_prints_and_writes_its_figures_and_refuses_a_folder_without_a_prior(tmp_path):
    res = run_python(SCRIPT, "--base", BASE, "--n", "1", "--json", tmp_path / "p.json")
    ok(res)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved == json.loads(res.stdout.strip().splitlines()[-1]) and 0 <= saved["places_right"] <= 1
    bad = run_python(SCRIPT, "--base", tmp_path, "--n", "1")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "no sd/unet" in bad.stderr
    assert "Traceback" not in bad.stderr
