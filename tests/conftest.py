"""Shared test helpers."""
import os
import sys

import torch
from diffusers import UNet2DConditionModel

# The top-level scripts (train.py, infer.py, evaluate.py) are imported by some tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_unet(seed: int = 0, **kw) -> UNet2DConditionModel:
    """A seeded two-block SD-style UNet (cross-attention width 32), small enough for exact-equality tests."""
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    config.update(kw)
    return UNet2DConditionModel(**config).eval()
