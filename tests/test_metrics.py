"""Edit metrics against independent references: scikit-image PSNR/SSIM, direct numpy, hand-made rows, HF CLIP."""
import math
import sys
import types

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from minedit.eval import metrics
from minedit.eval.metrics import aggregate, background, clip_scores, edit_scores, psnr, ssim


def _structured(h, w, rng):
    """Smooth gradients plus a bright rectangle: structure SSIM reacts to, unlike noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 0.5 * (xx + yy)], -1)
    img[h // 4: h // 2, w // 3: w - 2] = rng.uniform(0, 1, 3)
    return img


def _pairs():
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (64, 48), (7, 9)]:
        a = rng.uniform(0, 1, (h, w, 3))
        yield a, rng.uniform(0, 1, (h, w, 3))                     # unrelated noise
        yield a, np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)  # mild noise
        s = _structured(h, w, rng)
        yield s, np.clip(s * 0.8 + 0.1, 0, 1)                     # contrast change
        yield s, np.roll(s, 2, axis=1)                            # shift


@pytest.mark.parametrize("k", range(12))
def test_psnr_ssim_match_skimage(k):
    a, b = list(_pairs())[k]
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)
    ref = structural_similarity(a, b, channel_axis=-1, data_range=1.0)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-3)
    assert ssim(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(ref, abs=1e-3)


def test_psnr_identical_is_inf_and_ssim_one():
    a = np.random.default_rng(1).uniform(0, 1, (16, 16, 3))
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)


def test_masked_psnr_and_ssim_region():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 1, (20, 24, 3)), rng.uniform(0, 1, (20, 24, 3))
    region = rng.uniform(size=(20, 24)) < 0.3
    mse = np.mean((a[region] - b[region]) ** 2)
    assert psnr(a, b, region) == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-9)
    assert psnr(a, b, region, data_range=255.0) == pytest.approx(10 * np.log10(255.0 ** 2 / mse), abs=1e-9)
    # region SSIM: the mean of skimage's full SSIM map over the region's window centres (3 px border dropped)
    _, smap = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True)
    inner = np.zeros_like(region)
    inner[3:-3, 3:-3] = True
    assert ssim(a, b, region) == pytest.approx(smap[region & inner].mean(), abs=1e-6)
    assert math.isnan(psnr(a, b, np.zeros_like(region)))
    assert math.isnan(ssim(a, b, ~inner))  # no window centre left


def _scene():
    """A grey background with a red square (source) that the edit turns blue (target); mask = the square."""
    src = np.full((32, 32, 3), 0.5)
    src += np.random.default_rng(3).uniform(-0.1, 0.1, src.shape)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 10:22] = True
    src[mask] = (0.9, 0.1, 0.1)
    tgt = src.copy()
    tgt[mask] = (0.1, 0.1, 0.9)
    return src, tgt, mask


def test_edit_success():
    src, tgt, mask = _scene()
    perfect = edit_scores(tgt, tgt, src, mask)
    assert perfect["success"] and perfect["psnr_bg"] == math.inf and perfect["acc_in"] == 1.0
    assert perfect["mae_in"] == 0.0 and perfect["ssim_bg"] == pytest.approx(1.0)

    no_edit = edit_scores(src, tgt, src, mask)
    assert not no_edit["success"] and no_edit["acc_in"] == 0.0 and no_edit["psnr_bg"] == math.inf
    assert no_edit["mae_in"] == pytest.approx(0.8 * 2 / 3)  # two channels off by 0.8

    ruined = tgt.copy()
    ruined[~mask] = 1.0 - ruined[~mask]  # correct edit, inverted background
    r = edit_scores(ruined, tgt, src, mask)
    assert not r["success"] and r["acc_in"] == 1.0 and r["psnr_bg"] < 25

    near = tgt + 0.1  # within tol everywhere, background PSNR = 20 dB < 25
    assert edit_scores(near, tgt, src, mask)["acc_in"] == 1.0
    assert not edit_scores(near, tgt, src, mask)["success"]
    assert edit_scores(near, tgt, src, mask, min_psnr_bg=19.0)["success"]

    partly = tgt.copy()
    partly[8:11, 10:22] = src[8:11, 10:22]  # 3 of 12 rows wrong; off the outline 2 of the 10 inner rows
    r = edit_scores(partly, tgt, src, mask)
    assert r["acc_in"] == pytest.approx(9 / 12) and r["acc_core"] == pytest.approx(8 / 10) and not r["success"]
    assert edit_scores(partly, tgt, src, mask, min_fraction=0.8)["success"]
    assert not edit_scores(partly, tgt, src, mask, min_fraction=0.8, count_outline=True)["success"]


def test_outline_is_both_sides_of_every_colour_boundary():
    """Against a loop over 4-neighbour pairs; a flat square on a flat ground gives two one-pixel rings."""
    rng = np.random.default_rng(0)
    img = rng.choice([0.0, 0.5, 1.0], size=(9, 11, 3))
    want = np.zeros((9, 11), bool)
    for y in range(9):
        for x in range(11):
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < 9 and 0 <= nx < 11 and np.abs(img[y, x] - img[ny, nx]).max() > 0.15:
                    want[y, x] = True
    assert np.array_equal(metrics.outline(img), want)
    flat = np.zeros((12, 12, 3))
    flat[3:8, 3:8] = 1.0
    ring = np.zeros((12, 12), bool)
    ring[2:9, 2:9] = True
    ring[4:7, 4:7] = False  # inside ring (the square's border) and outside ring (the ground next to it)
    ring[2, 2] = ring[2, 8] = ring[8, 2] = ring[8, 8] = False  # the outer corners touch the square diagonally only
    assert np.array_equal(metrics.outline(flat), ring)


def test_soft_boundaries_pass_and_a_wrong_inside_does_not():
    """The rule leaves the target's outline out: a right square whose border pixels are blends of the two colours
    (what a decoded edit draws) succeeds, the strict rule (count_outline) fails it, and a square whose inside is
    the wrong colour fails both."""
    src = np.full((32, 32, 3), 0.5)
    tgt = src.copy()
    tgt[10:20, 10:20] = (0.1, 0.1, 0.9)
    mask = np.zeros((32, 32), bool)
    mask[8:22, 8:22] = True  # the square dilated, as the toy world's masks are
    soft = tgt.copy()
    edge = metrics.outline(tgt)
    soft[edge] = 0.5 * (0.5 + np.array((0.1, 0.1, 0.9)))  # halfway between ground and square on both sides
    r = edit_scores(soft, tgt, src, mask)
    assert r["success"] and r["acc_core"] == 1.0 and r["acc_in"] < 0.9
    assert not edit_scores(soft, tgt, src, mask, count_outline=True)["success"]
    wrong = soft.copy()
    wrong[11:19, 11:19] = (0.9, 0.1, 0.1)
    assert not edit_scores(wrong, tgt, src, mask)["success"]


def test_edit_scores_without_mask():
    src, tgt, mask = _scene()
    s = edit_scores(tgt, tgt, src)  # edit region derived from source vs target
    assert s["success"] and s["psnr_in"] is None and s["mae_in"] is None
    assert not edit_scores(src, tgt, src)["success"]
    assert edit_scores(src, tgt, src)["psnr_bg"] == pytest.approx(psnr(src, tgt))
    assert background(mask).sum() == mask.size - mask.sum()


def test_aggregate():
    rows = [
        {"id": "a", "category": "remove", "psnr_bg": 30.0, "psnr_in": None, "success": True},
        {"id": "b", "category": "remove", "psnr_bg": math.inf, "psnr_in": 10.0, "success": False},
        {"id": "c", "category": "add", "psnr_bg": 20.0, "psnr_in": 12.0, "success": True},
        {"id": "d", "psnr_bg": float("nan"), "psnr_in": 14.0, "success": None},
    ]
    out = aggregate(rows)
    rm = out["groups"]["remove"]
    assert rm == {"count": 2, "psnr_bg": 65.0, "psnr_in": 10.0, "success_rate": 0.5}  # inf -> 100
    assert out["groups"]["add"]["success_rate"] == 1.0
    assert out["groups"]["(none)"] == {"count": 1, "psnr_bg": None, "psnr_in": 14.0, "success_rate": None}
    ov = out["overall"]
    assert ov["count"] == 4 and ov["psnr_bg"] == pytest.approx(150 / 3) and ov["psnr_in"] == 12.0
    assert ov["success_rate"] == pytest.approx(2 / 3) and "id" not in ov and "category" not in ov
    assert aggregate(rows, inf_cap=50.0)["groups"]["remove"]["psnr_bg"] == 40.0
    assert list(aggregate(rows, by="id")["groups"]) == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def tiny_clip():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[EOS]", "remove", "the", "red", "circle", "make", "square", "blue"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), tokenizer


def test_clip_scores(tiny_clip):
    from transformers import CLIPImageProcessor
    model, tokenizer = tiny_clip
    rng = np.random.default_rng(4)
    imgs = [rng.uniform(0, 1, (32, 32, 3)).astype(np.float32) for _ in range(3)]
    tgts = [imgs[0], rng.uniform(0, 1, (32, 32, 3)).astype(np.float32), imgs[2][::-1].copy()]
    texts = ["remove the red circle", "make the square blue", "the"]
    ci, cs = clip_scores(model, tokenizer, imgs, texts, tgts, batch_size=2)
    assert len(ci) == len(cs) == 3
    assert ci[0] == pytest.approx(1.0, abs=1e-5) and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in ci)
    assert ci[1] < 0.9999 and all(0 <= s <= 100 for s in cs)

    # reference: HF's own CLIP preprocessing (no resize needed at 32×32) and embeddings
    proc = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_convert_rgb=False)
    with torch.no_grad():
        def emb(x):
            pv = proc(images=list(x), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
            return torch.nn.functional.normalize(model.get_image_features(pixel_values=pv).pooler_output, dim=-1)
        t = tokenizer(texts, padding=True, return_tensors="pt")
        te = torch.nn.functional.normalize(model.get_text_features(**t).pooler_output, dim=-1)
        e = emb(imgs)
        ref_i = (e * emb(tgts)).sum(-1)
        ref_s = 100 * (e * te).sum(-1).clamp(min=0)
    np.testing.assert_allclose(ci, ref_i.numpy(), atol=1e-5)
    np.testing.assert_allclose(cs, ref_s.numpy(), atol=1e-4)

    # layouts: CHW torch tensors and a batched HWC array give the same numbers; None skips a score
    chw = [torch.from_numpy(x).permute(2, 0, 1) for x in imgs]
    ci2, cs2 = clip_scores(model, tokenizer, chw, None, np.stack(tgts))
    np.testing.assert_allclose(ci2, ci, atol=1e-5)
    assert cs2 == [None] * 3

    # resizing: a constant image stays constant, so its embedding does not depend on the input size
    flat_small, flat_big = np.full((32, 32, 3), 0.3), np.full((64, 48, 3), 0.3)
    ci3, _ = clip_scores(model, tokenizer, [flat_big], None, [flat_small])
    assert ci3[0] == pytest.approx(1.0, abs=1e-5)


def test_lpips_optional(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1, (8, 8, 3)), rng.uniform(0, 1, (8, 8, 3))
    monkeypatch.setattr(metrics, "LPIPS_AVAILABLE", False)
    assert metrics.lpips_distance(a, b) is None
    assert edit_scores(a, b, a, lpips=True)["lpips_bg"] is None

    class FakeLPIPS(torch.nn.Module):  # spatial map = mean |x − y| over channels, in LPIPS's [-1, 1] input range
        def __init__(self, net, spatial, verbose):
            super().__init__()
            assert spatial

        def forward(self, x, y):
            assert x.min() >= -1 and x.max() <= 1
            return (x - y).abs().mean(1, keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setattr(metrics, "LPIPS_AVAILABLE", True)
    monkeypatch.setattr(metrics, "_LPIPS_MODELS", {})
    region = np.zeros((8, 8), bool)
    region[:3] = True
    d = np.abs(a - b).mean(-1) * 2
    assert metrics.lpips_distance(a, b) == pytest.approx(d.mean(), abs=1e-6)
    assert metrics.lpips_distance(a, b, region) == pytest.approx(d[region].mean(), abs=1e-6)
