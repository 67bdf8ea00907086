"""Load the base pipeline (a local/hub Stable Diffusion directory or the built-in tiny base) for training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fed_ddp.config import ModelSection
from fed_ddp.data.encoded import EncodedSet, channels

if TYPE_CHECKING:
    from fed_ddp.data.digits import CaptionedImages


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

    return str(ensure_tiny_base(cfg.tiny, cfg.cache_dir, show_progress, cfg.family))


def load_pipeline(path: str, device: torch.device, revision: str | None = None, family: str | None = None):
    """The base pipeline of ``family`` (None: read from the directory's model_index.json, else SD) with every
    model frozen, ready for LoRA on its denoiser (``families.denoiser(pipe)``)."""
    from fed_ddp.diffusion.families import detect_family, get_family

    return get_family(family or detect_family(path) or "sd").load(path, device, revision)


def training_scheduler(pipe):
    """The training noise schedule of the pipeline's family (DDPM for SD/SDXL, flow matching for SD3/Flux)."""
    from fed_ddp.diffusion.families import family_of

    return family_of(pipe).training_scheduler(pipe)


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
def encode_captions(pipe, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The family's conditioning tensors of each distinct caption (the text encoders are frozen: once per run)."""
    from fed_ddp.diffusion.families import family_of

    uniq = sorted(set(captions))
    cond = family_of(pipe).encode_prompts(pipe, uniq)
    return {c: {k: v[i] for k, v in cond.items()} for i, c in enumerate(uniq)}


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float):
    """Images in [0, 1], shape (N, H, W, C); one generator so the batch is reproducible from the seed."""
    from fed_ddp.diffusion.families import denoiser, family_of

    model = denoiser(pipe)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with unet_autocast(model):
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                   output_type="np", **family_of(pipe).sample_kwargs(pipe))
    return out.images


def is_local_pipeline(path: str) -> bool:
    return (Path(path).expanduser() / "model_index.json").exists()


def unet_autocast(unet):
    """Autocast to the denoiser's dtype when it is bf16/fp16 (DeepSpeed casts the model it trains, the server's
    included) while the pipeline's inputs and its other models stay fp32; a no-op for fp32 denoisers."""
    import contextlib

    if unet.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(unet.device.type, dtype=unet.dtype)
    return contextlib.nullcontext()


def encode_set(pipe, data: CaptionedImages) -> EncodedSet:
    table = encode_captions(pipe, data.captions)
    cond = {k: torch.stack([table[c][k] for c in data.captions]) for k in next(iter(table.values()), {})}
    return EncodedSet(encode_images(pipe, channels(data.images, pipe.vae.config.in_channels)), cond)
