"""minedit.datagen's model stages on tiny random models of the real architectures (Grounding DINO, SAM, an SD
inpainting pipeline, the toy MLLM), built from configs and loaded back by folder as a user's would be: the
plumbing, shapes, thresholds and the manifest. Random weights give random boxes and masks, so the tests check
invariants (bounds, areas, the background kept outside the mask), not what is found."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minedit.data import read_manifest
from minedit.datagen.edits import Editor, Inpainter
from minedit.datagen.manifest import Output, Tally
from minedit.datagen.masks import Detector, Segmenter, mask_objects
from minedit.datagen.mllm import MLLM
from minedit.datagen.run import Pipeline, list_images, run

from conftest import ok, run_script

ROOT = Path(__file__).resolve().parents[1]
SD = ROOT / "assets" / "toy" / "base" / "sd"
TOY_MLLM = str(ROOT / "assets" / "toy" / "base" / "mllm")


def save_grounding_dino(path):
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2,
                          out_features=["stage1", "stage2"])
    text = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    # d_model 32: the model's GroupNorm(32, d_model); 2 decoder layers: the box heads tie layer 0 to the others
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                              decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                              encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, num_feature_levels=2,
                              max_text_len=32, encoder_n_points=2, decoder_n_points=2)
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "blue", "circle", "square", "cup", "dog"]
    Path(path, "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(Path(path, "vocab.txt")))
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 48})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)


def save_sam(path):
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    torch.manual_seed(0)
    # num_pos_feats = prompt hidden / 2: the positional embedding is shared by the image and the prompts
    vision = SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                             image_size=64, patch_size=8, mlp_dim=32, global_attn_indexes=[0], window_size=4,
                             num_pos_feats=4)
    prompt = SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                                   iou_head_hidden_dim=16)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
             ).save_pretrained(path)
    ip = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=ip).save_pretrained(path)


def save_inpainter(path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    torch.manual_seed(0)
    # 9 input channels: noisy latent (4) + mask (1) + masked-image latent (4), as SD inpainting models have
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(SD, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(SD, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(SD, subfolder="tokenizer"), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    save_grounding_dino(str(root / "gd"))
    save_sam(str(root / "sam"))
    save_inpainter(str(root / "inpaint"))
    return root


def scene(w=40, h=30):
    im = Image.new("RGB", (w, h), (200, 200, 200))
    im.paste((220, 30, 30), (5, 5, 20, 20))
    return im


def test_detector_boxes_lie_in_the_image_and_threshold(models):
    image = scene()
    det = Detector(str(models / "gd"), box_threshold=0.0)
    score, box = det.best_box(image, "Red Square")
    assert 0 <= score <= 1 and len(box) == 4
    assert -1e-3 <= box[0] <= box[2] <= image.width + 1e-3 and -1e-3 <= box[1] <= box[3] <= image.height + 1e-3
    tally, objects = Tally(), [{"simple": "red square", "detailed": "x"}, {"simple": "blue cup", "detailed": "y"}]
    det.box_threshold = 1.0  # above any sigmoid score: every detection is low-confidence
    assert mask_objects(det, None, image, objects, 0.0, 1.0, 0, tally) == []
    assert tally.counts["masks"] == {"dropped: low-confidence detection": 2}


def test_segmenter_masks_at_image_size_and_area_thresholds(models):
    image, seg = scene(37, 29), Segmenter(str(models / "sam"))
    mask, iou = seg.mask(image, [4.0, 4.0, 21.0, 21.0])
    assert mask.shape == (29, 37) and mask.dtype == bool and np.isfinite(iou)
    det = Detector(str(models / "gd"), box_threshold=0.0)
    objects = [{"simple": n, "detailed": n} for n in ("red square", "blue cup", "dog")]
    for lo, hi in ((0.0, 1.0), (0.2, 0.5), (0.0, 0.01)):
        tally = Tally()
        kept = mask_objects(det, seg, image, objects, lo, hi, 1, tally)
        assert sum(tally.counts["masks"].values()) == len(objects)  # every object kept or dropped with a reason
        assert set(tally.counts["masks"]) <= {"kept", "dropped: empty mask", "dropped: mask too small",
                                              "dropped: mask too large"}
        for _, m, info in kept:
            assert m.shape == (29, 37) and set(info) == {"box_score", "iou"}


def test_inpainter_keeps_everything_outside_the_mask(models):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (29, 37, 3), dtype=np.uint8))
    mask = np.zeros((29, 37), bool)
    mask[5:20, 8:30] = True
    inp = Inpainter(str(models / "inpaint"), steps=2)
    out = inp.fill(image, mask, "red circle", None, seed=0)
    a, b = np.asarray(image), np.asarray(out)
    assert out.size == image.size and (a[~mask] == b[~mask]).all() and (a[mask] != b[mask]).any()
    assert (np.asarray(inp.fill(image, mask, "red circle", None, seed=0)) == b).all()  # seeded: reproducible
    inp.max_side = 16  # inpainted at 16x8, pasted back at 37x29: still only inside the mask
    small = np.asarray(inp.fill(image, mask, "red circle", None, seed=0))
    assert small.shape == a.shape and (a[~mask] == small[~mask]).all() and (small[mask] != b[mask]).any()

    class Proposer:
        def ask(self, text, image=None):
            return "A blue cup."

    editor = Editor(inp, Proposer())
    assert editor.propose(image, mask, {"simple": "red square", "detailed": "x"}) == "blue cup"
    assert editor.remove(image, mask, {"simple": "red square"}, 1).size == image.size


def test_real_stages_write_a_train_manifest(models, tmp_path):
    """Steps 1-4 with the toy MLLM (captions, rewrites) and fixed object JSON, the tiny detector, SAM and
    inpainter; the manifest is read back as train.py reads it."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    scene().save(tmp_path / "in" / "a.png")
    scene(32, 32).save(tmp_path / "in" / "sub" / "b.jpg")
    mllm = MLLM(TOY_MLLM, max_new_tokens=16)
    det, seg = Detector(str(models / "gd"), box_threshold=0.0), Segmenter(str(models / "sam"))
    editor = Editor(Inpainter(str(models / "inpaint"), steps=2), mllm)
    objects = [{"simple": "red square", "detailed": "a red square near the top left corner"}]

    def describe(image_id, image):
        return mllm.ask("describe the image", image), objects, "ok"

    def masker(image_id, image, objs, tally):
        return mask_objects(det, seg, image, objs, 0.0, 1.0, 1, tally)

    class Propose:  # the toy MLLM cannot name objects: a fixed proposal stands in
        def ask(self, text, image=None):
            return "blue circle"

    editor.mllm = Propose()
    out = Output(tmp_path / "out", {})
    inputs = list_images(tmp_path / "in")
    assert [i for i, _ in inputs] == ["a.png", "sub/b.jpg"]
    tally = run(Pipeline(describe, masker, lambda i: editor, mllm), inputs, out, progress=False)
    rows, bad = read_manifest(tmp_path / "out" / "manifest.jsonl")
    kept = tally.counts["masks"]["kept"]
    assert bad == [] and len(rows) == 3 * kept and tally.counts["inputs"]["kept"] == 2
    for r in rows:
        src, tgt = Image.open(r["source"]), Image.open(r["target"])
        assert src.size == tgt.size == Image.open(r["mask"]).size
        assert r["category"] in ("understanding", "reasoning") and r["detection"]["box_score"] >= 0
    captions = [json.loads(x) for x in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 2 and all(c["caption"] for c in captions)


@pytest.mark.slow
def test_cli_on_real_parts_counts_garbage_and_broken_images(models, tmp_path):
    """The command on tiny real models: the toy MLLM, asked for object JSON, answers words — counted, no crash;
    a broken file is a counted skip; a missing model folder is one error line."""
    (tmp_path / "in").mkdir()
    scene().save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    args = ["--images", tmp_path / "in", "--out", tmp_path / "out", "--mllm", TOY_MLLM, "--detector", models / "gd",
            "--segmenter", models / "sam", "--inpainter", models / "inpaint", "--steps", 2, "--no-progress",
            "--max-new-tokens", 24]
    p = ok(run_script("minedit.datagen", *args))
    assert "Traceback" not in p.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["tally"]
    assert summary["inputs"] == {"kept": 1, "dropped: unreadable image": 1}
    assert sum(summary["objects"].values()) == 1  # the toy MLLM's answer: parsed, repaired, or a counted drop
    args[args.index("--inpainter") + 1], args[args.index("--out") + 1] = tmp_path / "nowhere", tmp_path / "o2"
    bad = run_script("minedit.datagen", *args)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "--inpainter" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_text_llm_answers_text_and_refuses_images(tmp_path):
    """The separate object-extraction LLM (--llm): a tiny Llama with the toy tokenizer, loaded back by folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minedit.datagen.mllm import LLM
    from minedit.toy.tokenizer import toy_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=1, bos_token_id=2, eos_token_id=3)).save_pretrained(tmp_path)
    toy_tokenizer(128, chat=False).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_new_tokens=5)
    answer = llm.ask("list the red circle")
    assert isinstance(answer, str) and answer == llm.ask("list the red circle")  # greedy: deterministic
    with pytest.raises(ValueError, match="MLLM"):
        llm.ask("what is here", Image.new("RGB", (4, 4)))
