"""A client: K local LoRA steps from the current global adapter, then its delta and sample count.

``LocalTrainer`` is plain PyTorch (no process group), so the same code serves the torchrun clients,
the in-process comparison baselines and the tests.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from fed_ddp.data.digits import CaptionedImages
from fed_ddp.diffusion.lora import get_flat, lora_parameters, set_flat
from fed_ddp.diffusion.loss import diffusion_loss
from fed_ddp.diffusion.models import encode_captions, encode_images
from fed_ddp.strategies import RoundPlan


def autocast_for(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on CUDA where asked ("auto" = bf16 on CUDA); fp32 on CPU."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


class LocalTrainer:
    """Holds one client's encoded data and trains the shared LoRA-wrapped UNet on it."""

    def __init__(self, pipe, scheduler, data: CaptionedImages, train_cfg, seed: int,
                 replay: CaptionedImages | None = None, replay_fraction: float = 0.0, client_id: int = 0):
        self.unet, self.scheduler, self.cfg = pipe.unet, scheduler, train_cfg
        self.device = self.unet.device
        self.seed, self.client_id = seed, client_id
        self.num_examples = len(data)
        self.latents = encode_images(pipe, _channels(data.images, pipe.vae.config.in_channels))
        captions = data.captions + (replay.captions if replay else [])
        table = encode_captions(pipe, captions)
        self.embeds = torch.stack([table[c] for c in data.captions])
        self.replay_latents = self.replay_embeds = None
        self.n_replay = 0
        if replay is not None and replay_fraction > 0:
            self.replay_latents = encode_images(pipe, _channels(replay.images, pipe.vae.config.in_channels))
            self.replay_embeds = torch.stack([table[c] for c in replay.captions])
            self.n_replay = int(round(replay_fraction * train_cfg.batch_size))
        self.params = lora_parameters(self.unet)

    def _batch(self, rng: np.random.Generator):
        n_own = self.cfg.batch_size - self.n_replay
        i = torch.from_numpy(rng.integers(0, len(self.latents), n_own))
        lat, emb = self.latents[i], self.embeds[i]
        if self.n_replay:
            j = torch.from_numpy(rng.integers(0, len(self.replay_latents), self.n_replay))
            lat, emb = torch.cat([lat, self.replay_latents[j]]), torch.cat([emb, self.replay_embeds[j]])
        return lat.to(self.device), emb.to(self.device)

    def fit(self, global_flat: torch.Tensor, plan: RoundPlan) -> tuple[torch.Tensor, dict[str, float]]:
        """Train ``plan.local_steps`` steps from ``global_flat``; return (local - global, metrics)."""
        t0 = time.perf_counter()
        set_flat(self.unet, global_flat)
        anchor = [p.detach().clone() for p in self.params] if plan.proximal_mu > 0 else None
        seed = self.seed * 1_000_003 + plan.round * 1_009 + self.client_id  # fixed per (client, round)
        rng = np.random.default_rng(seed)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        opt = torch.optim.AdamW(self.params, lr=plan.lr, weight_decay=self.cfg.weight_decay)
        self.unet.train()
        losses = []
        for _ in range(plan.local_steps):
            lat, emb = self._batch(rng)
            with autocast_for(self.device, self.cfg.mixed_precision):
                loss = diffusion_loss(self.unet, self.scheduler, lat, emb, generator=gen)
            if anchor is not None:
                loss = loss + 0.5 * plan.proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(self.params, anchor))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            opt.step()
            losses.append(loss.item())
        self.unet.eval()
        delta = get_flat(self.unet).cpu() - global_flat.cpu()
        return delta, {"train_loss": float(np.mean(losses)), "train_seconds": time.perf_counter() - t0}


def _channels(images: torch.Tensor, want: int) -> torch.Tensor:
    """Grey digits into an RGB autoencoder (or RGB into a grey one)."""
    have = images.shape[1]
    if have == want:
        return images
    if have == 1:
        return images.repeat(1, want, 1, 1)
    return images.mean(dim=1, keepdim=True).repeat(1, want, 1, 1)


@torch.no_grad()
def validation_loss(unet, scheduler, latents: torch.Tensor, embeds: torch.Tensor, seed: int = 1234,
                    batch_size: int = 256, repeats: int = 4) -> float:
    """Denoising loss on held-out data at fixed noise and timesteps (comparable across rounds)."""
    gen = torch.Generator(device=unet.device).manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(repeats):
        for i in range(0, len(latents), batch_size):
            lat, emb = latents[i:i + batch_size].to(unet.device), embeds[i:i + batch_size].to(unet.device)
            total += diffusion_loss(unet, scheduler, lat, emb, generator=gen).item() * len(lat)
            n += len(lat)
    return total / max(n, 1)
