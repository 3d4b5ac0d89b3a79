"""The training objective: the noise schedule the trainer builds, the loss, Min-SNR weights and CFG dropout."""

import json

import torch
from diffusers import DDPMScheduler

from pipeline.config import Config
from pipeline.model.encoders import ContextBatch
from pipeline.model.network import ModelSpec, build_unet
from pipeline.training.loop import make_train_scheduler, train
from pipeline.training.objective import cfg_dropout, diffusion_loss, loss_weight
from tests.conftest import tiny_config


def _scheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)


def test_train_scheduler_follows_the_config(tmp_path, shapes_data):
    raw = tiny_config(tmp_path, shapes_data, diffusion={"num_train_timesteps": 500, "beta_schedule": "linear",
                                                        "prediction_type": "epsilon"})
    sched = make_train_scheduler(Config.model_validate(raw))
    c = sched.config
    assert (c.num_train_timesteps, c.beta_schedule, c.prediction_type) == (500, "linear", "epsilon")
    assert c.clip_sample is False and c.timestep_spacing == "trailing"
    # trailing spacing: a sampler's first step is t = T-1, where the default cosine schedule leaves (almost) no
    # trace of the image -- the point sampling starts from pure noise
    cosine = make_train_scheduler(Config.model_validate(tiny_config(tmp_path, shapes_data)))
    cosine.set_timesteps(20)
    assert int(cosine.timesteps[0]) == 999 and cosine.alphas_cumprod[999] < 1e-3


def test_min_snr_weights_follow_the_formula():
    t = torch.tensor([0, 100, 500, 900, 999])
    for pred in ("epsilon", "v_prediction"):
        sched = _scheduler(prediction_type=pred)
        ab = sched.alphas_cumprod[t]
        snr = ab / (1 - ab)
        w = loss_weight(sched, t, "min_snr", 5.0)
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if pred == "v_prediction" else snr)
        torch.testing.assert_close(w, expected.float(), rtol=1e-4, atol=1e-6)
        assert w.max() <= 1.0 + 1e-6 and w[0] < 0.1  # the easy low-noise steps are down-weighted
    assert torch.all(loss_weight(_scheduler(), t, "none", 5.0) == 1)


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
    cfg = Config.model_validate(tiny_config(tmp_path, shapes_data, train={"max_steps": 100, "log_every": 1,
                                                                         "num_threads": 2}))
    train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)  # 10-step means: noise alone moves them a few percent


class _NoisePredictor(torch.nn.Module):
    """Stands in for the UNet. With clean images x0 = 0, x_t = sqrt(1 - alpha_bar_t) * noise, so x_t / sqrt(1 -
    alpha_bar_t) is exactly the noise: `scale` 1 predicts it perfectly, 0 predicts zero noise."""

    def __init__(self, scheduler, scale: float):
        super().__init__()
        self.alphas_cumprod, self.scale = scheduler.alphas_cumprod, scale
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_t, t, **_):
        sigma = (1 - self.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return (self.weight * self.scale * x_t / sigma,)


def test_diffusion_loss_is_the_mse_of_the_network_prediction():
    """The loss is the MSE between what the network predicts and the noise that was added: a perfect predictor
    scores zero, predicting no noise scores the noise's variance (1), and the gradient reaches the network."""
    sched = _scheduler(prediction_type="epsilon")
    spec = ModelSpec(resolution=8, patch_size=1, coord_channels=False, encoder="category", encoder_id="c",
                     max_length=0, categories=["a"], attach="cross_attention", context_dim=0,
                     prediction_type="epsilon")
    ctx = ContextBatch(labels=torch.zeros(64, dtype=torch.long))
    x0 = torch.zeros(64, 3, 8, 8)
    perfect = diffusion_loss(_NoisePredictor(sched, 1.0), spec, sched, x0, ctx, torch.Generator().manual_seed(0))
    assert perfect.item() < 1e-8
    zero = diffusion_loss(_NoisePredictor(sched, 0.0), spec, sched, x0, ctx, torch.Generator().manual_seed(0))
    assert abs(zero.item() - 1.0) < 0.05  # E[noise^2] over 64 x 192 draws
    half = _NoisePredictor(sched, 0.5)
    loss = diffusion_loss(half, spec, sched, x0, ctx, torch.Generator().manual_seed(0))
    assert abs(loss.item() - 0.25) < 0.02  # predicting half the noise leaves a quarter of its variance
    loss.backward()
    assert half.weight.grad is not None and half.weight.grad.item() < 0  # more of the prediction lowers the loss

    unet = build_unet(spec, [32], 1, [False], 8, 8)  # and a real UNet trains through the same function
    diffusion_loss(unet, spec, sched, x0, ctx, torch.Generator().manual_seed(0)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
