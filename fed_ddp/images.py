"""Image grids people would rather look at than read: one row per prompt, one column per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> np.ndarray:
    """(rows, cols, H, W, C) images in [0, 1]: prompt r with seed c (each seed its own generator)."""
    from fed_ddp.diffusion.families import denoiser, family_of
    from fed_ddp.diffusion.models import unet_autocast

    model = denoiser(pipe)
    gens = [torch.Generator(device=model.device).manual_seed(s) for _ in prompts for s in seeds]
    with unet_autocast(model):
        out = pipe([p for p in prompts for _ in seeds], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np", **family_of(pipe).sample_kwargs(pipe))
    return out.images.reshape(len(prompts), len(seeds), *out.images.shape[1:])


def save_grid(grid: np.ndarray, labels: list[str], path: str | Path, cell: int = 48) -> Path:
    """Upscale each image to ``cell`` pixels (nearest) and write a labelled PNG grid."""
    rows, cols = grid.shape[:2]
    label_w = 8 * max(len(s) for s in labels) + 8 if labels else 0
    canvas = Image.new("RGB", (label_w + cols * (cell + 2), rows * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        draw.text((4, r * (cell + 2) + cell // 2 - 5), labels[r], fill="black")
        for c in range(cols):
            a = (np.clip(grid[r, c], 0, 1) * 255).astype(np.uint8)
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
            canvas.paste(im.resize((cell, cell), Image.NEAREST), (label_w + c * (cell + 2), r * (cell + 2)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
