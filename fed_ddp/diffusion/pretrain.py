"""Pretrain the built-in tiny base on part of the digits, and cache it as a diffusers pipeline directory.

The base knows some concepts (digits 0-4 by default) and not the others, so federated fine-tuning on
the clients' private concepts (5-9) visibly matters. Run it with ``fed-ddp pretrain CONFIG``; ``fed-ddp
run`` calls it too when the cache is empty. Two stages, both from scratch and deterministic per seed:

1. the autoencoder (reconstruction + a small KL term), then its latent scale set to 1 / std;
2. the UNet and the text encoder jointly, on latents, with a share of empty captions.

The other families (``model.family=sdxl|sd3|flux``: their ``tiny_text_encoder`` is false) get the same
autoencoder recipe (flow families with a latent shift, as SD3's and Flux's autoencoders have) and then train
their denoiser alone, with the family's own loss, on conditioning that their pipeline computes from frozen,
randomly initialised text encoders (random projections of the words still tell the digits apart; the real
families' encoders come pretrained)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fed_ddp.config import PretrainSection
from fed_ddp.data.digits import load_digits_dataset
from fed_ddp.diffusion import tiny
from fed_ddp.diffusion.families import get_family

log = logging.getLogger(__name__)
RECIPE_VERSION = 1  # bump when the recipe below changes, so caches are rebuilt


def cache_path(cfg: PretrainSection, cache_dir: str, family: str = "sd") -> Path:
    key = json.dumps({"v": RECIPE_VERSION, **asdict(cfg), **({"family": family} if family != "sd" else {})},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    tag = "" if family == "sd" else "-" + re.sub(r"[^\w.-]", "_", family)  # a package.module:Name or file.py:Name too
    return Path(cache_dir).expanduser() / f"tiny-digits{tag}-{digest}"


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    while True:
        for i in np.array_split(rng.permutation(n), max(1, n // batch_size)):
            yield torch.from_numpy(i)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, show: bool,
              shift: bool = False):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    batches = _batches(len(images), batch_size, np.random.default_rng(seed))
    vae.train()
    for _ in tqdm(range(steps), desc="pretrain autoencoder", disable=not show):
        x = images[next(batches)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-4 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        if shift:  # SD3 / Flux autoencoders: latents = (z - shift_factor) * scaling_factor
            vae.register_to_config(shift_factor=float(mean.mean()))
        err = F.mse_loss(vae.decode(mean).sample, images).item()
    return err


def train_base(family, unet, text_encoder, tokenizer, scheduler, latents, captions, cfg: PretrainSection, show: bool):
    """SD's recipe: the UNet and its text encoder together, with the family's loss."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    batches = _batches(len(latents), cfg.batch_size, rng)
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="pretrain denoiser", disable=not show):
        i = next(batches)
        batch_ids = ids[i].clone()
        drop = torch.from_numpy(rng.random(len(i)) < cfg.empty_caption_fraction)
        batch_ids[drop] = empty
        emb = text_encoder(batch_ids).last_hidden_state
        noise, t = family.draw(latents[i], scheduler, gen)
        loss = family.loss(unet, scheduler, latents[i], {"embeds": emb}, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval()
    text_encoder.eval()
    return float(np.mean(losses[-50:]))


def train_denoiser(pipe, family, latents, captions, cfg: PretrainSection, show: bool):
    """The other families: the denoiser alone, on the family's conditioning of frozen text encoders."""
    from fed_ddp.data.encoded import take

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    model, scheduler = family.denoiser(pipe), family.training_scheduler(pipe)
    uniq = sorted(set(captions))
    table = family.encode_prompts(pipe, uniq + [""])  # row len(uniq): the empty caption
    row = torch.tensor([uniq.index(c) for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = _batches(len(latents), cfg.batch_size, rng)
    model.requires_grad_(True)
    model.train()
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc=f"pretrain {family.name} denoiser", disable=not show):
        i = next(batches)
        rows = row[i].clone()
        rows[torch.from_numpy(rng.random(len(i)) < cfg.empty_caption_fraction)] = len(uniq)
        noise, t = family.draw(latents[i], scheduler, gen)
        loss = family.loss(model, scheduler, latents[i], take(table, rows), noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    model.requires_grad_(False)
    return float(np.mean(losses[-50:]))


def pretrain_tiny_base(cfg: PretrainSection, out_dir: str | Path, show_progress: bool = True,
                       family: str = "sd") -> Path:
    """Train the tiny base of ``family`` on ``cfg.digits`` and save it as that family's pipeline directory."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data = load_digits_dataset()
    data = data.subset(np.flatnonzero(np.isin(data.labels, cfg.digits)))
    fam = get_family(family)
    if fam.tiny_text_encoder:  # SD's layout and recipe
        vae, text_encoder, unet = tiny.build_vae(), tiny.build_text_encoder(), fam.tiny_denoiser()
    else:
        vae, pipe = tiny.build_vae(), fam.tiny_pipeline()
    vae_err = train_vae(vae, data.images, cfg.vae_steps, cfg.batch_size, cfg.lr, cfg.seed, show_progress,
                        shift=fam.flow)
    with torch.no_grad():
        shift = vae.config.get("shift_factor") or 0.0
        latents = (vae.encode(data.images).latent_dist.mean - shift) * vae.config.scaling_factor
    if fam.tiny_text_encoder:
        tokenizer, scheduler = tiny.build_tokenizer(), tiny.build_scheduler()
        loss = train_base(fam, unet, text_encoder, tokenizer, scheduler, latents, data.captions, cfg, show_progress)
        pipe = tiny.build_pipeline(unet=unet, vae=vae, text_encoder=text_encoder)
    else:
        pipe.register_modules(vae=vae)
        loss = train_denoiser(pipe, fam, latents, data.captions, cfg, show_progress)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    info = {"family": family, "digits": cfg.digits, "vae_recon_mse": vae_err, "final_loss": loss,
            "seconds": round(time.perf_counter() - t0, 1), "recipe": asdict(cfg)}
    (tmp / "fed_ddp_base.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a half-written base is never mistaken for a cached one
    log.info("tiny base saved to %s (%.0f s, autoencoder mse %.4f, denoiser loss %.4f)",
             out_dir, info["seconds"], vae_err, loss)
    return out_dir


def ensure_tiny_base(cfg: PretrainSection, cache_dir: str, show_progress: bool = True, family: str = "sd") -> Path:
    path = cache_path(cfg, cache_dir, family)
    if (path / "model_index.json").exists():
        return path
    log.info("no cached tiny %s base at %s: pretraining it now (a few minutes on 2 CPU cores)", family, path)
    return pretrain_tiny_base(cfg, path, show_progress, family)
