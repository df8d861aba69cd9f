"""The composed model: stage splits (DESIGN §4), one optimisation step per recipe × stage, dry-run tables,
checkpoint round trips, and loading real-format models by local path (saved tiny models, no network)."""
import re

import pytest
import torch

import train
from minedit.comprehend import comprehend
from minedit.model import STAGE_TRAINABLE, EditModel
from minedit.presets import preset

COMBOS = [(r, s) for (r, s) in STAGE_TRAINABLE]


def toy_batch(cfg, stage, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(b, 3, cfg.resolution, cfg.resolution, generator=g) * 2 - 1  # noqa: E731
    if stage == 1 and not cfg.uses_vision_head:  # MIND-Edit's stage 1 trains on edits with T_opt
        return {"image": img(), "caption": ["a red circle", "two blue squares on the left"][:b]}
    return {"source": img(), "target": img(), "instruction": ["remove the red circle", "make it green"][:b],
            "optimized_instruction": ["remove the red circle", "turn the red circle green"][:b]}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(recipe):
        if recipe not in cache:
            torch.manual_seed(0)
            cache[recipe] = EditModel(preset(recipe, "toy"))
        return cache[recipe]
    return get


@pytest.mark.parametrize("recipe,stage", COMBOS)
def test_stage_trainable_set_is_exactly_design(models, recipe, stage):
    model = models(recipe)
    table = model.set_stage(stage)
    trainable = {part for part, (_, on) in table.items() if on}
    assert trainable == STAGE_TRAINABLE[(recipe, stage)]
    for name, p in model.named_parameters():
        assert p.requires_grad == (model.part_of(name) in STAGE_TRAINABLE[(recipe, stage)]), name


@pytest.mark.parametrize("recipe,stage", COMBOS)
def test_one_step_changes_only_the_stage_parameters(models, recipe, stage):
    model = models(recipe)
    model.set_stage(stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss, parts = model(toy_batch(model.cfg, stage), stage)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    expected = {"text", "embed"} if (recipe, stage) == ("mindedit", 1) else \
        {1: {"llm", "qformer"}, 2: {"diff"}, 3: {"diff", "iaa"}}[stage]
    assert expected <= set(parts)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        part = model.part_of(n)
        if part == "mm_rows":  # only the r new rows may move
            r = model.cfg.num_mm_tokens
            assert torch.equal(before[n][:-r], p.detach()[:-r]), n
            continue
        if part not in STAGE_TRAINABLE[(recipe, stage)]:
            assert not changed, f"{n} ({part}) changed in {recipe} stage {stage}"
    trained = {model.part_of(n) for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    # Zero-initialised LoRA-B and BIM outputs still move after one step (their gradients are non-zero).
    assert trained == STAGE_TRAINABLE[(recipe, stage)]


def test_fresh_bim_and_lora_change_nothing():
    """A freshly built insightedit model gives the plain UNet's output: BIM and LoRA are exact no-ops."""
    torch.manual_seed(0)
    model = EditModel(preset("insightedit", "toy"))
    cfg = model.cfg
    x = torch.randn(2, 4, 16, 16)
    src = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    batch = toy_batch(cfg, 2)
    with torch.no_grad():
        c, _ = model.conditions(batch["source"], batch["instruction"], (16, 16), image_branch=False)
        q = model.qformer(comprehend(model, batch["source"], batch["instruction"]).h.float())
        assert torch.equal(c.f_txt, q) and not c.v_txt.abs().any()
        with_bim = model.unet_forward(x, src, t, c.f_txt, c.v_txt)
        plain = model.unet(torch.cat([x, src], 1), t, encoder_hidden_states=q).sample
    assert torch.equal(with_bim, plain)


@pytest.mark.parametrize("recipe", ["insightedit", "smartedit", "ip2p", "mindedit"])
@pytest.mark.parametrize("name", ["toy", "full"])
def test_dry_run_every_stage(recipe, name, capsys):
    for stage in preset(recipe, name).stages:
        assert train.main(["--recipe", recipe, "--preset", name, "--stage", str(stage), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "total trainable" in out and "total frozen" in out
        rows = {m[0]: m[2] for m in re.findall(r"^(\S+)\s+(\d+)\s+(trainable|frozen)$", out, re.M)}
        assert {p for p, s in rows.items() if s == "trainable"} == STAGE_TRAINABLE[(recipe, stage)]


def test_full_dry_run_lora_line_matches_arithmetic(capsys):
    train.main(["--recipe", "insightedit", "--preset", "full", "--stage", "2", "--dry-run"])
    out = capsys.readouterr().out
    lora = int(re.search(r"^lora\s+(\d+)\s+trainable$", out, re.M).group(1))
    # LLaVA-1.5-7B: 32 layers × {q_proj, v_proj} (4096 -> 4096) × rank 16 × (in + out)
    assert lora == 32 * 2 * 16 * (4096 + 4096) == 8_388_608
    mllm = int(re.search(r"^mllm\s+(\d+)\s+frozen$", out, re.M).group(1))
    assert mllm == 7_063_427_072  # LLaVA-1.5-7B's published parameter count
    unet = int(re.search(r"^unet\s+(\d+)\s+trainable$", out, re.M).group(1))
    assert unet == 859_520_964 + 4 * 320 * 9  # SD1.5 UNet + the 4 zeroed input channels of the 8-channel conv_in


def test_full_shapes_on_meta():
    cfg = preset("insightedit", "full", 3)
    model = EditModel(cfg, meta=True)
    h = torch.empty(2, cfg.num_mm_tokens, cfg.llm_hidden, device="meta")
    q = model.qformer(h)
    assert q.shape == (2, 77, 768)
    v = torch.empty(2, 576, 1024, device="meta")
    f_txt, v_txt = model.bim(q, v, (32, 32))
    assert f_txt.shape == (2, 77, 768) and v_txt.shape == (2, 320, 32, 32)
    e, f_img = model.iaa(h)
    assert e.shape == (2, 768) and f_img.shape == (2, 4, 768)
    assert model.unet.conv_in.weight.shape[1] == 8


def test_checkpoint_state_round_trip(models, tmp_path):
    from minedit import checkpoint

    model = models("smartedit")
    model.set_stage(2)
    with torch.no_grad():
        for p in model.bim.parameters():
            p.add_(0.01)
    sd = model.checkpoint_state(2)
    assert "mm_tokens.embed" in sd and any(".lora_A" in k for k in sd)
    checkpoint.save_checkpoint(str(tmp_path), 5, model.cfg, sd)
    torch.manual_seed(123)  # a different random init: everything must come from the checkpoint
    fresh = EditModel(model.cfg)
    fresh.load_checkpoint_state(checkpoint.load_weights(checkpoint.find_checkpoint(str(tmp_path))))
    b = toy_batch(model.cfg, 2)
    b.update(u=torch.ones(2), noise=torch.randn(2, 4, 16, 16), vae_eps=torch.randn(2, 4, 16, 16),
             t=torch.tensor([3, 700]))
    with torch.no_grad():
        assert torch.equal(model(b, 2)[0], fresh(b, 2)[0])


def test_checkpoint_from_another_recipe_is_refused(models):
    from minedit.errors import UserError

    sd = models("smartedit").checkpoint_state(2)
    with pytest.raises(UserError, match="another recipe or config"):
        models("ip2p").load_checkpoint_state(sd)


def test_plain_smartedit_feeds_the_qformer_straight_to_the_unet(models):
    """--bim=false is SmartEdit Table 2's "plain" model: no BIM weights, no conv_in residual, f_txt = Q-Former(h);
    its checkpoints do not load into a BIM config, and recipes without a BIM refuse the flag."""
    from minedit import checkpoint
    from minedit.config import ConfigError
    from minedit.errors import UserError

    torch.manual_seed(0)
    cfg = preset("smartedit", "toy")
    cfg.bim = False
    model = EditModel(cfg.validate())
    assert not any(model.part_of(n) == "bim" for n, _ in model.named_parameters())
    table = model.set_stage(2)
    assert {part for part, (_, on) in table.items() if on} == STAGE_TRAINABLE[("smartedit", 2)] - {"bim"}
    batch = toy_batch(cfg, 2)
    with torch.no_grad():
        c, _ = model.conditions(batch["source"], batch["instruction"], (16, 16), image_branch=False)
        h = comprehend(model, batch["source"], batch["instruction"]).h
        assert c.v_txt is None and torch.equal(c.f_txt, model.qformer(h.float()))
    loss, parts = model(batch, 2)
    loss.backward()
    assert set(parts) == {"llm", "diff"}
    assert next(model.qformer.parameters()).grad.abs().sum() > 0  # the diffusion loss reaches the Q-Former
    with pytest.raises(UserError, match="bim"):
        checkpoint.check_compatible(cfg, preset("smartedit", "toy"))
    with pytest.raises(UserError, match="another recipe or config"):  # BIM weights have nowhere to go
        model.load_checkpoint_state(models("smartedit").checkpoint_state(2))
    for recipe in ("ip2p", "mindedit"):
        other = preset(recipe, "toy")
        other.bim = False
        with pytest.raises(ConfigError, match="no BIM to drop"):
            other.validate()


@pytest.mark.parametrize("recipe,stage", [c for c in COMBOS if STAGE_TRAINABLE[c] & {"lora", "mm_rows", "unet"}])
def test_gradient_checkpointing_is_on_where_backprop_runs_and_changes_no_gradient(recipe, stage):
    """`--grad_checkpointing` checkpoints the LLM whenever gradients cross its layers (LoRA, or the [MM]
    embedding rows of stage 1) and the UNet when it trains; the gradients are the plain ones."""
    grads = []
    for ckpt in (False, True):
        cfg = preset(recipe, "toy")
        cfg.grad_checkpointing = ckpt
        torch.manual_seed(0)
        model = EditModel(cfg.validate())
        model.set_stage(stage)
        model.train()
        trainable = STAGE_TRAINABLE[(recipe, stage)]
        if ckpt and cfg.uses_mllm:
            assert model.mllm.is_gradient_checkpointing == bool(trainable & {"lora", "mm_rows"})
        if ckpt and "unet" in trainable:
            assert model.unet.is_gradient_checkpointing
        torch.manual_seed(1)
        loss, _ = model(toy_batch(cfg, stage), stage)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_train_text_encoder_trains_saves_and_keeps_the_null_text_fresh():
    """--train_text_encoder (an ablation lever): CLIP's text tower joins the editing stage's trainable set, is
    changed by a step, is saved even when loaded by path, and the guidance null text follows its new weights."""
    import dataclasses

    from minedit.config import ConfigError
    from minedit.presets import apply_overrides
    from minedit.stages import saved_parts

    cfg = apply_overrides(preset("ip2p", "toy"), ["--train_text_encoder=true"]).validate()
    torch.manual_seed(0)
    model = EditModel(cfg)
    table = model.set_stage(2)
    assert {p for p, (_, on) in table.items() if on} == {"unet", "text_encoder"}
    null_before = model.null_text().detach().clone()
    enc_before = [p.detach().clone() for p in model.text_encoder.parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    model(toy_batch(cfg, 2), 2)[0].backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, model.text_encoder.parameters()))
    with torch.no_grad():
        assert not torch.allclose(model.null_text(), null_before)
        assert torch.equal(model.null_text(), model.encode_text([""]))
    by_path = dataclasses.replace(cfg, sd_path="some/folder")  # a loaded text encoder is saved only when trained
    assert "text_encoder" in saved_parts(by_path, 2, {"unet", "text_encoder", "vae"})
    assert "text_encoder" not in saved_parts(dataclasses.replace(by_path, train_text_encoder=False), 2,
                                             {"unet", "text_encoder", "vae"})
    with pytest.raises(ConfigError, match="train_text_encoder"):
        apply_overrides(preset("insightedit", "toy"), ["--train_text_encoder=true"]).validate()


def test_explicit_alignment_is_its_weight_times_the_mse_to_clip_text_of_the_rows_that_have_one(models):
    """--qformer_explicit_weight (an ablation): stage 2 adds w · MSE(q', CLIP_text(optimized_instruction)) over
    the rows with an explicit instruction, computed here independently from the Q-Former and the text encoder;
    off by default, and 0 with a gradient when no row has one."""
    import dataclasses

    model = models("insightedit")
    model.set_stage(2)
    model.eval()  # no LoRA dropout: the reference below must see the same forward
    batch = toy_batch(model.cfg, 2)
    batch["optimized_instruction"] = ["remove the red circle", ""]  # the second row has none
    default = model.cfg  # the toy InsightEdit preset has the term on (weight 1); the papers' stage 2 has it off
    papers = dataclasses.replace(default, qformer_explicit_weight=0.0, qformer_teacher_forcing=0.0)
    try:
        model.cfg = papers
        assert "explicit" not in model(batch, 2)[1]
        model.cfg = dataclasses.replace(papers, qformer_explicit_weight=2.5)
        _, parts = model(batch, 2)
        with torch.no_grad():
            q = model.qformer(comprehend(model, batch["source"], batch["instruction"]).h.float())
            goal = model.encode_text(["remove the red circle"])
        assert torch.allclose(parts["explicit"], 2.5 * ((q[0] - goal[0]) ** 2).mean(), rtol=1e-5)
        batch["optimized_instruction"] = ["", ""]
        loss, parts = model(batch, 2)
        assert parts["explicit"] == 0
        loss.backward()  # the empty term keeps the graph whole
    finally:
        model.cfg = default
        model.zero_grad(set_to_none=True)
        model.train()


def test_teacher_forcing_feeds_bim_clip_text_of_the_explicit_instruction_for_the_drawn_rows_only(models):
    """--qformer_teacher_forcing=1: a row with an optimized_instruction conditions the UNet on
    BIM(CLIP_text(that instruction)) — built here from the parts — and a row without one on BIM(q') as before;
    at 0 (the papers' stage 2; the toy InsightEdit preset has 1) no row is forced."""
    import dataclasses

    from minedit.recipes import BridgePath

    model = models("insightedit")
    model.set_stage(2)
    model.eval()
    batch = toy_batch(model.cfg, 2)
    batch["optimized_instruction"] = ["remove the red circle", ""]
    default = model.cfg
    hw = (model.cfg.resolution // model.cfg.latent_factor,) * 2
    path = BridgePath()
    try:
        model.cfg = dataclasses.replace(default, qformer_teacher_forcing=0.0)
        with torch.no_grad():
            free = path.edit_conditions(model, batch, batch["source"], batch["target"], hw, 2)[0].f_txt
            r = comprehend(model, batch["source"], batch["instruction"])
            goal = model.encode_text(["remove the red circle"]).float()
            forced_row = model.bim(goal, r.v[:1].float(), hw)[0]
            model.cfg = dataclasses.replace(default, qformer_explicit_weight=1.0, qformer_teacher_forcing=1.0)
            f_txt = path.edit_conditions(model, batch, batch["source"], batch["target"], hw, 2)[0].f_txt
        assert torch.allclose(f_txt[0], forced_row[0], atol=1e-5)
        assert torch.allclose(f_txt[1], free[1], atol=1e-5)
        assert not torch.allclose(free[0], forced_row[0], atol=1e-3)  # forcing changed what the UNet reads
        # --qformer_teacher_forcing_steps=5: forced at steps 0-4, the Q-Former's own output from step 5 on
        model.cfg = dataclasses.replace(model.cfg, qformer_teacher_forcing_steps=5)
        for step, want in ((4, forced_row[0]), (5, free[0])):
            with torch.no_grad():
                got = path.edit_conditions(model, {**batch, "step": step}, batch["source"], batch["target"], hw,
                                           2)[0].f_txt
            assert torch.allclose(got[0], want, atol=1e-5), step
        with pytest.raises(ValueError, match="step"):  # a loop that does not pass the step is caught
            path.edit_conditions(model, batch, batch["source"], batch["target"], hw, 2)
    finally:
        model.cfg = default
        model.train()


def test_t2i_share_trains_the_drawn_rows_on_the_prior_task_and_no_others(models):
    """--t2i_share (prior preservation, an ablation): a drawn row with a target caption is the text-to-image task —
    the loss equals the one built by hand from CLIP_text(caption) and a zero source latent; a row without a caption,
    or one not drawn, is the edit as before; at 0 nothing changes."""
    import dataclasses

    from minedit.conditions import Conditions

    model = models("ip2p")
    model.set_stage(2)
    model.eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    side = cfg.resolution // cfg.latent_factor
    batch = {**toy_batch(cfg, 2), "target_caption": ["a red circle on a blue background", ""],
             "noise": torch.randn(2, 4, side, side, generator=g), "vae_eps": torch.randn(2, 4, side, side, generator=g),
             "t": torch.tensor([300, 700]), "u": torch.tensor([0.9, 0.9])}  # u above every guidance dropout
    default = cfg
    try:
        with torch.no_grad():
            edit = model(batch, 2)[0]
            z_src, z_tar = model.encode_latents(batch["source"], batch["target"], batch["vae_eps"])
            f = model.encode_text(batch["instruction"])
            f_cap = model.encode_text(batch["target_caption"][:1])
            by_hand = lambda f_txt, z: model.denoising_loss(Conditions(f_txt), z, z_tar, batch["noise"],  # noqa
                                                            batch["t"])
            assert torch.allclose(edit, by_hand(f, z_src), atol=1e-6)
            model.cfg = dataclasses.replace(default, t2i_share=0.5)
            prior = torch.cat([torch.zeros_like(z_src[:1]), z_src[1:]])
            for u_t2i, want in (([0.2, 0.2], by_hand(torch.cat([f_cap, f[1:]]), prior)), ([0.7, 0.2], edit)):
                got = model({**batch, "u_t2i": torch.tensor(u_t2i)}, 2)[0]
                assert torch.allclose(got, want, atol=1e-6), u_t2i
            assert not torch.allclose(by_hand(torch.cat([f_cap, f[1:]]), prior), edit, atol=1e-4)
    finally:
        model.cfg = default
        model.train()


def test_as_text_to_image_empties_the_source_side_of_the_drawn_rows_only():
    """The BIM residual and the image tokens of a drawn row are emptied (v_txt 0, f_img its null), the rest kept."""
    from minedit.conditions import Conditions, as_text_to_image

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cond = Conditions(r(3, 5, 8), r(3, 4, 6, 6), r(3, 2, 8), r(3, 2, 8))
    z_src, f_cap, pick = r(3, 4, 6, 6), r(3, 5, 8), torch.tensor([True, False, True])
    out, z = as_text_to_image(cond, z_src, pick, f_cap)
    for i, drawn in enumerate(pick.tolist()):
        assert torch.equal(out.f_txt[i], f_cap[i] if drawn else cond.f_txt[i])
        assert torch.equal(out.v_txt[i], torch.zeros(4, 6, 6) if drawn else cond.v_txt[i])
        assert torch.equal(out.f_img[i], cond.null_img[i] if drawn else cond.f_img[i])
        assert torch.equal(z[i], torch.zeros(4, 6, 6) if drawn else z_src[i])


def test_use_exact_text_feeds_bim_clip_text_of_each_instruction():
    """The --exact-text diagnostic (evaluate.py, grounding_probe.py): the conditions become BIM(CLIP_text(text)),
    built here from the parts — what --qformer_teacher_forcing trains the UNet on — and no longer the Q-Former's
    reading of the text; a recipe without a Q-Former is refused."""
    from minedit.errors import UserError
    from minedit.recipes import use_exact_text

    torch.manual_seed(0)
    model = EditModel(preset("insightedit", "toy", 2)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    texts = ["remove the red circle", "remove the blue square"]
    hw = (32 // model.cfg.latent_factor,) * 2
    with torch.no_grad():
        free = model.conditions(images, texts, hw, False)[0].f_txt
        use_exact_text(model)
        exact = model.conditions(images, texts, hw, False)[0].f_txt
        want = model.bim(model.encode_text(texts).float(), comprehend(model, images, texts).v.float(), hw)[0]
    assert torch.allclose(exact, want, atol=1e-5) and not torch.allclose(exact, free, atol=1e-3)
    with pytest.raises(UserError, match="ip2p has no Q-Former"):
        use_exact_text(EditModel(preset("ip2p", "toy", 2)))
