"""Training data as the denoiser sees it: VAE latents and the family's conditioning tensors."""

from __future__ import annotations

import torch


class EncodedSet:
    """Images as VAE latents and captions as the family's conditioning tensors (``cond``: name -> (N, ...);
    ``embeds`` the text states, SDXL/SD3/Flux add ``pooled`` and SDXL ``time_ids``), ready for training steps."""

    def __init__(self, latents: torch.Tensor, cond: dict[str, torch.Tensor]):
        self.latents, self.cond = latents, cond

    @property
    def embeds(self) -> torch.Tensor:
        return self.cond["embeds"]

    def __len__(self) -> int:
        return len(self.latents)


def take(cond: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The rows ``index`` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def channels(images: torch.Tensor, want: int) -> torch.Tensor:
    """Grey digits into an RGB autoencoder (or RGB into a grey one)."""
    have = images.shape[1]
    if have == want:
        return images
    if have == 1:
        return images.repeat(1, want, 1, 1)
    return images.mean(dim=1, keepdim=True).repeat(1, want, 1, 1)
