"""Client objectives: the loss a client minimises, by name (``train.objective``).

An objective is a class built once per trainer from the ``train`` config group; ``loss`` gets what one
micro-batch gives (latents, conditioning, noise, timesteps, and a generator of its own for any extra draw,
seeded per client and round apart from the batches' stream: ``seeds.client_objective``) and returns (the loss, its metrics). The names in ``metrics`` are reported per client: the mean over the
round's steps travels up in the client's message (fp32, a fixed slot per name: sizes still follow from the
config) and appears per client in the round's record. ``families`` lists where it is defined (None: every one).
While a client trains, ``self.plan`` is the round's ``RoundPlan``: ``self.plan.values`` holds the numbers the
strategy sends every client (its ``plan_values``).

Built-ins, as diffusers' training scripts define them:

- ``mse``: the family's own loss (ε / v prediction, or flow matching), what every run trained with before.
- ``min_snr``: Min-SNR-γ weighting (Hang et al. 2023, arXiv 2303.09556; ``--snr_gamma``): each example's MSE
  weighted by min(SNR(t), γ) / SNR(t) (ε prediction) or / (SNR(t) + 1) (v prediction), SNR from diffusers'
  ``compute_snr``; ``train.snr_gamma``. Families with a DDPM-style noise schedule (sd, sdxl).
- ``noise_offset``: ``train.noise_offset`` × N(0, 1) per example and channel added to the noise (``--noise_offset``),
  drawn from the objective's generator. Families sd, sdxl.
- ``prior``: DreamBooth's prior preservation (Ruiz et al. 2023, arXiv 2208.12242; ``--with_prior_preservation``,
  ``--prior_loss_weight``): the family's loss on the client's batch plus ``train.prior_loss_weight`` × the same
  loss on as many of the client's class images, which each client generates itself from ``train.prior_prompts``
  with the frozen base (adapters off: what the base drew before any training), ``train.prior_images`` per prompt
  in ``train.prior_steps`` steps, seeded per client (``seeds.client_prior``), so no class image leaves a client
  and a re-built trainer (a resume, a cache miss) draws the same ones. Reports ``prior_loss``. diffusers'
  script concatenates instance and class examples in one forward; here they are two forwards of the same
  model, which gives the same loss (the denoisers normalise per example) and keeps the batch's shape.

An objective may override ``prepare(ctx)``: called once when a client's trainer is built, before any step, with a
``Context`` (the client, the frozen pipeline, and functions to generate with it, encode images as the client's
data is encoded, and switch the adapters off); ``prior`` generates and encodes its class images there.

A user's objective is registered with ``register`` (a module in ``run.plugins``) or named ``package.module:Name``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fed_ddp.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """What ``Objective.prepare`` gets: the client, the frozen pipeline, and the trainer's own tools for it."""

    pipe: object  # the diffusers pipeline (its denoiser carries the adapter being trained)
    client_id: int
    run_seed: int
    generate: Callable  # (prompts, seed, steps) -> images in [-1, 1] (N, C, H, W), guidance off, one seeded generator
    encode: Callable  # (images in [-1, 1], captions) -> EncodedSet (latents, conditioning), as the client's data is
    base_only: Callable  # () -> a context manager in which the denoiser's adapters are off (the base itself)


class Objective:
    families: tuple[str, ...] | None = None  # model.family values it is defined for (None: every family)
    metrics: tuple[str, ...] = ()  # per-client numbers it reports (the mean over the round's steps)
    plan = None  # the round's strategies.RoundPlan while a client trains (plan.values: the strategy's plan values)

    def __init__(self, train_cfg):
        self.cfg = train_cfg

    def prepare(self, ctx: Context) -> None:
        """Per-client set-up, once, before the client's first step (default: nothing)."""

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class MSE(Objective):
    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        return family.loss(model, scheduler, latents, cond, noise, t), {}


class MinSNR(Objective):
    families = ("sd", "sdxl")

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        from diffusers.training_utils import compute_snr

        noisy = scheduler.add_noise(latents, noise, t)
        target = family.target(scheduler, latents, noise, t)
        per = F.mse_loss(family.predict(model, noisy, t, cond).float(), target.float(), reduction="none")
        per = per.mean(dim=list(range(1, per.dim())))
        snr = compute_snr(scheduler, t).to(per.device)
        weight = torch.clamp(snr, max=self.cfg.snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        return (per * weight).mean(), {}


class NoiseOffset(Objective):
    families = ("sd", "sdxl")

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(noise)
        return family.loss(model, scheduler, latents, cond, noise + self.cfg.noise_offset * offset, t), {}


class Prior(Objective):
    metrics = ("prior_loss",)

    def prepare(self, ctx):
        from fed_ddp.seeds import client_prior

        c = self.cfg
        prompts = [p for p in c.prior_prompts for _ in range(c.prior_images)]
        with ctx.base_only():  # the base's own prior, whatever adapter the worker holds now
            images = ctx.generate(prompts, client_prior(ctx.run_seed, ctx.client_id), c.prior_steps)
        enc = ctx.encode(images, prompts)
        self.latents, self.cond = enc.latents, enc.cond

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        from fed_ddp.diffusion.families.sd import to_device

        i = torch.randint(0, len(self.latents), (latents.shape[0],), generator=generator)
        lat = to_device(self.latents[i], latents.device)
        pc = {k: to_device(v[i], latents.device) for k, v in self.cond.items()}
        pn, pt = family.draw(lat, scheduler, generator)  # on the latents' device
        prior = family.loss(model, scheduler, lat, pc, pn, pt)
        instance = family.loss(model, scheduler, latents, cond, noise, t)
        return instance + self.cfg.prior_loss_weight * prior, {"prior_loss": prior.detach()}


REGISTRY: dict[str, type[Objective]] = {"mse": MSE, "min_snr": MinSNR, "noise_offset": NoiseOffset, "prior": Prior}


def register(name: str, cls: type[Objective]) -> None:
    if name in REGISTRY:
        raise ValueError(f"objective {name!r} is already registered")
    REGISTRY[name] = cls


def lookup(name: str, key: str = "train.objective") -> type[Objective]:
    from fed_ddp.plugins import lookup as find

    known = name in REGISTRY
    cls = find(REGISTRY, name, key, Objective, " or package.module:Name")
    if not known and (bad := [m for m in cls.metrics if not m.isidentifier()]):
        del REGISTRY[name]
        raise ConfigError(key, name, f"metric {bad[0]!r}: metric names must be identifiers")
    return cls
