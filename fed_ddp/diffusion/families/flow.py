"""Rectified-flow families (SD3, Flux): the flow-matching objective.

x_σ = (1 − σ)·x₀ + σ·ε, and the transformer predicts the velocity ε − x₀. σ is drawn as diffusers' training
scripts draw it: u from the family's density (logit-normal for SD3, uniform for Flux;
``diffusers.training_utils.compute_density_for_timestep_sampling``), then shifted as the sampler shifts it,
σ = s·u / (1 + (s − 1)·u), with s the scheduler's ``shift`` or, under dynamic shifting (Flux), exp(μ) for
this image's token count (``calculate_shift``), so training and sampling see the same noise levels."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from fed_ddp.diffusion.families.sd import ATTENTION, SD, to_device

JOINT = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # MM-DiT: the text stream's projections


class Flow(SD):
    denoiser_attr = "transformer"
    default_targets: ClassVar[tuple[str, ...]] = JOINT
    flow = True
    tiny_text_encoder = False
    t5_tokenizer = "tokenizer_3"  # the pipeline's T5 tokenizer (Flux: tokenizer_2)
    weighting = "logit_normal"  # density of u (diffusers' --weighting_scheme)
    packing = 1  # latent channels per transformer input channel (Flux: 2x2 patches, 4)
    load_kwargs: ClassVar[dict] = {}

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def image_tokens(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1] // 4  # 2x2 patches

    def shift(self, scheduler, latents: torch.Tensor) -> float:
        c = scheduler.config
        if c.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            return math.exp(calculate_shift(self.image_tokens(latents), c.get("base_image_seq_len", 256),
                                            c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                            c.get("max_shift", 1.15)))
        return float(c.get("shift", 1.0))

    def draw(self, latents: torch.Tensor, scheduler, generator: torch.Generator | None = None):
        """Gaussian noise and σ in (0, 1) per example (float; the 'timestep' of a flow family)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        u = compute_density_for_timestep_sampling(self.weighting, latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, device=device, generator=generator)
        return to_device(noise, latents.device), to_device(self.shifted(u, scheduler, latents), latents.device)

    def shifted(self, u: torch.Tensor, scheduler, latents: torch.Tensor) -> torch.Tensor:
        """σ = s·u / (1 + (s − 1)·u): the sampler's shift of noise levels u in (0, 1]."""
        s = self.shift(scheduler, latents)
        return s * u / (1 + (s - 1) * u)

    def loss(self, model, scheduler, latents, cond, noise, t) -> torch.Tensor:
        sigma = t.float().view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = self.predict(model, noisy, t.float(), cond)
        return F.mse_loss(pred.float(), (noise - latents).float())

    def initial_latents(self, pipe, n: int, generator: torch.Generator) -> torch.Tensor:
        """SD3 and Flux take ``latents=`` as their ``prepare_latents`` draws them (Flux: packed; no scaling)."""
        model, side = self.denoiser(pipe), self.sample_side(pipe)
        channels = model.config.in_channels // self.packing
        dtype = next(pipe.text_encoder.parameters()).dtype
        out = pipe.prepare_latents(n, channels, side, side, dtype, model.device, generator)
        return out[0] if isinstance(out, tuple) else out  # Flux also returns the position ids

    def max_sequence_length(self, pipe) -> int:
        """T5 tokens: the pipeline's default, or fewer if the tokenizer is shorter (the tiny base: 8)."""
        tok = getattr(pipe, self.t5_tokenizer, None)
        return min(self.default_sequence_length, tok.model_max_length) if tok is not None else self.default_sequence_length

    def sample_kwargs(self, pipe) -> dict:
        return {"max_sequence_length": self.max_sequence_length(pipe)}
