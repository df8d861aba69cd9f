"""scripts/editor_draws.py: an editing UNet sampled as the text-to-image prior it started from."""
import json
from pathlib import Path

import pytest
import torch

from conftest import import_script, ok, run_python
from minedit.errors import UserError
from minedit.model import EditModel
from minedit.presets import preset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "editor_draws.py"
BASE = ROOT / "assets" / "toy" / "base"


def load_script():
    return import_script(SCRIPT)


def test_a_fresh_editor_sampled_as_text_to_image_is_exactly_its_prior():
    """Zero-initialised source channels and a zero source latent: the widened UNet computes the 4-channel prior's
    function, so the probe measures the prior itself before any editing step."""
    from diffusers import UNet2DConditionModel

    script = load_script()  # puts scripts/ on sys.path
    from prior_quality import generate

    cfg = preset("ip2p", "toy")
    cfg.sd_path, cfg.clip_path = str(BASE / "sd"), str(BASE / "clip")
    model = EditModel(cfg.validate()).eval()
    prior = UNet2DConditionModel.from_pretrained(BASE / "sd", subfolder="unet").eval()
    assert model.unet.config.in_channels == 8 and prior.config.in_channels == 4
    with torch.no_grad():
        context = model.encode_text(["a red circle on a blue background", "a small green star at the top"])
        mine = generate(script.AsTextToImage(model), model.vae, context, model.null_text(), cfg, steps=5)
        theirs = generate(prior, model.vae, context, model.null_text(), cfg, steps=5)
    assert torch.allclose(mine, theirs, atol=1e-5)
    model.unet.conv_in.weight.data[:, 4:] += 0.5  # what editing training does to the source channels
    with torch.no_grad():  # a zero source still contributes nothing: only the shared weights can change drawing
        again = generate(script.AsTextToImage(model), model.vae, context, model.null_text(), cfg, steps=5)
    assert torch.allclose(again, theirs, atol=1e-5)


def test_scores_a_trained_checkpoint_and_a_fresh_one_from_its_prior(tmp_path):
    """End to end on a one-step ip2p run of a 40-sample world: the trained model and a fresh one from the shipped
    prior both write their figures."""
    run = tmp_path / "run"
    ok(run_python(str(ROOT / "train.py"), "--recipe", "ip2p", "--out", str(run), "--max-steps", "1",
                  "--toy_samples=40", f"--sd_path={BASE / 'sd'}", f"--clip_path={BASE / 'clip'}", "--batch-size", "4",
                  "--sample-every", "0", env={"MINEDIT_CACHE": str(tmp_path / "cache")}))
    for extra, name in (([], "trained"), (["--prior", str(BASE / "sd")], "fresh")):
        ok(run_python(str(SCRIPT), "--ckpt", str(run), "--n", "4", "--out", str(tmp_path / f"{name}.json"), *extra,
                      env={"MINEDIT_CACHE": str(tmp_path / "cache")}))
    trained, fresh = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("trained", "fresh"))
    assert trained["captions"] == fresh["captions"] == 4 and fresh["prior"] == str(BASE / "sd")
    for figures in (trained, fresh):
        assert 0 <= figures["colours_right"] <= 1 and 0 <= figures["shapes_right"] <= 1
        assert set(figures["by_shape"]) <= {"circle", "diamond", "square", "star", "triangle"}


def test_bad_flags_are_one_line_errors(tmp_path):
    script = load_script()
    with pytest.raises(UserError, match="no unet/ in it"):
        script.main(["--ckpt", str(ROOT / "assets" / "toy" / "insightedit"), "--prior", str(tmp_path)])
    with pytest.raises(UserError, match="--n 0"):
        script.main(["--ckpt", str(ROOT / "assets" / "toy" / "insightedit"), "--n", "0"])
