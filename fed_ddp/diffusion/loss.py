"""The denoising loss of latent diffusion: noise the latents at a random timestep, predict the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(unet, scheduler, latents: torch.Tensor, text_embeds: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target that the scheduler names."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"scheduler prediction_type={kind!r}: fed_ddp trains epsilon or v_prediction")
    pred = unet(noisy, t, encoder_hidden_states=text_embeds).sample
    return F.mse_loss(pred.float(), target.float())
