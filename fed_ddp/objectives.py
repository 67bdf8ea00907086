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

A user's objective is registered with ``register`` (a module in ``run.plugins``) or named ``package.module:Name``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fed_ddp.errors import ConfigError


class Objective:
    families: tuple[str, ...] | None = None  # model.family values it is defined for (None: every family)
    metrics: tuple[str, ...] = ()  # per-client numbers it reports (the mean over the round's steps)
    plan = None  # the round's strategies.RoundPlan while a client trains (plan.values: the strategy's plan values)

    def __init__(self, train_cfg):
        self.cfg = train_cfg

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


REGISTRY: dict[str, type[Objective]] = {"mse": MSE, "min_snr": MinSNR, "noise_offset": NoiseOffset}


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
