"""BIM, SmartEdit's Bidirectional Interaction Module, and the UNet conv_in residual that carries its image output.

SmartEdit §4.2 and fig. 4 (eq. 3: f', v' = BIM(f, v); InsightEdit eq. 4: f_txt, v_txt = BIM(E(I_src), q')).
The Q-Former tokens f and the CLIP patch features v exchange information in both directions:

    f = Lift_f(q)                                  q: B×T×text_dim   → f: B×T×width
    v = Lift_v(v) + pos2d                          v: B×P×vision_dim → v: B×P×width
    f = f + SelfAttn(LN f)
    f = f + CrossAttn(LN f → LN v)                 f queries, v keys/values
    f' = f + MLP(LN f)                             point-wise
    v' = v + CrossAttn(LN v → LN f')               v queries, f' keys/values
    f_txt = q + ZeroLinear(f')                     B×T×text_dim, the UNet's cross-attention context
    v_txt = Up(ZeroConv1x1(v' as a g×g grid))      B×latent_channels×H×W, added to the UNet's conv_in output

Both output layers start at zero, so a freshly added BIM returns f_txt == q and v_txt == 0 exactly and changes
nothing downstream (the public SmartEdit code scaled f' by 0.5 instead; we do not).

Choices the design left open:
- Pre-LN everywhere, and the context side of each cross-attention is layer-normed too (LN v for f→v, LN f' for
  v→f'): CLIP penultimate-layer patch features are not normalised, and this keeps the attention logits' scale
  independent of the vision encoder. LN v is computed once and used both as context (f→v) and as query (v→f').
- Position information: fixed 2-D sine-cosine embeddings (MAE style; a quarter of the width each for sin/cos of
  the row and of the column), added after the lift. Parameter-free, so any square P works (336 px → 24×24,
  toy encoders → smaller grids). Patches are assumed row-major, as CLIP's patch-embedding conv flattens them.
- v_txt: the 1×1 conv is applied at grid resolution and *then* upsampled (bilinear, align_corners=False).
  This equals upsample-then-conv exactly (in exact arithmetic): a 1×1 conv is a per-pixel affine map and bilinear
  interpolation takes per-channel weighted averages whose weights sum to 1, so the two commute, bias included.
  It is cheaper: width→latent_channels at g×g instead of at H×W.
- Attention uses `nn.MultiheadAttention(batch_first=True)` with `need_weights=False` (SDPA kernels).

`ConvInWithResidual` wraps the UNet's `conv_in` so v_txt can be added to its output without forking diffusers'
UNet2DConditionModel (whose forward calls `self.conv_in(sample)` once, right after time embedding). It subclasses
nn.Conv2d and *shares* the original weight and bias Parameters, so the UNet's state-dict keys
(`conv_in.weight`, `conv_in.bias`) and any loaded weights are unchanged. Wrap after any change to conv_in
(e.g. the 8-channel expansion), since replacing conv_in afterwards removes the wrapper.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(grid: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding for a row-major grid×grid patch layout: grid²×width."""
    if width % 4:
        raise ValueError(f"BIM width must be divisible by 4 for 2-D sin-cos positions, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, device=device, dtype=torch.float32),
        torch.arange(grid, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.reshape(-1, 1) * omega  # P×width/4
    x = xs.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(dtype)


class BIM(nn.Module):
    """(q: B×T×text_dim, v: B×P×vision_dim) → (f_txt: B×T×text_dim, v_txt: B×latent_channels×H×W)."""

    def __init__(
        self,
        text_dim: int = 768,
        vision_dim: int = 1024,
        width: int = 1024,
        heads: int = 16,
        latent_channels: int = 320,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.lift_f = nn.Linear(text_dim, width)
        self.lift_v = nn.Linear(vision_dim, width)
        self.norm_f_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_f_cross = nn.LayerNorm(width)
        self.norm_v = nn.LayerNorm(width)
        self.cross_f_to_v = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_f_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * mlp_ratio), nn.GELU(), nn.Linear(width * mlp_ratio, width)
        )
        self.norm_f_ctx = nn.LayerNorm(width)
        self.cross_v_to_f = nn.MultiheadAttention(width, heads, batch_first=True)
        # Zero-initialised outputs: a fresh BIM is an exact identity on the text path and adds nothing to the UNet.
        self.out_txt = nn.Linear(width, text_dim)
        self.out_img = nn.Conv2d(width, latent_channels, kernel_size=1)
        for p in (*self.out_txt.parameters(), *self.out_img.parameters()):
            nn.init.zeros_(p)

    def forward(
        self, q: torch.Tensor, v: torch.Tensor, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, patches, _ = v.shape
        grid = math.isqrt(patches)
        if grid * grid != patches:
            raise ValueError(f"BIM needs a square number of patch features (drop CLS), got P={patches}")
        dtype = self.lift_f.weight.dtype  # frozen encoders may hand over bf16
        f = self.lift_f(q.to(dtype))  # B×T×width
        v = self.lift_v(v.to(dtype))  # B×P×width
        v = v + sincos_2d(grid, v.shape[-1], v.device, v.dtype)

        y = self.norm_f_self(f)
        f = f + self.self_attn(y, y, y, need_weights=False)[0]
        v_n = self.norm_v(v)
        f = f + self.cross_f_to_v(self.norm_f_cross(f), v_n, v_n, need_weights=False)[0]
        f = f + self.mlp(self.norm_f_mlp(f))  # f'
        f_ctx = self.norm_f_ctx(f)
        v = v + self.cross_v_to_f(v_n, f_ctx, f_ctx, need_weights=False)[0]  # v'

        f_txt = q + self.out_txt(f)  # B×T×text_dim
        v_grid = v.transpose(1, 2).reshape(batch, -1, grid, grid)  # row-major patches → B×width×g×g
        v_txt = F.interpolate(self.out_img(v_grid), size=tuple(latent_hw), mode="bilinear", align_corners=False)
        return f_txt, v_txt  # v_txt: B×latent_channels×H×W


class ConvInWithResidual(nn.Conv2d):
    """The UNet's conv_in, sharing its Parameters, plus an optional residual added to its output.

    `residual` (None by default) must broadcast to the conv output, B×C×H×W; it is cast to the output dtype.
    """

    def __init__(self, conv: nn.Conv2d):
        # Built on the meta device (no allocation), then the original Parameters are adopted as-is.
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.residual is None:
            return out
        return out + self.residual.to(out.dtype)


def wrap_conv_in(unet: nn.Module) -> nn.Module:
    """Swap `unet.conv_in` for a ConvInWithResidual sharing its weights (idempotent). Returns the UNet."""
    if not isinstance(unet.conv_in, ConvInWithResidual):
        unet.conv_in = ConvInWithResidual(unet.conv_in)
    return unet


@contextlib.contextmanager
def conv_in_residual(unet: nn.Module, v_txt: torch.Tensor | None):
    """Add v_txt to the output of `unet.conv_in` for every UNet call inside the block; always cleared after."""
    if not isinstance(unet.conv_in, ConvInWithResidual):
        raise TypeError("unet.conv_in is not wrapped: call minedit.parts.bim.wrap_conv_in(unet) first")
    unet.conv_in.residual = v_txt
    try:
        yield unet
    finally:
        unet.conv_in.residual = None
