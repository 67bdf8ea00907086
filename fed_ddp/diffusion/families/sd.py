"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a ``UNet2DConditionModel``, ε or v prediction.

This class is also the base of the other families: each overrides what differs from SD."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections


class SD:
    """What a family declares (class attributes, read before anything is built) and does (methods)."""

    name = "sd"  # its model.family name
    pipeline_class_name = "StableDiffusionPipeline"  # the diffusers pipeline (model_index.json `_class_name`)
    denoiser_attr = "unet"  # the pipeline's module that carries the LoRA
    denoiser_class_name = "UNet2DConditionModel"  # its diffusers class (a denoiser config's `_class_name`)
    # default LoRA targets (`lora.targets: []`): those of diffusers' LoRA training scripts for the family
    default_targets: ClassVar[tuple[str, ...]] = ATTENTION
    flow = False  # flow matching (SD3, Flux) rather than DDPM timesteps
    tiny_text_encoder = True  # its tiny base pretrains the (SD-layout) text encoder with the denoiser

    @classmethod
    def recognises(cls, config: dict) -> bool:
        """Whether a denoiser config is this family's: its ``_class_name`` (none: a UNet) is the family's denoiser
        class (SD and SDXL share one UNet class: an SDXL UNet adds ``text_time`` conditioning)."""
        return (config.get("_class_name", "UNet2DConditionModel") == cls.denoiser_class_name
                and config.get("addition_embed_type") != "text_time")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    # -- loading ------------------------------------------------------------------------------------
    load_kwargs: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}

    def load(self, path: str, device: torch.device, revision: str | None = None):
        """The pipeline with every model frozen and in eval mode, on ``device``."""
        # safetensors only: a folder that holds pickled weights alone is refused, never unpickled
        pipe = self.pipeline_class().from_pretrained(path, revision=revision, use_safetensors=True, **self.load_kwargs)
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False)
                m.eval()
        pipe.set_progress_bar_config(disable=True)
        pipe.fed_ddp_family = type(self)  # families.family_of(pipe): the family that loaded it
        return pipe.to(device)

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, pipe, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for each caption, stacked: {"embeds": (N, L, D)} (fp32, on the CPU)."""
        tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        emb = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]
        return {"embeds": emb.float().cpu()}

    # -- training -----------------------------------------------------------------------------------
    def training_scheduler(self, pipe):
        """The DDPM noise schedule matching the pipeline's (sampling) scheduler config."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def draw(self, latents: torch.Tensor, scheduler, generator: torch.Generator | None = None):
        """Gaussian noise and uniform integer timesteps for a batch (drawn on the generator's device)."""
        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                          device=device)
        return to_device(noise, latents.device), to_device(t, latents.device)

    def target(self, scheduler, latents, noise, t):
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"scheduler prediction_type={kind!r}: fed_ddp trains epsilon or v_prediction")

    def loss(self, model, scheduler, latents: torch.Tensor, cond: dict[str, torch.Tensor], noise: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """MSE between the model's prediction and the ε or v target that the scheduler names."""
        noisy = scheduler.add_noise(latents, noise, t)
        target = self.target(scheduler, latents, noise, t)
        return F.mse_loss(self.predict(model, noisy, t, cond).float(), target.float())

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for noisy latents at timesteps ``t`` (the family's own call signature)."""
        dtype = model_dtype(model)
        return model(noisy.to(dtype), t, encoder_hidden_states=cond["embeds"].to(dtype),
                     **self.added_cond(cond, dtype)).sample

    def added_cond(self, cond, dtype) -> dict:
        return {}

    # -- sampling and export ------------------------------------------------------------------------
    def sample_kwargs(self, pipe) -> dict:
        """Extra arguments of ``pipe(...)`` beyond prompt, steps, guidance, generator and output type."""
        return {}

    def sample_side(self, pipe) -> int:
        """The pipeline's default image side in pixels (what ``pipe(...)`` generates without height/width)."""
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def initial_latents(self, pipe, n: int, generator: torch.Generator) -> torch.Tensor:
        """The noise ``pipe(...)`` would draw for ``n`` images from ``generator``, as ``latents=`` takes it (before
        the sampler's ``init_noise_sigma``, which the pipeline applies to given latents too), so several prompts'
        batches can run as one call with unchanged draws."""
        from diffusers.utils.torch_utils import randn_tensor

        model, side = self.denoiser(pipe), self.sample_side(pipe) // pipe.vae_scale_factor
        dtype = next(pipe.text_encoder.parameters()).dtype  # the pipeline draws in its prompt embeddings' dtype
        return randn_tensor((n, model.config.in_channels, side, side), generator=generator, device=model.device,
                            dtype=dtype)

    def save_lora(self, out_dir, layers: dict, metadata: dict, weight_name: str) -> None:
        """Write ``layers`` (peft state dict of the denoiser) where this family's ``load_lora_weights`` reads it."""
        attr = self.denoiser_attr
        self.pipeline_class().save_lora_weights(out_dir, weight_name=weight_name, **{
            f"{attr}_lora_layers": layers, f"{attr}_lora_adapter_metadata": metadata})

    # -- the tiny base ------------------------------------------------------------------------------
    def tiny_denoiser(self):
        from fed_ddp.diffusion import tiny

        return tiny.build_unet()

    def tiny_pipeline(self, denoiser=None, vae=None):
        from fed_ddp.diffusion import tiny

        return tiny.build_pipeline(unet=denoiser, vae=vae)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; host -> GPU through pinned memory without blocking, so the host goes on queueing
    work instead of waiting for the GPU to reach the copy (a pageable copy would wait: one sync per step)."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def model_dtype(model) -> torch.dtype:
    """The dtype of a (possibly DeepSpeed-wrapped) model's parameters."""
    module = getattr(model, "module", model)
    return next((p.dtype for p in module.parameters()), torch.float32)
