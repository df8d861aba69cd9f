"""minedit.loading: the lean load gives exactly what diffusers' from_pretrained gives, takes the lean road on a
diffusers folder (one file or shards), and falls back quietly otherwise."""
import logging
import os

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from minedit import build, loading
from minedit.config import preset
from minedit.errors import UserError

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = preset("insightedit", "toy")
    torch.manual_seed(0)
    unet, vae = build.build_unet(cfg), build.build_vae(cfg)
    root = tmp_path_factory.mktemp("sd")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "sharded" / "unet", max_shard_size="20KB")
    unet.save_pretrained(root / "bin" / "unet", safe_serialization=False)
    return root, unet, vae


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls, sub, dtype", [(UNet2DConditionModel, "unet", torch.float32),
                                             (AutoencoderKL, "vae", torch.float32),
                                             (UNet2DConditionModel, "unet", torch.bfloat16),
                                             (UNet2DConditionModel, "sharded/unet", torch.float16)])
def test_lean_equals_diffusers(saved, monkeypatch, cls, sub, dtype):
    root, *_ = saved
    parent, name = os.path.split(sub)
    path = str(root / parent)
    ref = cls.from_pretrained(path, subfolder=name, dtype=dtype, low_cpu_mem_usage=False)
    monkeypatch.setattr(cls, "from_pretrained", None)  # the lean road must not need diffusers' loader
    got = loading.from_pretrained(cls, path, name, dtype)
    same(got, ref)
    assert not got.training and all(not t.is_meta for t in got.state_dict().values())
    assert all(p.requires_grad for p in got.parameters())
    if cls is UNet2DConditionModel:  # and it computes the same thing
        x = torch.randn(1, 8, 4, 4, dtype=dtype)
        c = torch.randn(1, 5, ref.config.cross_attention_dim, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(got(x, 3, c).sample, ref(x, 3, c).sample)


def test_bin_folder_falls_back_quietly(saved, caplog):
    root, unet, _ = saved
    assert loading.weight_files(str(root / "bin" / "unet")) is None
    with caplog.at_level(logging.WARNING):
        got = loading.from_pretrained(UNet2DConditionModel, str(root / "bin"), "unet")
    same(got, unet)
    assert "accelerate" not in caplog.text


def test_config_weights_mismatch_is_a_user_error(saved, tmp_path):
    root, *_ = saved
    bad = tmp_path / "unet"
    bad.mkdir()
    (bad / loading.WEIGHTS).write_bytes((root / "unet" / loading.WEIGHTS).read_bytes())
    cfg = UNet2DConditionModel.load_config(str(root / "unet"))
    cfg["cross_attention_dim"] = cfg["cross_attention_dim"] * 2
    UNet2DConditionModel.from_config(cfg).save_config(str(bad))
    with pytest.raises(UserError, match="config.json and weights disagree"):
        loading.from_pretrained(UNet2DConditionModel, str(tmp_path), "unet")


def test_build_loads_through_it(saved):
    root, unet, vae = saved
    cfg = preset("insightedit", "toy")
    cfg.sd_path = str(root)
    same(build.build_unet(cfg), unet)
    same(build.build_vae(cfg), vae)
