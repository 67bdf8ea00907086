"""SD3: two CLIP encoders (with projection) and T5, an MM-DiT ``SD3Transformer2DModel``, flow matching."""

from __future__ import annotations

import torch

from fed_ddp.diffusion.families.flow import Flow
from fed_ddp.diffusion.families.sd import model_dtype


class SD3(Flow):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_class_name = "SD3Transformer2DModel"
    weighting = "logit_normal"  # the SD3 paper's and diffusers' SD3 LoRA script default
    default_sequence_length = 256

    @torch.no_grad()
    def encode_prompts(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"embeds": (N, 77 + T5 tokens, D_T5), "pooled": (N, P1 + P2)}, as the pipeline computes them."""
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=self.denoiser(pipe).device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length(pipe))
        return {"embeds": embeds.float().cpu(), "pooled": pooled.float().cpu()}

    def predict(self, model, noisy, sigma, cond):
        dtype = model_dtype(model)
        return model(hidden_states=noisy.to(dtype), timestep=sigma * 1000, encoder_hidden_states=cond["embeds"].to(dtype),
                     pooled_projections=cond["pooled"].to(dtype)).sample

    # -- the tiny base ------------------------------------------------------------------------------
    def tiny_denoiser(self):
        from diffusers import SD3Transformer2DModel

        from fed_ddp.diffusion import tiny

        return SD3Transformer2DModel(sample_size=tiny.RESOLUTION, patch_size=2, in_channels=tiny.LATENT, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * tiny.HIDDEN,
                                     caption_projection_dim=32, pooled_projection_dim=2 * tiny.HIDDEN,
                                     out_channels=tiny.LATENT, pos_embed_max_size=tiny.RESOLUTION)

    def tiny_pipeline(self, denoiser=None, vae=None):
        from diffusers import StableDiffusion3Pipeline

        from fed_ddp.diffusion import tiny

        return StableDiffusion3Pipeline(
            transformer=denoiser or self.tiny_denoiser(), scheduler=tiny.build_flow_scheduler(shift=1.0),
            vae=vae or tiny.build_vae(shift_factor=0.0), text_encoder=tiny.build_text_encoder(layers=2, projection=True),
            tokenizer=tiny.build_tokenizer(), text_encoder_2=tiny.build_text_encoder(layers=2, projection=True),
            tokenizer_2=tiny.build_tokenizer(), text_encoder_3=tiny.build_t5(2 * tiny.HIDDEN),
            tokenizer_3=tiny.build_tokenizer())
