"""The training objective: noise per the schedule, the loss, Min-SNR weights and CFG dropout."""

import torch

from pipeline.config import Config
from pipeline.network import ModelSpec, build_unet
from pipeline.objective import cfg_dropout, diffusion_loss, loss_weight
from tests.conftest import tiny_config


def _scheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)


def test_noise_is_added_exactly_per_the_schedule():
    for schedule in ("linear", "squaredcos_cap_v2"):
        sched = _scheduler(schedule)
        betas = sched.betas.double()
        alpha_bar = torch.cumprod(1 - betas, 0)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
        noise = torch.randn(4, 3, 8, 8, generator=g)
        t = torch.tensor([0, 10, 500, 999])
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        torch.testing.assert_close(sched.add_noise(x0, noise, t), expected, rtol=1e-5, atol=1e-5)
        # the ends of the schedule: almost clean at t=0, almost pure noise at t=T-1
        assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 0.01


def test_min_snr_weights_follow_the_formula():
    t = torch.tensor([0, 100, 500, 900, 999])
    for pred in ("epsilon", "v_prediction"):
        sched = _scheduler(prediction_type=pred)
        ab = sched.alphas_cumprod[t]
        snr = ab / (1 - ab)
        w = loss_weight(sched, t, "min_snr", 5.0)
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if pred == "v_prediction" else snr)
        torch.testing.assert_close(w, expected.float(), rtol=1e-4, atol=1e-6)
    sched = _scheduler()
    w = loss_weight(sched, t, "clamped_snr", 5.0)
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    torch.testing.assert_close(w, (snr.clamp(1, 5) / (snr + 1)).float(), rtol=1e-4, atol=1e-6)
    assert torch.all(loss_weight(sched, t, "none", 5.0) == 1)


def test_loss_weight_floor_lifts_only_the_steps_below_it():
    """Min-SNR's v-weight min(SNR, 5) / (SNR + 1) goes to 0 at both ends; a floor of 0.25 keeps those ends at 0.25
    and leaves the mid-noise steps (weight above 0.25) as published; floor 1 is plain MSE."""
    sched = _scheduler()
    t = torch.arange(0, 1000, 37)
    published = loss_weight(sched, t, "min_snr", 5.0)
    floored = loss_weight(sched, t, "min_snr", 5.0, floor=0.25)
    assert published.min() < 0.05 and published.max() > 0.8  # both ends starved, the middle kept
    torch.testing.assert_close(floored, published.clamp(min=0.25))
    assert torch.equal(floored[published >= 0.25], published[published >= 0.25])
    assert torch.all(loss_weight(sched, t, "min_snr", 5.0, floor=1.0) == 1)


def test_cfg_dropout_rate_is_as_configured_and_changes_between_steps():
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(1, 20001)
    first = cfg_dropout(rows, 0.1, 0, g)
    second = cfg_dropout(rows, 0.1, 0, g)
    rate = (first == 0).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    assert not torch.equal(first == 0, second == 0)  # a different set of samples drops each step
    assert torch.equal(first[first != 0], rows[first != 0])  # the others keep their caption
    assert (cfg_dropout(rows, 0.0, 0, g) == 0).sum() == 0


def test_loss_decreases_on_a_tiny_config(tmp_path, shapes_data):
    from pipeline.train import train

    cfg = Config.model_validate(tiny_config(tmp_path, shapes_data, train={"max_steps": 100, "log_every": 1,
                                                                         "num_threads": 2}))
    train(cfg, progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)  # 10-step means: noise alone moves them a few percent


def test_diffusion_loss_uses_the_network_prediction():
    """The loss is the MSE between the network output and the target: a perfect predictor gives zero."""
    sched = _scheduler(prediction_type="epsilon")
    spec = ModelSpec(resolution=8, patch_size=1, coord_channels=False, encoder="category", encoder_id="c",
                     max_length=0, categories=["a"], attach="cross_attention", context_dim=0,
                     prediction_type="epsilon")
    unet = build_unet(spec, [32], 1, [False], 8, 8)
    from pipeline.encoders import ContextBatch

    ctx = ContextBatch(labels=torch.zeros(2, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(unet, spec, sched, torch.zeros(2, 3, 8, 8), ctx, g)
    assert loss.item() > 0.1  # an untrained network does not predict the noise
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
