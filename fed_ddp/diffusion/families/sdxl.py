"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled projection of the second),
``add_time_ids`` (original size, crop, target size) and a ``UNet2DConditionModel`` with text-time embeddings."""

from __future__ import annotations

from typing import ClassVar

import torch

from fed_ddp.diffusion.families.sd import SD


class SDXL(SD):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    tiny_text_encoder = False
    load_kwargs: ClassVar[dict] = {}

    @classmethod
    def recognises(cls, config: dict) -> bool:
        return (config.get("_class_name", "UNet2DConditionModel") == cls.denoiser_class_name
                and config.get("addition_embed_type") == "text_time")

    @torch.no_grad()
    def encode_prompts(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"embeds": (N, L, D1 + D2), "pooled": (N, P), "time_ids": (N, 6)}: what the pipeline computes itself."""
        device = self.denoiser(pipe).device
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        size = self.image_size(pipe)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=int(pooled.shape[-1]))
        return {"embeds": embeds.float().cpu(), "pooled": pooled.float().cpu(),
                "time_ids": time_ids.float().repeat(len(captions), 1)}

    def image_size(self, pipe) -> tuple[int, int]:
        """The pipeline's default output size (pixels): what sampling uses, so training conditions on it too."""
        side = self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor
        return side, side

    def added_cond(self, cond, dtype) -> dict:
        return {"added_cond_kwargs": {"text_embeds": cond["pooled"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}}

    # -- the tiny base ------------------------------------------------------------------------------
    def tiny_denoiser(self):
        from fed_ddp.diffusion import tiny

        return tiny.build_unet(cross_attention_dim=2 * tiny.HIDDEN, addition_embed_type="text_time",
                               addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + tiny.HIDDEN)

    def tiny_pipeline(self, denoiser=None, vae=None):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from fed_ddp.diffusion import tiny

        return StableDiffusionXLPipeline(
            vae=vae or tiny.build_vae(), text_encoder=tiny.build_text_encoder(layers=2),
            text_encoder_2=tiny.build_text_encoder(layers=2, projection=True), tokenizer=tiny.build_tokenizer(),
            tokenizer_2=tiny.build_tokenizer(), unet=denoiser or self.tiny_denoiser(),
            scheduler=EulerDiscreteScheduler.from_config(tiny.build_scheduler().config), add_watermarker=False)
