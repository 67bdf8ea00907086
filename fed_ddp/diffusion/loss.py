"""The denoising loss of latent diffusion, whatever the family: noise the latents, predict the target.

The family decides the noise levels (integer DDPM timesteps, or flow-matching σ) and the target (ε, v or
the flow velocity): ``fed_ddp.diffusion.families``. These two functions are the family-agnostic entry points."""

from __future__ import annotations

import torch


def sample_noise(latents: torch.Tensor, scheduler, generator: torch.Generator | None = None, family=None):
    """Gaussian noise and the family's timesteps for a batch (drawn on the generator's device)."""
    return _family(family, scheduler).draw(latents, scheduler, generator)


def diffusion_loss(model, scheduler, latents: torch.Tensor, cond, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None, family=None) -> torch.Tensor:
    """The family's training loss on a batch. ``cond``: the family's conditioning dict, or (SD) the text states.

    ``noise``/``timesteps`` may be given (data parallelism slices one client-wide draw); else drawn here.
    """
    fam = _family(family, scheduler)
    if not isinstance(cond, dict):
        cond = {"embeds": cond}
    if noise is None or timesteps is None:
        noise, timesteps = fam.draw(latents, scheduler, generator)
    return fam.loss(model, scheduler, latents, cond, noise, timesteps)


def _family(family, scheduler):
    """The given family, else SD for a DDPM-style scheduler (the pre-family call sites)."""
    if family is not None:
        return family
    from fed_ddp.diffusion.families import get_family

    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        raise ValueError("a flow-matching scheduler needs its family (sd3 or flux): pass family=")
    return get_family("sd")
