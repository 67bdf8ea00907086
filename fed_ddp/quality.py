"""Image quality against real images (``eval.metrics``): FID, KID and CLIP score, pooled and per client.

* FID and KID are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``) on the features of
  ``eval.fid.weights``, a local TorchScript feature network loaded with ``torch.jit.load`` (no pickled Python).
  Its input: a float32 tensor (N, 3, H, W) of integer values 0..255 (8-bit RGB; grey images repeated over the 3
  channels), at the images' own size or ``eval.fid.image_size`` (bilinear); its output: (N, D) features, from
  ``forward(img, return_features=True)`` when the forward has that argument (NVIDIA's ``inception-2015-12-05.pt``,
  StyleGAN2-ADA / clean-fid: 2048 pool features, resizing to 299 itself), else ``forward(img)``. The features are
  computed once per image set and handed to torchmetrics in float64. KID is the unbiased MMD² with torchmetrics'
  polynomial kernel (x·y/D + 1)³ over all images as one subset (a generated image per real one: no sampling).
* CLIP score is torchmetrics' definition, max(mean over pairs of 100 · cos(image embedding, caption embedding), 0),
  computed with transformers' ``CLIPModel`` / ``CLIPProcessor`` from ``eval.clip.model`` (local files only):
  torchmetrics 1.9's ``CLIPScore`` reads ``get_image_features`` as a tensor, which transformers 5 no longer returns.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from fed_ddp.errors import ConfigError

BATCH = 16  # images per generation / feature / CLIP batch
NVIDIA = "forward(img, return_features=True) -> (N, D) (NVIDIA's inception-2015-12-05.pt) or forward(img) -> (N, D)"


class _Features(torch.nn.Module):
    """torchmetrics' ``feature`` when the features are already computed: (N, D) in, the same in float64 out."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def fid_kid(real: torch.Tensor, fake: torch.Tensor, which=("fid", "kid")) -> dict[str, float]:
    """FID and KID between two feature sets (N, D), through torchmetrics, in float64. KID takes one subset of
    min(N_real, N_fake) images (all of them when the counts are equal, as ``Quality`` makes them)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out, feature = {}, _Features(real.shape[1])
    if "fid" in which:
        fid = FrechetInceptionDistance(feature=feature)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out["fid"] = float(fid.compute())
    if "kid" in which:
        with warnings.catch_warnings():  # "will save all extracted features": they are given, and bounded
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=feature, subsets=1, subset_size=min(len(real), len(fake)))
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):  # its subset permutation draws: never from the run's streams
            out["kid"] = float(kid.compute()[0])
    return out


class FeatureNet:
    """``eval.fid.weights``: the TorchScript network, called by its schema's convention (module docstring)."""

    def __init__(self, path: str, image_size: int = 0, device: torch.device | str = "cpu"):
        try:
            self.net = torch.jit.load(str(Path(path).expanduser()), map_location="cpu").eval().to(device)
        except (RuntimeError, ValueError, OSError) as e:
            raise ConfigError("eval.fid.weights", path, "is not a TorchScript archive (torch.jit.save / "
                              f"torch.jit.script(...).save; a state_dict or pickled model is not read): "
                              f"{str(e).splitlines()[0][:120]}") from None
        args = [a.name for a in self.net.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in args else {}
        self.path, self.image_size, self.device = path, image_size, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> (N, D) float64, in batches."""
        out = []
        for i in range(0, len(images), BATCH):
            x = images[i:i + BATCH].to(self.device, torch.float32)
            if self.image_size:
                x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            y = self.net(x, **self.kwargs)
            if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(x):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ConfigError("eval.fid.weights", self.path, f"the network gave {shape} for {len(x)} images, "
                                  f"not ({len(x)}, D) features: expected {NVIDIA}")
            out.append(y.double().cpu())
        return torch.cat(out)

    def check(self, size: int) -> int:
        """The pre-flight: 2 images of ``size``² must give (2, D) finite features; returns D."""
        probe = torch.arange(2 * 3 * size * size, dtype=torch.float32).reshape(2, 3, size, size) % 256
        try:
            y = self(probe)
        except RuntimeError as e:
            raise ConfigError("eval.fid.weights", self.path, f"fails on 2 RGB images of {size}x{size} "
                              f"(0..255, float32): {str(e).splitlines()[0][:120]}; expected {NVIDIA}") from None
        if not bool(torch.isfinite(y).all()):
            raise ConfigError("eval.fid.weights", self.path, f"gives non-finite features; expected {NVIDIA}")
        return int(y.shape[1])


class Clip:
    """``eval.clip.model``: CLIPModel + CLIPProcessor from a local directory."""

    def __init__(self, path: str, device: torch.device | str = "cpu", weights: bool = True):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        try:  # weights=False (the pre-flight): the config and the processor only
            self.model = (CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device) if weights
                          else CLIPConfig.from_pretrained(path, local_files_only=True))
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError("eval.clip.model", path, "is not a CLIP directory that CLIPModel and CLIPProcessor "
                              f"load: {' '.join(str(e).split())[:160]}") from None
        kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        if kind != "clip":  # CLIPConfig reads another model's config with a warning only
            raise ConfigError("eval.clip.model", path, f"holds a {kind!r} model, not a CLIP model (model_type 'clip')")
        self.device = torch.device(device)

    @torch.no_grad()
    def scores(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        """100 · cos(image, caption) per pair; ``images`` (N, H, W, 3) uint8."""
        out, n = [], self.model.config.text_config.max_position_embeddings
        for i in range(0, len(captions), BATCH):
            x = self.processor(text=captions[i:i + BATCH], images=list(images[i:i + BATCH]), return_tensors="pt",
                               padding=True, truncation=True, max_length=n)
            img = _embeds(self.model.get_image_features(pixel_values=x["pixel_values"].to(self.device)))
            txt = _embeds(self.model.get_text_features(input_ids=x["input_ids"].to(self.device),
                                                       attention_mask=x["attention_mask"].to(self.device)))
            out.append(100 * torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1).cpu())
        return torch.cat(out)


def clip_score(scores: torch.Tensor) -> float:
    """torchmetrics' CLIP score: the mean, clipped at 0."""
    return max(float(scores.mean()), 0.0)


def _embeds(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4: a tensor; 5: an output


def rgb255(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images in [0, 1] (N, H, W, C) numpy (generated) or [-1, 1] (N, C, H, W) tensor (data) -> (N, 3, H, W)
    float32 of integer values 0..255, as the images would be saved (grey repeated over 3 channels)."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) else (images + 1) / 2
    x = (x.float().clamp(0, 1) * 255).round()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3]


class Quality:
    """The server's ``eval.metrics``: real image sets (the pooled validation set; each client's held-out split
    with ``data.client_dirs``, else its own training images) and their features, fixed once; each evaluation
    generates as many images from the sets' captions with the current adapter and compares."""

    def __init__(self, cfg, data, device: torch.device | str = "cpu"):
        e, self.seed = cfg.eval, cfg.run.seed
        self.names = list(e.metrics)
        self.net = FeatureNet(e.fid.weights, e.fid.image_size, device) if {"fid", "kid"} & set(self.names) else None
        self.clip = Clip(e.clip.model, device) if "clip_score" in self.names else None
        self.scope = "val" if data.val_clients else "train"  # what a client's figures compare with: in the keys
        clients = data.val_clients or data.clients
        self.sets = {"pooled": data.val} | {c: clients[c] for c in range(min(e.metrics_clients, len(clients)))}
        self.sets = {k: _pick(d, e.metrics_images, self.seed, i) for i, (k, d) in enumerate(self.sets.items())}
        self.real = {k: self.net(rgb255(d.images)) for k, d in self.sets.items() if len(d) >= 2} if self.net else {}

    def __call__(self, pipe, steps: int, guidance_scale: float) -> dict:
        from fed_ddp.diffusion.models import generate
        from fed_ddp.seeds import eval_metrics

        got: dict = {}
        for i, (key, d) in enumerate(self.sets.items()):
            if len(d) < 2:  # a client with one image: no FID, KID or (for the key's sake) CLIP score
                got[key] = {m: None for m in self.names}
                continue
            fake = rgb255(np.concatenate([generate(pipe, d.captions[j:j + BATCH], eval_metrics(self.seed, i, j // BATCH),
                                                   steps, guidance_scale) for j in range(0, len(d), BATCH)]))
            got[key] = fid_kid(self.real[key], self.net(fake), self.names) if self.net else {}
            if self.clip is not None:
                hwc = fake.permute(0, 2, 3, 1).numpy().astype(np.uint8)
                got[key]["clip_score"] = clip_score(self.clip.scores(hwc, d.captions))
        out: dict = {}
        for m in self.names:
            out["clip_score" if m == "clip_score" else f"{m}_pooled"] = got["pooled"][m]
            per = {str(c): v[m] for c, v in got.items() if c != "pooled"}
            if per:
                out[f"{m}_clients_{self.scope}"] = per
                vals = [v for v in per.values() if v is not None]
                out[f"{m}_clients_{self.scope}_mean"] = float(np.mean(vals)) if vals else None
        return out


def _pick(d, n: int, seed: int, which: int):
    """At most ``n`` of a set's images, the same every round (seeded by the set)."""
    from fed_ddp.seeds import eval_metrics

    if len(d) <= n:
        return d
    return d.subset(np.sort(np.random.default_rng(eval_metrics(seed, which, -1)).choice(len(d), n, replace=False)))


def check(cfg) -> None:
    """The pre-flight of ``eval.metrics``: the feature network loads and gives (2, D) features, the CLIP directory
    loads (each failure one line naming the key)."""
    e = cfg.eval
    if {"fid", "kid"} & set(e.metrics):
        FeatureNet(e.fid.weights, e.fid.image_size).check(e.fid.image_size or cfg.data.resolution)
    if "clip_score" in e.metrics:
        Clip(e.clip.model, weights=False)
