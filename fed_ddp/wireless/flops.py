"""FLOPs of a client's local training, counted on the real model and batch (``torch.utils.flop_counter``).

The denoiser is built on the ``meta`` device (shapes, no weights: SD v1.5 costs nothing), prepared as
training prepares it (LoRA adapters, or every weight trainable), and one optimizer step's forward and
backward run under ``FlopCounterMode``. Autograd computes only the gradients that are needed, so a LoRA
step costs less than a full fine-tuning step (no weight gradients of the frozen base): that difference
is counted, not assumed. Counted: matrix multiplies, convolutions and attention (what FlopCounterMode
counts); element-wise work and the optimizer update are left out (a few percent at most).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_step_flops(model: torch.nn.Module, batch: int, latent_shape: tuple[int, ...],
                     embed_shape: tuple[int, ...], cond_shapes: dict | None = None, family=None) -> int:
    """FLOPs of one training step's forward + backward of the denoiser ``model`` at ``batch`` (latents
    (batch, *latent_shape), text states (batch, *embed_shape), the family's other conditioning tensors
    ``cond_shapes`` (name -> shape per example); ``family``: the model's, default SD); tensors live on the
    model's device."""
    from fed_ddp.diffusion.families import get_family

    fam = family or get_family("sd")
    p = next(model.parameters())
    x = torch.zeros(batch, *latent_shape, device=p.device, dtype=p.dtype)
    t = torch.full((batch,), 0.5, device=p.device) if fam.flow else torch.zeros(batch, dtype=torch.long, device=p.device)
    cond = {k: torch.zeros(batch, *shape, device=p.device, dtype=p.dtype)
            for k, shape in {"embeds": embed_shape, **(cond_shapes or {})}.items()}
    with FlopCounterMode(display=False) as counter:
        out = fam.predict(model, x, t, cond)
        out.float().square().mean().backward()
    for q in model.parameters():  # leave no gradients behind
        q.grad = None
    return int(counter.get_total_flops())


def unet_step_flops(cfg, unet_config: dict | None, latent_shape: tuple[int, ...], embed_shape: tuple[int, ...],
                    cond_shapes: dict | None = None, family=None) -> int:
    """One client optimizer step of this run's configuration (``cfg.train.method``, ``cfg.lora``, the client's
    batch = batch_size x ranks_per_client), counted on a meta copy of the ``family``'s denoiser (default SD) built
    from ``unet_config`` (None: the family's tiny base)."""
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.meta import meta_denoiser

    model = meta_denoiser(unet_config, family if family is not None else "sd")
    prepare_trainable(model, cfg)
    batch = cfg.train.batch_size * cfg.fed.ranks_per_client * cfg.train.gradient_accumulation_steps
    return count_step_flops(model, batch, latent_shape, embed_shape, cond_shapes, family)
