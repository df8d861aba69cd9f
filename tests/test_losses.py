"""The diffusion loss's optional weightings (minedit/losses.py) and the EMA of trained weights (training.EMA).

Off by default they must change nothing: the loss is F.mse_loss itself. On, each is checked against a hand
computation from the scheduler's betas (numpy, independent of the module's torch code)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from minedit.losses import diffusion_loss, region_weight
from minedit.training import EMA

SCHED = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    pred, goal = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990][:b])
    mask = torch.zeros(b, 1, 16, 16)
    mask[:, :, 4:8, 6:12] = 1
    return pred, goal, t, mask


def test_defaults_are_the_plain_mse():
    pred, goal, t, mask = batch()
    ac = SCHED.alphas_cumprod
    assert torch.equal(diffusion_loss(pred, goal, t, ac, "v_prediction"), F.mse_loss(pred, goal))
    assert torch.equal(diffusion_loss(pred, goal, t, ac, "v_prediction", 0.0, mask, 1.0), F.mse_loss(pred, goal))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_min_snr_matches_a_hand_computation(prediction_type):
    pred, goal, t, _ = batch()
    betas = SCHED.betas.double().numpy()
    abar = np.cumprod(1 - betas)[t.numpy()]
    snr = abar / (1 - abar)
    w = np.minimum(snr, 5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = ((pred - goal) ** 2).double().mean(dim=(1, 2, 3)).numpy()
    want = float((w * per_sample).mean())
    got = float(diffusion_loss(pred, goal, t, SCHED.alphas_cumprod, prediction_type, snr_gamma=5.0))
    assert got == pytest.approx(want, rel=1e-5)
    assert w[0] < 0.01  # a nearly clean step (huge SNR) is down-weighted under both losses
    assert w[2] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[2] / (snr[2] + 1))


def test_mask_weight_matches_a_hand_computation():
    pred, goal, t, mask = batch()
    latent_mask = mask[:, :, ::2, ::2].clone()  # the 16×16 mask is 2×2-block aligned: max-pool = subsample
    w = 1 + 3 * latent_mask
    err = (pred - goal) ** 2
    want = ((err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * 4)).mean()  # 4 channels share the weight
    got = diffusion_loss(pred, goal, t, SCHED.alphas_cumprod, "v_prediction", mask=mask, mask_weight=4.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # An all-ones mask (rows without one) weighs every pixel the same: the plain MSE again.
    ones = diffusion_loss(pred, goal, t, SCHED.alphas_cumprod, "v_prediction", mask=torch.ones_like(mask),
                          mask_weight=4.0)
    assert float(ones) == pytest.approx(float(F.mse_loss(pred, goal)), rel=1e-6)
    # A latent pixel touched by any edited image pixel counts as edited.
    one_px = torch.zeros(1, 1, 16, 16)
    one_px[0, 0, 3, 5] = 1
    assert region_weight(one_px, (8, 8), 4.0)[0, 0, 1, 2] == 4 and region_weight(one_px, (8, 8), 4.0).sum() == 67


def test_ema_follows_its_recurrence_and_applied_restores_the_trained_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen parts are not averaged
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    want = model[0].weight.detach().clone()
    for k in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(k)
        d = min(0.9, (1 + k) / (10 + k))
        want = d * want + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.shadow["0.weight"], want, atol=1e-6)
    trained = model[0].weight.detach().clone()
    with ema.applied():
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])
    assert torch.equal(model[0].weight, trained)
