"""Built-in demo data: scikit-learn's bundled handwritten digits (1797 grey 8x8 images), captioned.

No download: ``sklearn.datasets.load_digits`` ships inside scikit-learn. Pixels are scaled to
[-1, 1] and each image gets the caption "a handwritten digit <word>".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fed_ddp.diffusion.tiny import caption


@dataclass
class CaptionedImages:
    """Images in [-1, 1] (N, C, H, W), their captions and integer labels (-1 when unknown)."""

    images: torch.Tensor
    captions: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, idx) -> CaptionedImages:
        idx = np.asarray(idx, dtype=np.int64)
        return CaptionedImages(self.images[torch.from_numpy(idx)], [self.captions[i] for i in idx], self.labels[idx])


def load_digits_dataset() -> CaptionedImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    labels = d.target.astype(np.int64)
    return CaptionedImages(images, [caption(int(y)) for y in labels], labels)


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Deterministic random split of range(n) into len(fractions)+1 parts (the last takes the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([round(f * n) for f in fractions])
    return np.split(perm, cuts)
