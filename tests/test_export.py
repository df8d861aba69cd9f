"""minedit.export: each export loaded by the ecosystem's own loader (diffusers, peft, transformers) in a fresh
process, against what minedit computes with the same weights; and its refusals."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from minedit import checkpoint
from minedit.model import EditModel, load_model
from minedit.parts.lora import lora_parameters
from minedit.presets import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MLLM = os.path.join(ROOT, "assets", "toy", "base", "mllm")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def export(run_dir, fmt, out):
    return run("-m", "minedit.export", run_dir, "--format", fmt, "--out", out)


@pytest.fixture(scope="module")
def ip2p_run(tmp_path_factory):
    """An ip2p toy run whose UNet is not the fresh one: random image channels, a perturbed UNet."""
    run_dir = tmp_path_factory.mktemp("ip2p")
    torch.manual_seed(0)
    cfg = preset("ip2p", "toy")
    model = EditModel(cfg)
    with torch.no_grad():
        model.unet.conv_in.weight.normal_(0, 0.05)
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save_checkpoint(str(run_dir), 3, cfg, model.checkpoint_state(2))
    return run_dir


@pytest.fixture(scope="module")
def mllm_run(tmp_path_factory):
    """A SmartEdit-shaped toy run on the shipped toy LLaVA (loaded by path, as a real base is), with LoRA
    and [MM] rows that are not their initial values."""
    run_dir = tmp_path_factory.mktemp("insightedit")
    torch.manual_seed(0)
    cfg = preset("insightedit", "toy", 2)
    cfg.mllm_path = TOY_MLLM
    model = EditModel(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model.mllm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for w in (model.mllm.get_input_embeddings().weight, model.mllm.get_output_embeddings().weight):
            w[model.mm_ids] = torch.randn(len(model.mm_ids), w.shape[1], generator=g)
    checkpoint.save_checkpoint(str(run_dir), 5, cfg, model.checkpoint_state(2))
    return run_dir


def mllm_inputs(model):
    """A prompt with the image run and the r [MM] tokens, and an image: what minedit feeds its MLLM."""
    from minedit.comprehend import mllm_inputs as inputs

    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return inputs(model, img, ["remove the red circle"])


@pytest.mark.slow
def test_diffusers_export_matches_minedit_and_infer(ip2p_run, tmp_path):
    from PIL import Image

    from minedit.sampler import edit

    out = tmp_path / "pipe"
    r = export(ip2p_run, "diffusers", out)
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "model_index.json"))["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    img.save(tmp_path / "in.png")
    script = textwrap.dedent(f"""
        import torch, numpy as np
        from PIL import Image
        from diffusers import StableDiffusionInstructPix2PixPipeline
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained({str(out)!r})
        pipe.set_progress_bar_config(disable=True)
        out = pipe("remove the red circle", image=Image.open({str(tmp_path / 'in.png')!r}), num_inference_steps=6,
                   guidance_scale=3.0, image_guidance_scale=1.5, generator=torch.Generator().manual_seed(4),
                   output_type="pt").images
        np.save({str(tmp_path / 'theirs.npy')!r}, out.numpy())
        print(type(pipe.scheduler).__name__)
    """)
    r = run("-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("DDIMScheduler")  # the run's sampler, as infer.py uses it
    theirs = torch.from_numpy(np.load(tmp_path / "theirs.npy"))  # 1×3×H×W in [0, 1]
    model = load_model(str(ip2p_run))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    ours = (edit(model, x, ["remove the red circle"], steps=6, text_guidance=3.0, image_guidance=1.5, seed=4) + 1) / 2
    diff = (ours - theirs).abs().max().item()
    print(f"max |minedit - diffusers from the export| = {diff:.2e}")
    assert diff < 1e-4
    # infer.py with the same seed and settings: the same image up to its 8-bit PNG rounding
    r = run("infer.py", "--ckpt", ip2p_run, "--image", tmp_path / "in.png", "--instruction", "remove the red circle",
            "--out", tmp_path / "infer.png", "--steps", 6, "--seed", 4, "--text-guidance", 3, "--image-guidance", 1.5)
    assert r.returncode == 0, r.stderr
    png = np.asarray(Image.open(tmp_path / "infer.png"), dtype=np.float32) / 255
    assert np.abs(png - theirs[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_peft_export_loads_onto_the_base_with_identical_outputs(mllm_run, tmp_path):
    out = tmp_path / "adapter"
    r = export(mllm_run, "peft", out)
    assert r.returncode == 0, r.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    model = load_model(str(mllm_run))
    ids, mask, pixels = mllm_inputs(model)
    torch.save({"ids": ids, "mask": mask, "pixels": pixels}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        proc = AutoProcessor.from_pretrained({str(out)!r})
        base = LlavaForConditionalGeneration.from_pretrained({TOY_MLLM!r})
        base.resize_token_embeddings(len(proc.tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
        x = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = model(input_ids=x["ids"], attention_mask=x["mask"], pixel_values=x["pixels"]).logits
        torch.save(logits, {str(tmp_path / 'theirs.pt')!r})
        print(proc.tokenizer.convert_tokens_to_ids("[MM0]"))
    """)
    r = run("-c", script)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == model.mm_ids[0]
    with torch.no_grad():
        ours = model.mllm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    diff = (ours - theirs).abs().max().item()
    print(f"max |minedit MLLM - peft on the base| = {diff:.2e}")
    assert diff < 1e-5
    # the adapter carries something: the resized base alone gives other logits, most at the [MM] rows
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(TOY_MLLM).eval()
    base.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (plain[..., :-len(model.mm_ids)] - ours[..., :-len(model.mm_ids)]).abs().max() > 1e-3


@pytest.mark.slow
def test_llava_export_is_the_merged_mllm(mllm_run, tmp_path):
    out = tmp_path / "llava"
    r = export(mllm_run, "llava", out)
    assert r.returncode == 0, r.stderr
    model = load_model(str(mllm_run))
    ids, mask, pixels = mllm_inputs(model)
    torch.save({"ids": ids, "mask": mask, "pixels": pixels}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from safetensors import safe_open
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        proc = AutoProcessor.from_pretrained({str(out)!r})
        model = LlavaForConditionalGeneration.from_pretrained({str(out)!r}).eval()
        x = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = model(input_ids=x["ids"], attention_mask=x["mask"], pixel_values=x["pixels"]).logits
        torch.save(logits, {str(tmp_path / 'theirs.pt')!r})
        with safe_open({str(out / 'model.safetensors')!r}, "pt") as f:
            print(sum("lora" in k for k in f.keys()), len(proc.tokenizer))
    """)
    r = run("-c", script)
    assert r.returncode == 0, r.stderr
    n_lora, vocab = map(int, r.stdout.split()[-2:])
    assert n_lora == 0 and vocab == len(model.tokenizer)
    with torch.no_grad():
        ours = model.mllm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    diff = (ours - torch.load(tmp_path / "theirs.pt", weights_only=True)).abs().max().item()
    print(f"max |minedit MLLM - merged LLaVA| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.slow
def test_refusals_are_one_error_line(ip2p_run, mllm_run, tmp_path, capsys):
    from minedit.errors import run_cli
    from minedit.export import main

    r = export(mllm_run, "diffusers", tmp_path / "out")  # the real command once, in its own process
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--format peft or --format llava" in r.stderr
    cases = [
        ((ip2p_run, "peft"), "has no MLLM"),
        ((ip2p_run, "onnx"), "choose one of diffusers, peft, llava"),
        ((tmp_path / "nope", "llava"), "does not exist"),
        ((ip2p_run, "diffusers", "--dtype", "int8"), "choose one of fp32, bf16, fp16"),
    ]
    for (run_dir, fmt, *more), says in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(main, [str(run_dir), "--format", fmt, "--out", str(tmp_path / "out"), *more])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        run_cli(main, [str(ip2p_run), "--format", "diffusers", "--out", str(tmp_path / "full")])
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_peft_needs_a_loadable_base(tmp_path):
    """A toy run whose LLaVA was built from the config has no base to put an adapter on: refused, not faked."""
    from minedit.errors import UserError
    from minedit.export import check_format

    with pytest.raises(UserError, match="--format llava"):
        check_format(preset("smartedit", "toy"), "peft")
    check_format(preset("smartedit", "toy"), "llava")  # the merged folder needs no base


def test_peft_adapter_layout_without_mm_tokens_and_missing_peft(monkeypatch):
    """MIND-Edit has LoRA but no [MM] rows: only lora_A/B, in peft's key layout, rank and alpha as trained; and
    without the peft package the export says how to install it."""
    import importlib.util

    from minedit.errors import UserError
    from minedit.export import check_format, peft_adapter
    from minedit.parts.lora import lora_state_dict

    torch.manual_seed(0)
    model = EditModel(preset("mindedit", "toy"))
    kwargs, tensors = peft_adapter(model)
    assert "trainable_token_indices" not in kwargs
    assert (kwargs["r"], kwargs["lora_alpha"]) == (model.cfg.lora_rank, model.cfg.lora_alpha)
    ours = lora_state_dict(model.mllm)
    assert set(tensors) == {f"base_model.model.{k}.weight" for k in ours}
    assert len(kwargs["target_modules"]) == len(ours) // 2
    cfg = preset("mindedit", "toy")
    cfg.mllm_path = TOY_MLLM
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UserError, match="pip install peft"):
        check_format(cfg, "peft")
