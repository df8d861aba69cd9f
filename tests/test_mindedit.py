"""The `mindedit` recipe (MIND-Edit): stage splits and dry-run tables, the two heads' losses against independent
references, v_insight from the greedy generation = v_insight of the training forward, batch-safe decoding, the
IP-Adapter weight format through diffusers' own loader, train.py stage 1 -> 2 -> infer.py end to end, losses
going down on a fixed batch, and each ablation switch removing exactly what it claims."""
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import infer
import train
from conftest import import_script, ok, run_script, tiny_unet
from minedit import build, mind
from minedit import data as data_module
from minedit import training
from minedit.errors import run_cli
from minedit.parts.decoupled_attention import decoupled_processors, install_decoupled_attention
from minedit.presets import preset
from minedit.parts.ip_adapter import (image_projection, ip_adapter_state_dict, load_ip_adapter,
                                load_ip_adapter_state_dict, save_ip_adapter)
from minedit.model import STAGE_TRAINABLE, EditModel
from minedit.sampler import edit
from minedit.toy.world import generate

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--batch-size", "4", "--sample-every", "0", "--log_every=1"]
INSTR = ["remove the red circle", "make the small blue square on the left green"]
TOPT = ["remove the red circle", "turn the small blue square green"]


def batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(b, 3, cfg.resolution, cfg.resolution, generator=g) * 2 - 1  # noqa: E731
    return {"source": img(), "target": img(), "instruction": INSTR[:b], "optimized_instruction": TOPT[:b]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EditModel(preset("mindedit", "toy"))
    with torch.no_grad():  # LoRA-B starts at zero: give it weight so LoRA takes part in what is tested
        for n, p in m.mllm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return m.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("mindworld")
    generate(out, n=48, seed=2, size=32)
    rows = (out / "train.jsonl").read_text().splitlines()[:4]
    (out / "batch-train.jsonl").write_text("\n".join(rows) + "\n")
    stripped = [json.dumps({k: v for k, v in json.loads(r).items() if k != "optimized_instruction"}) for r in rows]
    (out / "no-topt.jsonl").write_text("\n".join(stripped) + "\n")
    return out


@pytest.fixture
def in_process(monkeypatch):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------------
# Stage splits, dry run
@pytest.mark.parametrize("stage,prompt", [(1, "predicted"), (2, "predicted"), (2, "target")])
def test_one_step_changes_exactly_the_stage_parts(stage, prompt):
    cfg = preset("mindedit", "toy")
    cfg.mind_image_prompt = prompt  # stage 2's image prompt: either one trains the same parts
    torch.manual_seed(0)
    m = EditModel(cfg)
    table = m.set_stage(stage)
    assert {p for p, (_, on) in table.items() if on} == STAGE_TRAINABLE[("mindedit", stage)]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    loss, parts = m(batch(m.cfg), stage)
    assert set(parts) == ({"text", "embed"} if stage == 1 else {"diff"}) and loss.dtype == torch.float32
    loss.backward()
    opt.step()
    moved = {m.part_of(n) for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved == STAGE_TRAINABLE[("mindedit", stage)]


@pytest.mark.parametrize("losses,parts,frozen_head", [("text", {"text"}, True), ("embed", {"embed"}, False)])
def test_text_only_and_embed_only(losses, parts, frozen_head):
    cfg = preset("mindedit", "toy")
    cfg.mind_losses = losses
    torch.manual_seed(0)
    m = EditModel(cfg)
    table = m.set_stage(1)
    assert table["vision_head"][1] is not frozen_head and table["lora"][1]
    loss, got = m(batch(cfg), 1)
    assert set(got) == parts and torch.equal(loss, sum(got.values()))


def test_flags_map_to_the_config_field():
    for flag, value in (("--text-only", "text"), ("--embed-only", "embed")):
        args, overrides = train.parse_args(["--recipe", "mindedit", flag])
        assert train.resolve_config(args, overrides).mind_losses == value
    args, overrides = train.parse_args(["--recipe", "mindedit", "--mind_losses=embed"])
    assert train.resolve_config(args, overrides).mind_losses == "embed"
    with pytest.raises(SystemExit):
        train.parse_args(["--text-only", "--embed-only"])


def test_full_dry_run_tables(capsys):
    for stage in (1, 2):
        assert train.main(["--recipe", "mindedit", "--preset", "full", "--stage", str(stage), "--dry-run"]) == 0
        out = capsys.readouterr().out
        rows = {m[0]: (int(m[1]), m[2]) for m in re.findall(r"^(\S+)\s+(\d+)\s+(trainable|frozen)$", out, re.M)}
        assert {p for p, (_, s) in rows.items() if s == "trainable"} == STAGE_TRAINABLE[("mindedit", stage)]
    # LLaVA-OneVision-7B (Qwen2-7B): 28 layers × rank 16 × (q: 3584->3584, v: 3584->512 with 4 KV heads)
    assert rows["lora"][0] == 28 * 16 * ((3584 + 3584) + (3584 + 512)) == 5_046_272
    assert rows["image_proj"][0] == 768 * 4 * 768 + 4 * 768 + 2 * 768  # = the public ip-adapter_sd15 image_proj
    assert rows["unet.ip"][0] == 2 * 768 * (320 * 5 + 640 * 5 + 1280 * 6)  # to_k_ip/to_v_ip of SD1.5's 16 attn2
    m = EditModel(preset("mindedit", "full"), meta=True)
    assert type(m.mllm).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert m.mllm.config.text_config.num_hidden_layers == 28 and m.cfg.vision_head_layer == 21


# ---------------------------------------------------------------------------------------------------------------
# The heads
def test_text_loss_equals_hf_loss_and_embed_loss_is_cosine(model):
    b = batch(model.cfg)
    with torch.no_grad():
        loss, parts = model(b, 1)
        x = mind.mind_inputs(model, b["source"], b["instruction"], b["optimized_instruction"])
        ref = model.mllm(input_ids=x.input_ids, attention_mask=x.attention_mask, labels=x.labels, **x.vision).loss
        torch.testing.assert_close(parts["text"], ref.float(), rtol=1e-5, atol=1e-6)
        out = model.mllm(input_ids=x.input_ids, attention_mask=x.attention_mask, output_hidden_states=True,
                         **x.vision)
        h_m = out.hidden_states[model.cfg.vision_head_layer]
        v = model.vision_head(h_m, x.prompt_mask)
        target = model.image_encoder(pixel_values=build.clip_pixels(b["target"], 32)).image_embeds
        cos = (v * target).sum(-1) / (v.norm(dim=-1) * target.norm(dim=-1))
        torch.testing.assert_close(parts["embed"], 2.0 * (1 - cos).mean(), rtol=1e-5, atol=1e-6)
    # The answer ids are exactly T_opt ⊕ eos, after the prompt the toy base was pretrained on.
    tok = model.tokenizer
    row = x.input_ids[1][x.attention_mask[1].bool()].tolist()
    answer = tok(TOPT[1], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert row[-len(answer):] == answer
    script = import_script(ROOT / "scripts" / "pretrain_toy_mllm.py")
    assert row[:-len(answer)] == script.prompt_ids(tok, model.n_image_tokens, INSTR[1])


def test_vision_head_sees_only_the_prompt(model):
    """v_insight does not depend on T_opt (causal attention) nor on padding: the greedy generation's prefill
    (left-padded, no answer) gives the training forward's (right-padded, answer appended) v_insight."""
    b = batch(model.cfg)
    with torch.no_grad():
        _, v_train = mind.teacher_forward(model, b["source"], b["instruction"], b["optimized_instruction"])
        _, v_other = mind.teacher_forward(model, b["source"], b["instruction"], ["add a star", "x"])
        texts, v_gen = mind.generate(model, b["source"], b["instruction"])
    torch.testing.assert_close(v_other, v_train, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v_gen, v_train, rtol=1e-4, atol=1e-5)
    assert len(texts) == 2


def test_stage2_image_prompt_target_or_predicted(model):
    """`mind_image_prompt`: stage 2 feeds the UNet f_img of CLIP_image(I_tar) (teacher forcing) or of the stage-1
    vision head's v_insight — then exactly what inference's generation gives for the same source and instruction."""
    b = batch(model.cfg)
    assert model.cfg.mind_image_prompt == "predicted"  # the default
    try:
        with torch.no_grad():
            predicted = mind.teacher_conditions(model, b, b["source"], b["target"])
            _, v_gen = mind.generate(model, b["source"], b["instruction"])
            cond, _ = mind.conditions(model, b["source"], b["instruction"])
            model.cfg.mind_image_prompt = "target"
            teacher = mind.teacher_conditions(model, b, b["source"], b["target"])
    finally:
        model.cfg.mind_image_prompt = "predicted"
    torch.testing.assert_close(teacher.f_img, mind.image_tokens(model, model.encode_image_clip(b["target"])))
    torch.testing.assert_close(predicted.f_img, mind.image_tokens(model, v_gen), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predicted.f_img, cond.f_img, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(predicted.f_img, teacher.f_img, atol=1e-3)
    torch.testing.assert_close(predicted.f_txt, teacher.f_txt)  # the text side is the same ground-truth T_opt


def test_predicted_image_prompt_is_inference_s_even_in_train_mode(model):
    """The training loop puts the whole model in train mode: the predicted v_insight must still be inference's
    (no LoRA dropout), and the modules' modes must come back as they were."""
    b = batch(model.cfg)
    drops = [m for m in model.mllm.modules() if hasattr(m, "lora_dropout")]
    assert drops
    saved = [m.lora_dropout for m in drops]
    try:
        for m in drops:
            m.lora_dropout = torch.nn.Dropout(0.5)
        model.train()
        with torch.no_grad():
            v_train = mind.predicted_v_insight(model, b["source"], b["instruction"])
            assert model.mllm.training and model.vision_head.training
            dropped = mind.teacher_forward(model, b["source"], b["instruction"], None, need_text=False)[1]
        model.eval()
        _, v_gen = mind.generate(model, b["source"], b["instruction"])
    finally:
        for m, d in zip(drops, saved):
            m.lora_dropout = d
        model.eval()
    torch.testing.assert_close(v_train, v_gen, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dropped, v_gen, atol=1e-4)  # the dropout is live in train mode: the test can fail


@pytest.mark.parametrize("prompt", ["predicted", "target"])
def test_text_only_stage1_needs_the_target_image_prompt_in_stage2(prompt):
    text_only = preset("mindedit", "toy")
    text_only.mind_image_prompt, text_only.mind_losses = prompt, "text"
    text_only.stage = 1
    text_only.validate()  # stage 1 trains no image prompt
    text_only.stage = 2
    if prompt == "predicted":  # its vision head was never trained
        with pytest.raises(Exception, match="mind_image_prompt=target"):
            text_only.validate()
    else:
        text_only.validate()


def test_greedy_decoding_is_batch_safe_and_capped(model):
    b = batch(model.cfg)
    with torch.no_grad():
        both, v = mind.generate(model, b["source"], b["instruction"])
        alone = [mind.generate(model, b["source"][i:i + 1], b["instruction"][i:i + 1]) for i in range(2)]
    assert both == [a[0][0] for a in alone]
    torch.testing.assert_close(v, torch.cat([a[1] for a in alone]), rtol=1e-4, atol=1e-5)
    assert all(len(model.tokenizer(t, add_special_tokens=False).input_ids) <= model.cfg.topt_max_tokens
               for t in both)
    # Reference: argmax of a full forward over prompt ⊕ decoded-so-far, no cache, for the first 3 tokens.
    x = mind.mind_inputs(model, b["source"][:1], b["instruction"][:1])
    ids = x.input_ids
    with torch.no_grad():
        for _ in range(3):
            logits = model.mllm(input_ids=ids, attention_mask=torch.ones_like(ids), **x.vision).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    ref = model.tokenizer.decode(ids[0, x.input_ids.shape[1]:])
    assert both[0].split()[:3] == ref.split()[:3]


# ---------------------------------------------------------------------------------------------------------------
# IP-Adapter weight format
def test_ip_adapter_round_trips_through_diffusers_loader(tmp_path):
    ours = tiny_unet(seed=1)
    install_decoupled_attention(ours)
    torch.manual_seed(2)
    proj = image_projection(embed_dim=16, cross_dim=32, num_tokens=4)
    with torch.no_grad():  # make every weight distinct from its initialisation
        for p in list(proj.parameters()) + [q for n, q in ours.named_parameters() if "_ip." in n]:
            p.add_(torch.randn_like(p) * 0.1)
    path = save_ip_adapter(ours, proj, str(tmp_path / "ip.safetensors"))
    stock = tiny_unet(seed=1)
    sd = {"image_proj": {}, "ip_adapter": {}}
    for k, v in load_file(path).items():
        top, _, rest = k.partition(".")
        sd[top][rest] = v
    assert set(sd["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    n = len(decoupled_processors(ours))  # attn2 of down 1, mid, up 2 x 1 = 4 in diffusers' numbering 1, 3, 5, 7
    assert n == 4 and set(sd["ip_adapter"]) == {f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(n) for kv in "kv"}
    stock._load_ip_adapter_weights([sd])  # diffusers' own loader (what load_ip_adapter calls)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    text, embeds = torch.randn(2, 7, 32), torch.randn(2, 16)
    with torch.no_grad():
        theirs = stock(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        mine = ours(x, t, encoder_hidden_states=text, cross_attention_kwargs={"image_tokens": proj(embeds)}).sample
        plain = tiny_unet(seed=1)(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mine, plain, atol=1e-3)  # the image prompt does act
    # And back: a public-layout file loads into a fresh model of ours with the same result (.bin and dict).
    fresh = tiny_unet(seed=5)
    fresh.load_state_dict(tiny_unet(seed=1).state_dict())
    install_decoupled_attention(fresh)
    proj2 = image_projection(16, 32, 4)
    torch.save(ip_adapter_state_dict(ours, proj), tmp_path / "ip.bin")
    load_ip_adapter(fresh, proj2, str(tmp_path / "ip.bin"))
    with torch.no_grad():
        again = fresh(x, t, encoder_hidden_states=text, cross_attention_kwargs={"image_tokens": proj2(embeds)}).sample
    assert torch.equal(again, mine)
    with pytest.raises(ValueError, match="cross-attention"):
        load_ip_adapter_state_dict(fresh, proj2, {"image_proj": sd["image_proj"], "ip_adapter": {}})


# ---------------------------------------------------------------------------------------------------------------
# Ablation switches, in the sampler
def test_no_vinsight_equals_lambda_zero_and_ignores_the_vision_head(model, monkeypatch):
    cfg = model.cfg
    src = batch(cfg)["source"]
    kw = dict(steps=2, seed=3, text_guidance=2.0, image_guidance=1.5)
    full = edit(model, src, INSTR, **kw)
    dropped = edit(model, src, INSTR, ip_scale=0.0, **kw)
    # λ = 0 with the image tokens still passed through the decoupled attention: the same image, bit for bit.
    real = mind.conditions
    monkeypatch.setattr(mind, "conditions", lambda m, images, texts, image_branch, use_topt: real(m, images, texts,
                                                                                                 True, use_topt))
    zero_weight = edit(model, src, INSTR, ip_scale=0.0, **kw)
    monkeypatch.undo()
    assert torch.equal(dropped, zero_weight) and not torch.allclose(full, dropped, atol=1e-4)
    saved = {k: v.clone() for k, v in model.vision_head.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.vision_head.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(edit(model, src, INSTR, ip_scale=0.0, **kw), dropped)
        assert not torch.allclose(edit(model, src, INSTR, **kw), full, atol=1e-4)
    finally:
        model.vision_head.load_state_dict(saved)


def test_no_topt_conditions_on_the_raw_instruction(model, monkeypatch):
    src = batch(model.cfg)["source"]
    kw = dict(steps=2, seed=3, text_guidance=2.0, image_guidance=1.5)
    out, topt = edit(model, src, INSTR, return_texts=True, **kw)
    raw = edit(model, src, INSTR, use_topt=False, **kw)
    assert topt != INSTR and not torch.allclose(out, raw, atol=1e-4)
    real = mind.generate
    monkeypatch.setattr(mind, "generate", lambda m, images, texts: (list(texts), real(m, images, texts)[1]))
    assert torch.equal(edit(model, src, INSTR, **kw), raw)  # = T_opt replaced by the raw text, v_insight kept


# ---------------------------------------------------------------------------------------------------------------
# train.py stage 1 -> 2 -> infer.py
@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("mindchain")
    ok(run_script("train.py", "--recipe", "mindedit", "--stage", "1", "--data", str(world / "train.jsonl"), "--out",
           str(root / "s1"), "--max-steps", "2", *QUICK))
    ok(run_script("train.py", "--stage", "2", "--init", str(root / "s1"), "--data", str(world / "train.jsonl"), "--out",
           str(root / "s2"), "--max-steps", "2", *QUICK))
    return root


@pytest.mark.slow
def test_stage_hand_off_and_infer_end_to_end(chain, world, tmp_path):
    from minedit import checkpoint as ckpt

    logs = {s: [json.loads(r) for r in (chain / s / "log.jsonl").read_text().splitlines()] for s in ("s1", "s2")}
    assert all(set(r) - {"step", "lr", "skipped", "samples_s", "loss"} == {"text", "embed"} for r in logs["s1"])
    assert all(set(r) - {"step", "lr", "skipped", "samples_s", "loss"} == {"diff"} for r in logs["s2"])
    w1, w2 = (ckpt.load_weights(ckpt.find_checkpoint(str(chain / s))) for s in ("s1", "s2"))
    carried = [k for k in w1 if "lora_" in k or k.startswith("vision_head.")]
    assert carried and all(torch.equal(w1[k], w2[k]) for k in carried)  # stage 1's parts, bit for bit
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("unet."))
    row = json.loads((world / "train.jsonl").read_text().splitlines()[0])
    source = world / row["source"]
    out = tmp_path / "edited.png"
    p = ok(run_script("infer.py", "--ckpt", str(chain / "s2"), "--image", str(source), "--instruction",
                      row["instruction"], "--out", str(out), "--steps", "2"))
    topt = (tmp_path / "edited.txt").read_text().strip()
    assert f"optimized instruction: {topt}" in p.stdout
    assert Image.open(out).size == Image.open(source).size


@pytest.mark.slow
def test_infer_ablation_flags(chain, world, tmp_path, in_process):
    row = json.loads((world / "train.jsonl").read_text().splitlines()[0])
    base = ["--ckpt", str(chain / "s2"), "--image", str(world / row["source"]), "--instruction",
            row["instruction"], "--steps", "2"]
    outs = {}
    for name, extra in (("full", []), ("nov", ["--no-vinsight"]), ("zero", ["--ip-scale", "0"]),
                        ("not", ["--no-topt"])):
        assert infer.main([*base, "--out", str(tmp_path / f"{name}.png"), *extra]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(outs["nov"], outs["zero"])
    assert not np.array_equal(outs["nov"], outs["full"])
    assert (tmp_path / "not.txt").read_text() == (tmp_path / "full.txt").read_text()  # T_opt still reported
    # evaluate.py takes the same flags (the README's Table 2 rows) and records the settings it sampled with.
    import evaluate

    manifest = str(world / "batch-train.jsonl")
    for name, extra, ip, topt in (("ev-not", ["--no-topt"], 1.0, False), ("ev-nov", ["--no-vinsight"], 0.0, True)):
        out = tmp_path / f"{name}.json"
        assert evaluate.main(["--ckpt", str(chain / "s2"), "--data", manifest, "--out", str(out), "--limit", "2",
                              "--steps", "2", *extra]) == 0
        settings = json.loads(out.read_text())["settings"]
        assert (settings["ip_scale"], settings["use_topt"]) == (ip, topt)


def test_stage1_manifest_without_optimized_instruction_is_refused(world, tmp_path, in_process, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, ["--recipe", "mindedit", "--stage", "1", "--data", str(world / "no-topt.jsonl"),
                             "--out", str(tmp_path / "x"), "--max-steps", "1", *QUICK])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "optimized_instruction" in err and "line 1" in err


def test_insightedit_stage2_warns_about_rows_without_optimized_instruction(world, tmp_path, in_process, capsys):
    # The same rows that MIND-Edit's stage 1 refuses train InsightEdit's stage 2, whose toy preset turns on explicit
    # alignment and teacher forcing: it trains, and says those rows go without both (the count names them).
    s1 = str(tmp_path / "s1")
    assert train.main(["--recipe", "insightedit", "--stage", "1", "--data", str(world / "captions.jsonl"),
                       "--out", s1, "--max-steps", "1", *QUICK]) == 0
    for name, expected in (("no-topt", 'warning: 4 of 4 rows have no "optimized_instruction"'), ("batch-train", "")):
        capsys.readouterr()
        assert train.main(["--stage", "2", "--init", s1, "--data", str(world / f"{name}.jsonl"), "--out",
                           str(tmp_path / name), "--max-steps", "1", *QUICK]) == 0
        err = capsys.readouterr().err
        assert expected in err if expected else "optimized_instruction" not in err


@pytest.mark.slow
def test_fifty_steps_lower_the_losses_on_a_fixed_batch(world, tmp_path, in_process, monkeypatch):
    draw_generator = training.draw_generator
    monkeypatch.setattr(training, "draw_generator", lambda seed, draw: draw_generator(seed, 0))
    monkeypatch.setattr(data_module.EditDataset, "_flip", lambda self, index, epoch, texts: False)
    manifest = str(world / "batch-train.jsonl")
    assert train.main(["--recipe", "mindedit", "--stage", "1", "--data", manifest, "--out", str(tmp_path / "s1"),
                       "--max-steps", "50", "--save-every", "1000", "--lr", "1e-2", *QUICK]) == 0
    assert train.main(["--stage", "2", "--init", str(tmp_path / "s1"), "--data", manifest, "--out",
                       str(tmp_path / "s2"), "--max-steps", "50", "--save-every", "1000", "--lr", "3e-4",
                       *QUICK]) == 0
    # A random toy MLLM with rank-8 LoRA on q/v only: the text loss falls more slowly than the others.
    for stage, part, factor in (("s1", "text", 0.9), ("s1", "embed", 0.5), ("s2", "diff", 0.5)):
        log = [json.loads(r) for r in (tmp_path / stage / "log.jsonl").read_text().splitlines()]
        assert len(log) == 50
        assert log[-1][part] < factor * log[0][part], (stage, part, log[0][part], log[-1][part])
