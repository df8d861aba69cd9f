"""scripts/pretrain_toy_bases.py: a smoke run (a few steps each) whose saved folder loads through the package's own
path and through the public CLIP classes, a VAE that learned something, and prompts/decoding that agree with the
model code."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

from conftest import import_script
from minedit import build
from minedit.errors import UserError
from minedit.model import EditModel
from minedit.presets import apply_overrides, preset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_toy_bases.py"
SHIPPED = SCRIPT.parents[1] / "assets" / "toy" / "base"


def load_script(path: Path = SCRIPT):
    return import_script(path)


def load_mllm_script():
    """scripts/pretrain_toy_mllm.py, the MLLM stage (it imports its sibling pretrain_toy_bases.py)."""
    load_script()  # puts scripts/ on sys.path
    return load_script(SCRIPT.parent / "pretrain_toy_mllm.py")


def load_clip_script():
    """scripts/pretrain_toy_clip.py, the CLIP stage (it imports its sibling pretrain_toy_bases.py)."""
    load_script()  # puts scripts/ on sys.path
    return load_script(SCRIPT.parent / "pretrain_toy_clip.py")


def load_quality():
    """scripts/mllm_quality.py, the MLLM's scoring (it imports its sibling pretrain_toy_mllm.py)."""
    load_script()  # puts scripts/ on sys.path
    return load_script(SCRIPT.parent / "mllm_quality.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bases")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINEDIT_CACHE", str(tmp / "cache"))
    try:
        script = load_script()
        out = tmp / "base"
        metrics = script.main(["--out", str(out), "--n", "45", "--steps-vae", "12", "--steps-clip", "3",
                               "--steps-mllm", "3", "--batch-vae", "8", "--batch-clip", "8", "--batch-mllm", "4",
                               "--steps-unet", "2", "--unet-world-n", "40"])
    finally:
        mp.undo()
    return script, out, metrics


@pytest.fixture(scope="module")
def model(run):
    _, out, _ = run
    cfg = dataclasses.replace(preset("insightedit", "toy"), mllm_path=str(out / "mllm"), sd_path=str(out / "sd"),
                              clip_path=str(out / "clip"))
    return EditModel(cfg)


def test_outputs_written_and_small(run):
    _, out, metrics = run
    assert json.loads((out / "metrics.json").read_text())["seed"] == 0
    assert "python scripts/pretrain_toy_bases.py" in (out / "README.md").read_text()
    assert metrics["size_mb"] < 15
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "sd" / sub).is_dir(), sub


def test_vae_reconstruction_improved_and_scaling_factor_saved(run, model):
    _, _, metrics = run
    v = metrics["vae"]
    assert v["eval_psnr_db"] > v["eval_psnr_db_at_init"] + 1.0  # the eval reconstruction loss went down
    assert model.vae.config.scaling_factor == pytest.approx(1 / v["latent_std"], rel=1e-3)


def test_text_to_image_unet_saved_with_4_channels_and_widened_to_8(run, model):
    from diffusers import UNet2DConditionModel

    _, out, metrics = run
    t2i = UNet2DConditionModel.from_pretrained(out / "sd", subfolder="unet")
    assert t2i.config.in_channels == 4 and (out / "t2i-grid.png").is_file()
    assert 0 <= metrics["unet"]["clip_top1_in_32_generated"] <= 1 and metrics["unet"]["steps"] == 2
    conv = model.unet.conv_in
    conv = getattr(conv, "conv", conv)  # BIM wraps conv_in with its residual
    assert conv.in_channels == 8
    assert torch.equal(conv.weight[:, :4], t2i.conv_in.weight) and not conv.weight[:, 4:].any()


def test_editmodel_loads_saved_bases_and_runs_a_step(model):
    assert model.n_image_tokens == 64
    model.set_stage(1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "caption": ["a red circle", "a blue star"]}
    loss, parts = model(batch, 1)
    assert torch.isfinite(loss) and {"llm", "qformer", "iaa"} <= set(parts)


def test_clip_folder_loads_as_clipmodel_and_vision_with_projection(run):
    _, out, _ = run
    clip = CLIPModel.from_pretrained(out / "clip")
    vision = CLIPVisionModelWithProjection.from_pretrained(out / "clip")
    text = CLIPTextModel.from_pretrained(out / "sd", subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(out / "sd", subfolder="tokenizer")
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pix)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        torch.testing.assert_close(vision(pixel_values=pix).image_embeds, feats)
        ids = tok(["a red circle on a white background"], padding="max_length", max_length=24,
                  return_tensors="pt").input_ids
        assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0]  # eos present: CLIP pools there
        torch.testing.assert_close(text(ids).pooler_output, clip.text_model(ids).pooler_output)
        assert text(ids).last_hidden_state.shape == (1, 24, 64)


def test_prompt_matches_editmodel_mllm_inputs(run, model):
    from minedit.comprehend import mllm_inputs

    text = "remove the shape with three corners"
    ids, _, _ = mllm_inputs(model, torch.zeros(1, 3, 32, 32), [text])
    ours = load_mllm_script().prompt_ids(model.tokenizer, model.n_image_tokens, text)
    assert ids[0, :-model.cfg.num_mm_tokens].tolist() == ours
    assert ours.count(4) == 64  # <image> id 4, expanded to the 64 patch tokens


def test_greedy_decoding_equals_argmax_loop(run):
    _, out, _ = run
    from transformers import LlavaForConditionalGeneration
    mllm = LlavaForConditionalGeneration.from_pretrained(out / "mllm").eval()
    tok = AutoTokenizer.from_pretrained(out / "mllm")
    prompt_ids = load_mllm_script().prompt_ids
    prompts = [prompt_ids(tok, 64, t) for t in ("remove the red circle", "describe the picture.", "add a blue star")]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = load_quality().greedy_answers(mllm, tok, prompts, pixels, max_new=5)
    for p, px, answer in zip(prompts, pixels, got):  # reference: full forward, argmax, no cache
        ids = torch.tensor([p])
        for _ in range(5):
            with torch.no_grad():
                nxt = mllm(input_ids=ids, pixel_values=px[None]).logits[0, -1].argmax()
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert answer == tok.decode(ids[0, len(p):], skip_special_tokens=True)


def test_architecture_override_that_the_loaded_unet_contradicts_is_an_error():
    """--unet_cross_attn_blocks=... with a UNet loaded from sd_path would be silently ignored: refuse it."""
    cfg = apply_overrides(preset("ip2p", "toy"), ["--sd_path=assets/toy/base/sd"]).validate()
    assert build.build_unet(cfg).config.in_channels == 8  # the shipped base agrees with the toy preset
    cfg = apply_overrides(cfg, ["--unet_cross_attn_blocks=True,True,True"]).validate()
    with pytest.raises(UserError, match=r"unet_cross_attn_blocks=\(True, True, True\)"):
        build.build_unet(cfg)


def test_only_mllm_retrains_the_mllm_alone_from_the_base(run, monkeypatch):
    """--only mllm: a copy of --base whose mllm/ is new (vision tower from base/clip, kept fixed under
    --freeze-vision, reading the asked feature layer), the other parts copied byte for byte, the base untouched."""
    from transformers import LlavaForConditionalGeneration

    script, base, _ = run
    before = {p: p.read_bytes() for p in (base / "mllm").rglob("*") if p.is_file()}
    monkeypatch.setenv("MINEDIT_CACHE", str(base.parent / "cache"))  # the fixture's world, already drawn
    out = base.parent / "mllm-only"
    metrics = script.main(["--only", "mllm", "--base", str(base), "--out", str(out), "--n", "45", "--steps-mllm", "2",
                           "--batch-mllm", "4", "--vision-feature-layer", "-1", "--freeze-vision",
                           "--mllm-refer-share", "0.25"])
    assert {p: p.read_bytes() for p in (base / "mllm").rglob("*") if p.is_file()} == before
    for f in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/config.json", "clip/model.safetensors"):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["vae"] == json.loads((base / "metrics.json").read_text())["vae"]  # the base's parts carried over
    m = saved["mllm"]
    assert m["loss_last"] == metrics["mllm"]["loss_last"] and m["steps"] == 2 and "--only mllm" in m["command"]
    assert 0 <= m["eval_exact_match"]["all"] <= 1 and "--only mllm" in (out / "README.md").read_text()
    assert m["train_refers"] > 0 and m["refer_share"] == 0.25 and 0 <= m["eval_caption_shape_word"] <= 1
    new = LlavaForConditionalGeneration.from_pretrained(out / "mllm")
    old = LlavaForConditionalGeneration.from_pretrained(base / "mllm")
    assert new.config.vision_feature_layer == -1 and old.config.vision_feature_layer == -2
    clip = CLIPModel.from_pretrained(base / "clip")
    vt = new.model.vision_tower
    for k, v in clip.vision_model.state_dict().items():  # frozen: still the base CLIP's vision tower
        torch.testing.assert_close((vt.vision_model if hasattr(vt, "vision_model") else vt).state_dict()[k], v)
    lm_new, lm_old = new.model.language_model.state_dict(), old.model.language_model.state_dict()
    assert any(not torch.equal(lm_new[k], lm_old[k]) for k in lm_old)  # the LLM was (re)trained


def test_only_mllm_arch_gives_the_tower_its_own_clip_at_the_new_grid(run, monkeypatch):
    """--arch vision_patch=8: LLaVA's tower is a new CLIP's (trained first, at 8-px patches: 16 image tokens),
    the MLLM reads 16 image tokens, and base/clip — the editing side's image encoder — is copied unchanged."""
    from transformers import LlavaForConditionalGeneration

    script, base, _ = run
    monkeypatch.setenv("MINEDIT_CACHE", str(base.parent / "cache"))
    out = base.parent / "mllm-arch"
    metrics = script.main(["--only", "mllm", "--base", str(base), "--out", str(out), "--n", "45", "--steps-clip", "2",
                           "--batch-clip", "8", "--steps-mllm", "2", "--batch-mllm", "4", "--freeze-vision",
                           "--arch", "vision_patch=8", "--arch", "llm_layers=1"])
    m = metrics["mllm"]
    assert m["arch"] == ["vision_patch=8", "llm_layers=1"] and m["tower_clip"]["steps"] == 2
    new = LlavaForConditionalGeneration.from_pretrained(out / "mllm")
    assert new.config.vision_config.patch_size == 8 and new.config.text_config.num_hidden_layers == 1
    assert new.config.image_seq_length == (32 // 8) ** 2
    assert (out / "clip/model.safetensors").read_bytes() == (base / "clip/model.safetensors").read_bytes()
    old_tower = CLIPModel.from_pretrained(base / "clip").vision_model.embeddings.patch_embedding.weight
    new_tower = new.model.vision_tower.embeddings.patch_embedding.weight
    assert old_tower.shape[-1] == 4 and new_tower.shape[-1] == 8  # not the base CLIP's tower
    with pytest.raises(UserError, match="add --arch llm_max_positions=512"):  # 256 image tokens + the prompt
        script.main(["--only", "mllm", "--base", str(base), "--out", str(base.parent / "x"), "--n", "45",
                     "--steps-clip", "1", "--batch-clip", "8", "--arch", "vision_patch=2"])


def test_only_clip_retrains_clip_and_the_prior_that_reads_it_and_keeps_the_rest(run, monkeypatch):
    """--only clip --clip-place-negatives: out/clip and out/sd/text_encoder are the new CLIP's (one text tower),
    a new prior in sd/unet; the VAE and the MLLM are the base's byte for byte, the base folder is untouched, and
    the metrics say what the CLIP was trained with and how it tells shapes and places apart."""
    script, base, _ = run
    before = {f: f.read_bytes() for f in base.rglob("*.safetensors")}
    monkeypatch.setenv("MINEDIT_CACHE", str(base.parent / "cache"))
    out = base.parent / "clip-places"
    metrics = script.main(["--only", "clip", "--base", str(base), "--out", str(out), "--n", "45", "--steps-clip", "2",
                           "--batch-clip", "8", "--steps-unet", "1", "--unet-world-n", "40", "--clip-place-negatives"])
    assert {f: f.read_bytes() for f in base.rglob("*.safetensors")} == before
    same = lambda rel: (out / rel).read_bytes() == (base / rel).read_bytes()  # noqa: E731
    assert same("sd/vae/diffusion_pytorch_model.safetensors") and same("mllm/model.safetensors")
    assert not same("clip/model.safetensors") and not same("sd/unet/diffusion_pytorch_model.safetensors")
    clip, text = CLIPModel.from_pretrained(out / "clip"), CLIPTextModel.from_pretrained(out / "sd/text_encoder")
    tower = clip.text_model.state_dict()
    assert len(text.state_dict()) == len(tower)
    for k, v in text.state_dict().items():
        torch.testing.assert_close(tower[k.removeprefix("text_model.")], v)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["clip"]["negatives"] == ["place"] and saved["clip"]["steps"] == 2 and saved["unet"]["steps"] == 1
    for kind in ("place", "shape"):  # None where no eval caption of this tiny world names a place / a shape
        prefers = saved["clip"][f"eval_true_over_{kind}_swapped"]
        assert prefers is None or 0 <= prefers <= 1
    assert saved["mllm"] == metrics["mllm"] == json.loads((base / "metrics.json").read_text())["mllm"]


@pytest.mark.parametrize("args, says", [
    (["--only", "mllm", "--out", "x"], "--only mllm needs --base"),
    (["--only", "mllm", "--base", "nowhere", "--out", "x"], "no clip/config.json"),
    (["--only", "clip", "--out", "x"], "--only clip needs --base"),
    (["--only", "clip", "--base", str(SHIPPED), "--out", str(SHIPPED)], "is --base: write the new clip to another"),
    (["--base", "assets/toy/base", "--out", "x"], "--base is read only with --only"),
    (["--mllm-refer-share", "0.5", "--out", "x"], "must be in [0, 0.4]"),
    (["--continue-mllm", "--out", "x"], "use it with --only mllm"),
    (["--only", "mllm", "--base", "assets/toy/base", "--continue-mllm", "--arch", "llm_layers=2", "--out", "x"],
     "without --arch"),
    (["--arch", "vision_patch=2", "--out", "x"], "add --only mllm --base DIR"),
    (["--only", "mllm", "--base", "assets/toy/base", "--arch", "unet_channels=8,8,8", "--out", "x"],
     "only the MLLM's fields"),
])
def test_only_mllm_bad_flags_are_one_line_errors(args, says, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and says in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x").exists()


def test_continue_mllm_trains_the_base_mllm_on_and_counts_its_steps(run, monkeypatch):
    """--continue-mllm starts from --base's mllm/ itself: zero more steps give back its weights and its held-out
    answers exactly; a piece of 2 steps changes them and records the steps before it, piece after piece."""
    script, base, _ = run
    monkeypatch.setenv("MINEDIT_CACHE", str(base.parent / "cache"))
    args = ["--only", "mllm", "--n", "45", "--batch-mllm", "4", "--continue-mllm"]
    same = script.main([*args, "--base", str(base), "--out", str(base.parent / "c0"), "--steps-mllm", "0"])

    def weights(folder):
        return load_file(folder / "mllm" / "model.safetensors")
    old, new = weights(base), weights(base.parent / "c0")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    was = json.loads((base / "metrics.json").read_text())["mllm"]
    assert json.dumps(same["mllm"]["eval_exact_match"]) == json.dumps(was["eval_exact_match"])  # NaN: no row
    for k in ("eval_loss_caption", "eval_loss_instruction"):
        assert same["mllm"][k] == pytest.approx(was[k], rel=1e-6), k
    assert same["mllm"]["steps_before"] == 3
    once = script.main([*args, "--base", str(base.parent / "c0"), "--out", str(base.parent / "c1"),
                        "--steps-mllm", "2"])
    again = script.main([*args, "--base", str(base.parent / "c1"), "--out", str(base.parent / "c2"),
                         "--steps-mllm", "2"])
    assert once["mllm"]["steps_before"] == 3 and again["mllm"]["steps_before"] == 5
    assert again["mllm"]["continued_from"] == str(base.parent / "c1")
    moved = weights(base.parent / "c1")
    assert any(not torch.equal(old[k], moved[k]) for k in old)


def test_only_mllm_refuses_to_overwrite_its_base(run):
    script, base, _ = run
    with pytest.raises(UserError, match="is --base"):
        script.main(["--only", "mllm", "--base", str(base), "--out", str(base)])


def test_readme_regeneration_keeps_the_comprehension_study(run, tmp_path):
    script, _, metrics = run
    (tmp_path / "README.md").write_text("# old\nstale table\n\n## Comprehension study\n\n| lever | s/u/r |\n")
    script.write_readme(tmp_path, "python scripts/pretrain_toy_bases.py --out x", metrics)
    text = (tmp_path / "README.md").read_text()
    assert "stale table" not in text and "--out x" in text
    assert text.endswith("## Comprehension study\n\n| lever | s/u/r |\n") and text.count("## Comprehension study") == 1
    script.write_readme(tmp_path, "again", metrics)  # idempotent: the section is not appended twice
    assert (tmp_path / "README.md").read_text().count("## Comprehension study") == 1


def test_referring_task_names_the_shape_each_phrase_picks_out(run):
    """--mllm-refer-share's examples: "find the leftmost shape." is answered by the shape with the smallest x,
    and a scene whose shapes no relation tells apart gives none."""
    from minedit.toy.tokenizer import toy_tokenizer

    mllm = load_mllm_script()
    tok = toy_tokenizer(256, chat=True)
    objs = [{"shape": "square", "colour": "red", "size": "small", "x": 5, "y": 16},
            {"shape": "circle", "colour": "blue", "size": "small", "x": 26, "y": 16}]
    ex = mllm.refer_examples(tok, 4, [{"source": "a.png", "objects": objs}], {"a.png": 0}, 4.8)
    qa = {tok.decode(p[-8:]): tok.decode(a, skip_special_tokens=True) for _, p, a in ex}
    left = [a for q, a in qa.items() if "leftmost shape" in q]
    right = [a for q, a in qa.items() if "rightmost shape" in q]
    assert left == ["the red square"] and right == ["the blue circle"]
    assert mllm.refer_examples(tok, 4, [{"source": "b.png", "objects": objs[:1]}], {"b.png": 0}, 4.8) == []


def test_wider_text_to_image_prior_trains_and_the_editing_stage_loads_it(run, tmp_path, monkeypatch):
    """pretrain_toy_unet.py --arch: a prior of other UNet widths is written, and an editing config with the same
    field loads it (widened 4 -> 8 channels); a field outside the UNet is a one-line error before anything is
    written."""
    monkeypatch.setenv("MINEDIT_CACHE", str(tmp_path / "cache"))
    t2i = load_script(SCRIPT.parent / "pretrain_toy_unet.py")
    _, base, _ = run
    wide = ["--arch", "unet_channels=64,128,128"]
    metrics = t2i.main(["--base", str(base), "--out", str(tmp_path / "wide"), "--n", "40", "--steps", "2",
                        "--eval-n", "4", "--curve-every", "1", "--curve-n", "2", *wide])
    assert metrics["arch"] == ["unet_channels=64,128,128"]
    assert [c["step"] for c in metrics["curve"]] == [1, 2] and metrics["shapes_real"]["right"] == 1.0
    # --eval-only scores the prior as saved, in a folder of its own, and gives the final figures again
    again = t2i.main(["--base", str(tmp_path / "wide"), "--out", str(tmp_path / "wide-eval"), "--n", "40",
                      "--eval-n", "4", "--eval-only"])
    assert again["shapes_generated"] == metrics["shapes_generated"]
    assert again["clip_top1_in_32_generated"] == metrics["clip_top1_in_32_generated"]
    assert (tmp_path / "wide-eval" / "t2i-eval.json").is_file() and not (tmp_path / "wide-eval" / "sd").exists()
    with pytest.raises(UserError, match="--eval-only writes"):
        t2i.main(["--base", str(tmp_path / "wide"), "--eval-only"])
    # --continue trains the saved UNet further (lr 0: it comes back unchanged, where a fresh one would not)
    more = t2i.main(["--base", str(tmp_path / "wide"), "--out", str(tmp_path / "more"), "--n", "40", "--steps", "1",
                     "--eval-n", "4", "--lr", "0", "--continue"])
    assert more["steps_total"] == 3 and more["shapes_generated"] == metrics["shapes_generated"]
    saved = [load_file(tmp_path / d / "sd" / "unet" / "diffusion_pytorch_model.safetensors") for d in ("wide", "more")]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    # the shipped bases record their prior's steps in metrics.json["unet"]; a piece from them counts those too
    from_base = t2i.main(["--base", str(base), "--out", str(tmp_path / "b1"), "--n", "40", "--steps", "1",
                          "--eval-n", "4", "--continue"])
    assert from_base["steps_total"] == json.loads((base / "metrics.json").read_text())["unet"]["steps"] + 1
    with pytest.raises(UserError, match="--eval-only trains nothing, so --steps would be ignored"):
        t2i.main(["--base", str(base), "--out", str(tmp_path / "no"), "--eval-only", "--steps", "5"])
    with pytest.raises(UserError, match="--continue keeps the saved UNet's architecture"):
        t2i.main(["--base", str(tmp_path / "wide"), "--out", str(tmp_path / "no"), "--continue", *wide])
    sd = tmp_path / "wide" / "sd"
    unet = build.build_unet(apply_overrides(preset("ip2p", "toy"), [f"--sd_path={sd}", wide[1]]).validate())
    assert tuple(unet.config.block_out_channels) == (64, 128, 128) and unet.config.in_channels == 8
    with pytest.raises(UserError, match="--arch lr=1: only the UNet's fields"):
        t2i.main(["--base", str(base), "--out", str(tmp_path / "no"), "--arch", "lr=1"])
    assert not (tmp_path / "no").exists()
    with pytest.raises(UserError, match="--arch without --out"):
        t2i.main(["--base", str(base), *wide])


def test_min_snr_weighting_of_the_prior_changes_its_training_and_is_recorded(run, tmp_path, monkeypatch):
    """pretrain_toy_unet.py --snr-gamma: the same seed and steps with the loss Min-SNR-weighted give other weights
    than plain MSE, and the metrics say which loss trained the prior; a negative γ is a one-line error."""
    monkeypatch.setenv("MINEDIT_CACHE", str(tmp_path / "cache"))
    t2i = load_script(SCRIPT.parent / "pretrain_toy_unet.py")
    _, base, _ = run
    common = ["--base", str(base), "--n", "40", "--steps", "2", "--eval-n", "4"]
    plain = t2i.main([*common, "--out", str(tmp_path / "plain")])
    snr = t2i.main([*common, "--out", str(tmp_path / "snr"), "--snr-gamma", "5"])
    assert (plain["snr_gamma"], snr["snr_gamma"]) == (0.0, 5.0)
    saved = [load_file(tmp_path / d / "sd" / "unet" / "diffusion_pytorch_model.safetensors") for d in ("plain", "snr")]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    with pytest.raises(UserError, match="--snr-gamma -1.0: γ must be > 0"):
        t2i.main([*common, "--out", str(tmp_path / "no"), "--snr-gamma", "-1"])
    assert not (tmp_path / "no").exists()


def test_place_captions_name_every_place_or_none_and_change_the_prior(run, tmp_path, monkeypatch):
    """pretrain_toy_unet.py --place-captions: the train pairs are captioned again from their own scenes — at 1
    every object's place named, at 0 none, each caption naming exactly its image's objects — the prior trained on
    them differs from the world's captions' and records the share; a share outside [0, 1] is a one-line error."""
    from minedit.toy.draw import where

    monkeypatch.setenv("MINEDIT_CACHE", str(tmp_path / "cache"))
    t2i = load_script(SCRIPT.parent / "pretrain_toy_unet.py")
    cfg = t2i.unet_config([])
    root, caps, _ = t2i.held_out(cfg, 0, 40, 4)
    scenes = {}
    for r in t2i.read_jsonl(root / "train.jsonl"):
        scenes[r["source"]], scenes[r["target"]] = r["objects"], r["target_objects"]
    for share in (1.0, 0.0):
        again = t2i.recaption(root, caps, share, seed=0, size=cfg.resolution)
        assert [c["image"] for c in again] == [c["image"] for c in caps]
        for c in again:
            for o in scenes[c["image"]]:
                assert f"{o['colour']} {o['shape']}" in c["caption"]
                assert (f"{o['colour']} {o['shape']} {where(o, 32)}" in c["caption"]) is (share == 1.0), c
    _, base, _ = run
    common = ["--base", str(base), "--n", "40", "--steps", "2", "--eval-n", "4"]
    world = t2i.main([*common, "--out", str(tmp_path / "world")])
    placed = t2i.main([*common, "--out", str(tmp_path / "placed"), "--place-captions", "1"])
    assert (world["place_share"], placed["place_share"]) == (None, 1.0)
    assert "places_generated" in placed and placed["places_real"]["right"] == (placed["places_real"]["objects"] > 0)
    saved = [load_file(tmp_path / d / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
             for d in ("world", "placed")]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    with pytest.raises(UserError, match="--place-captions 2.0: a share"):
        t2i.main([*common, "--out", str(tmp_path / "no"), "--place-captions", "2"])


def test_coords_prior_feeds_the_pixel_grid_beside_the_latent_and_refuses_to_replace_a_base(run, tmp_path):
    """pretrain_toy_unet.py --coords: the UNet reads z ⊕ (x, y) with x and y running -1 → 1 along width and height,
    looks like a 4-channel UNet to sampling, and is only ever written to a folder of its own, fresh."""
    t2i = load_script(SCRIPT.parent / "pretrain_toy_unet.py")
    wrapped = t2i.build_t2i_unet(t2i.unet_config([]), coords=True)
    seen = {}
    wrapped.unet.forward = lambda x, t, encoder_hidden_states: seen.setdefault("x", x)
    z = torch.randn(2, 4, 3, 5)
    wrapped(z, torch.tensor([1, 2]), encoder_hidden_states=None)
    x = seen["x"]
    assert wrapped.config.in_channels == 4 and x.shape == (2, 6, 3, 5) and torch.equal(x[:, :4], z)
    assert torch.allclose(x[0, 4, 1], torch.linspace(-1, 1, 5))     # x along the width
    assert torch.allclose(x[1, 5, :, 2], torch.linspace(-1, 1, 3))  # y along the height
    _, base, _ = run
    for extra in ([], ["--out", str(tmp_path / "c"), "--continue"]):
        with pytest.raises(UserError, match="--coords trains a fresh UNet"):
            t2i.main(["--base", str(base), "--steps", "1", "--coords", *extra])


def test_a_prior_killed_mid_training_leaves_no_record_of_its_own(run, tmp_path, monkeypatch):
    """pretrain_toy_unet.py --out copies the base before training; the base prior's record (t2i.json, its grid) is
    not copied, and a stale one in --out is removed, so a run that dies mid-training leaves a folder that does not
    look finished."""
    monkeypatch.setenv("MINEDIT_CACHE", str(tmp_path / "cache"))
    t2i = load_script(SCRIPT.parent / "pretrain_toy_unet.py")
    _, base, _ = run
    trained = tmp_path / "trained"
    t2i.main(["--base", str(base), "--out", str(trained), "--n", "40", "--steps", "1", "--eval-n", "4"])
    assert (trained / "t2i.json").is_file() and (trained / "t2i-grid.png").is_file()
    out = tmp_path / "out"
    out.mkdir()
    (out / "t2i.json").write_text("{}")  # a stale record from an earlier run into the same folder

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(t2i, "pretrain_unet", killed)
    with pytest.raises(KeyboardInterrupt):
        t2i.main(["--base", str(trained), "--out", str(out), "--n", "40", "--steps", "1", "--continue"])
    assert (out / "sd" / "unet").is_dir() and (out / "clip").is_dir()
    assert not any((out / name).exists() for name in ("t2i.json", "t2i-grid.png", "t2i-eval.json"))


def test_word_swapped_negatives_change_one_listed_word_each():
    script = load_clip_script()
    shapes = {10: torch.tensor([11, 12]), 11: torch.tensor([10, 12]), 12: torch.tensor([10, 11])}
    ids = torch.tensor([[1, 10, 5, 12, 2], [1, 5, 6, 7, 2], [1, 11, 11, 5, 2]])
    neg, changed = script.word_swapped(ids, shapes, torch.Generator().manual_seed(0))
    assert changed.tolist() == [True, False, True]
    diff = neg != ids
    assert diff.sum(1).tolist() == [1, 0, 1]  # one word swapped, none where there is no listed word
    for old, new in zip(ids[diff].tolist(), neg[diff].tolist()):
        assert new in shapes[old].tolist()  # one of that word's own swaps


def test_place_negatives_name_the_opposite_side_and_shape_negatives_another_shape():
    """swap_table on the real toy tokenizer: a place word becomes its opposite side (a place the world names),
    a shape word any other shape; words of neither kind are never touched."""
    script = load_clip_script()
    tok = load_script().text_tokenizer(preset("insightedit", "toy"))
    caption = "a red star at the top left and a blue circle in the middle"
    ids = tok([caption], return_tensors="pt").input_ids
    seen = set()
    for seed in range(40):
        neg, changed = script.word_swapped(ids, script.swap_table(tok, ("place",)), torch.Generator().manual_seed(seed))
        assert changed.all()
        seen.add(tok.decode(neg[0], skip_special_tokens=True))
    assert seen == {"a red star at the bottom left and a blue circle in the middle",
                    "a red star at the top right and a blue circle in the middle"}
    both = script.swap_table(tok, ("shape", "place"))
    shape_ids = set(tok.convert_tokens_to_ids(["circle", "square", "triangle", "diamond", "star"]))
    assert shape_ids < set(both) and all(set(both[i].tolist()) == shape_ids - {i} for i in shape_ids)
    assert script.swap_table(tok, ()) == {}


def test_hard_negatives_only_add_competitors_to_the_image_side_of_clips_loss():
    """With no listed word to swap the loss is CLIPModel's own; with swaps every image has more captions to beat,
    so its loss can only grow."""
    script = load_clip_script()
    cfg = preset("insightedit", "toy")
    torch.manual_seed(0)
    clip = script.build_clip(cfg).eval()
    pixels, mask = torch.randn(4, 3, 32, 32), torch.ones(4, 6, dtype=torch.long)
    ids = torch.randint(20, 60, (4, 6))
    plain = script.clip_loss(clip, ids, mask, pixels)
    absent = {7: torch.tensor([8]), 8: torch.tensor([7])}  # no caption holds these ids
    torch.testing.assert_close(script.clip_loss(clip, ids, mask, pixels, absent, torch.Generator()), plain)
    present = {int(i): torch.tensor([61]) for i in torch.unique(ids[:, 2])}
    assert len(present) > 1 and script.clip_loss(clip, ids, mask, pixels, present, torch.Generator()) > plain


def test_wrong_rewrites_are_sorted_by_what_the_named_shape_got_wrong():
    quality = load_quality()
    objs = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]
    row = lambda target, cat="understanding", kind="remove", instruction="remove the left shape": {  # noqa: E731
        "optimized_instruction": target, "category": cat, "kind": kind, "objects": objs, "instruction": instruction}
    rows = [row("remove the red circle"), row("remove the red circle"), row("remove the red circle"),
            row("remove the red circle"), row("replace the red circle with a blue square", "reasoning", "replace"),
            row("remove the red circle", "simple"), row("add a red star at the top", kind="add"),
            row("remove the red circle"),
            row("replace the red circle with a blue square", kind="replace", instruction="make the left one a square")]
    answers = ["remove the blue star", "remove the red square", "remove the green circle",
               "remove the small red circle on the left", "replace the red circle with a blue star",
               "remove the red circle", "add a blue star at the top", "make it so",
               "replace the red square with a blue square"]
    hits = [False, False, False, False, False, True, False, False, False]
    assert quality.why_wrong(rows, answers, hits) == {
        "simple": {}, "reasoning": {"right shape and colour, rest wrong": 1},
        "understanding": {"another shape of the scene": 1, "colour right, shape not in the scene": 1,
                          "shape right, colour not in the scene": 1, "right shape and colour, rest wrong": 1,
                          "other": 1, "colour right, shape copied from the instruction": 1}}
