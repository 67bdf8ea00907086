"""Flux: CLIP (pooled) and T5, a ``FluxTransformer2DModel`` on 2x2-packed latents with position ids and a
guidance embedding, flow matching with a resolution-dependent shift."""

from __future__ import annotations

from typing import ClassVar

import torch

from fed_ddp.diffusion.families.flow import JOINT, Flow
from fed_ddp.diffusion.families.sd import model_dtype


class Flux(Flow):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_class_name = "FluxTransformer2DModel"
    default_targets: ClassVar[tuple[str, ...]] = (*JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                  "ff_context.net.2")
    t5_tokenizer = "tokenizer_2"
    weighting = "none"  # uniform u: diffusers' Flux LoRA script default
    packing = 4  # 2x2 latent patches per token
    default_sequence_length = 512
    train_guidance = 1.0  # the guidance embedding's value while training (FLUX.1-dev is guidance-distilled)

    @torch.no_grad()
    def encode_prompts(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"embeds": (N, T5 tokens, D_T5), "pooled": (N, D_CLIP)}, as the pipeline computes them."""
        embeds, pooled, _ = pipe.encode_prompt(captions, None, device=self.denoiser(pipe).device,
                                               max_sequence_length=self.max_sequence_length(pipe))
        return {"embeds": embeds.float().cpu(), "pooled": pooled.float().cpu()}

    def predict(self, model, noisy, sigma, cond):
        from diffusers import FluxPipeline

        dtype, device = model_dtype(model), noisy.device
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        module = getattr(model, "module", model)
        guidance = torch.full((b,), self.train_guidance, device=device) if module.config.guidance_embeds else None
        out = model(hidden_states=packed.to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                    pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=cond["embeds"].to(dtype),
                    txt_ids=torch.zeros(cond["embeds"].shape[1], 3, device=device, dtype=dtype),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)  # vae_scale_factor 1: h, w are latent sizes

    def sample_side(self, pipe) -> int:
        return pipe.vae.config.sample_size  # the pipeline's own default is 1024 px whatever the model

    def sample_kwargs(self, pipe) -> dict:
        side = self.sample_side(pipe)
        return {**super().sample_kwargs(pipe), "height": side, "width": side}

    # -- the tiny base ------------------------------------------------------------------------------
    def tiny_denoiser(self):
        from diffusers import FluxTransformer2DModel

        from fed_ddp.diffusion import tiny

        return FluxTransformer2DModel(patch_size=1, in_channels=4 * tiny.LATENT, num_layers=1, num_single_layers=2,
                                      attention_head_dim=8, num_attention_heads=4, joint_attention_dim=tiny.HIDDEN,
                                      pooled_projection_dim=tiny.HIDDEN, guidance_embeds=True, axes_dims_rope=(2, 2, 4))

    def tiny_pipeline(self, denoiser=None, vae=None):
        from diffusers import FluxPipeline

        from fed_ddp.diffusion import tiny

        return FluxPipeline(
            scheduler=tiny.build_flow_scheduler(shift=3.0, use_dynamic_shifting=True), vae=vae or tiny.build_vae(shift_factor=0.0),
            text_encoder=tiny.build_text_encoder(layers=2), tokenizer=tiny.build_tokenizer(),
            text_encoder_2=tiny.build_t5(tiny.HIDDEN), tokenizer_2=tiny.build_tokenizer(),
            transformer=denoiser or self.tiny_denoiser())
