"""The denoising loss of latent diffusion: noise the latents at a timestep, predict the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None):
    """Gaussian noise and uniform timesteps for a batch (drawn on the generator's device)."""
    device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
    return noise.to(latents.device), t.to(latents.device)


def diffusion_loss(model, scheduler, latents: torch.Tensor, text_embeds: torch.Tensor,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the model's prediction and the epsilon or v target that the scheduler names.

    ``noise``/``timesteps`` may be given (data parallelism slices one client-wide draw); else drawn here.
    """
    if noise is None or timesteps is None:
        noise, timesteps = sample_noise(latents, scheduler.config.num_train_timesteps, generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler prediction_type={kind!r}: fed_ddp trains epsilon or v_prediction")
    dtype = next((p.dtype for p in _module(model).parameters()), torch.float32)
    pred = model(noisy.to(dtype), timesteps, encoder_hidden_states=text_embeds.to(dtype)).sample
    return F.mse_loss(pred.float(), target.float())


def _module(model):
    return getattr(model, "module", model)
