"""Load the base pipeline (a local/hub Stable Diffusion directory or the built-in tiny base) for training."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fed_ddp.config import ModelSection


def quiet_libraries() -> None:
    """Silence diffusers/transformers chatter (progress bars, deprecation notes) on every rank."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers\..*")

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def base_path(cfg: ModelSection, show_progress: bool = True) -> str:
    """Where the base pipeline lives: ``model.pretrained``, or the cached tiny base (pretrained if missing)."""
    if cfg.pretrained:
        return cfg.pretrained
    from fed_ddp.diffusion.pretrain import ensure_tiny_base

    return str(ensure_tiny_base(cfg.tiny, cfg.cache_dir, show_progress))


def load_pipeline(path: str, device: torch.device, revision: str | None = None):
    """A StableDiffusionPipeline with frozen VAE and text encoder, ready for LoRA on its UNet."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, revision=revision, safety_checker=None,
                                                   requires_safety_checker=False)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False)
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_scheduler(pipe):
    """The DDPM noise schedule matching the pipeline's (sampling) scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the VAE posterior mean; the VAE is frozen, so once per run).

    Default batch: 256, or about 2**20 pixels where that is fewer (4 images at 512x512), so SD-sized
    images do not run the VAE out of GPU memory."""
    vae = pipe.vae
    batch_size = batch_size or max(1, min(256, 2 ** 20 // (images.shape[-1] * images.shape[-2])))
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out.append(((z - shift) * vae.config.scaling_factor).float())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text embeddings of each distinct caption (the text encoder is frozen: computed once)."""
    uniq = sorted(set(captions))
    tok = pipe.tokenizer(uniq, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    emb = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float()
    return dict(zip(uniq, emb))


def is_local_pipeline(path: str) -> bool:
    return (Path(path).expanduser() / "model_index.json").exists()


def unet_autocast(unet):
    """Autocast to the UNet's dtype when it is bf16/fp16 (DeepSpeed casts the model it trains, the server's
    included) while the pipeline's inputs and its other models stay fp32; a no-op for fp32 UNets."""
    import contextlib

    if unet.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(unet.device.type, dtype=unet.dtype)
    return contextlib.nullcontext()

