"""Model families: what differs between SD 1.5, SDXL, SD3 and Flux, behind one small interface.

A family is a class (``SD`` or a subclass) that declares its facts as class attributes: its ``name``, its
diffusers pipeline class (``pipeline_class_name``), which module carries the LoRA (``denoiser_attr``: ``unet``
or ``transformer``) and its class (``denoiser_class_name``), its ``default_targets``, and how to recognise its
denoiser config (``recognises``). Its methods say how prompts become conditioning tensors, the training loss
(ε / v prediction or flow matching), the sampling arguments, the LoRA export, and how to build a tiny base.
Everything else (clients, server, codecs, strategies, DeepSpeed, population, privacy) sees only the
denoiser module and a dict of per-sample conditioning tensors::

    fam = family_of(pipe)               # the family that loaded the pipeline (else: by its class)
    model = fam.denoiser(pipe)          # pipe.unet or pipe.transformer
    cond = fam.encode_prompts(pipe, captions)       # {"embeds": (N, L, D), ...}
    noise, t = fam.draw(latents, scheduler, generator)
    loss = fam.loss(model, scheduler, latents, cond, noise, t)

Families are a registry (``model.family``, a registered name or ``package.module:Name``): the four built-ins
are registered below as a plug-in registers its own, with ``register`` from a module in ``run.plugins``.
Nothing here imports diffusers (the launcher's pre-flight reads these classes).
"""

from __future__ import annotations

import json
from pathlib import Path

from fed_ddp.diffusion.families.flux import Flux
from fed_ddp.diffusion.families.sd import SD
from fed_ddp.diffusion.families.sd3 import SD3
from fed_ddp.diffusion.families.sdxl import SDXL

REGISTRY: dict[str, type[SD]] = {}


def register(name: str, cls: type[SD]) -> None:
    if name in REGISTRY:
        raise ValueError(f"family {name!r} is already registered")
    REGISTRY[name] = cls


for _cls in (SD, SDXL, SD3, Flux):
    register(_cls.name, _cls)


def lookup(name: str, key: str = "model.family") -> type[SD]:
    """The family class of ``model.family`` (a registered name or ``package.module:Name``); one line otherwise."""
    from fed_ddp.plugins import lookup as find

    return find(REGISTRY, name, key, SD, " or package.module:Name")


def get_family(name: str) -> SD:
    """The family object for ``model.family``."""
    return lookup(name)()


def family_of(pipe) -> SD:
    """The family of a diffusers pipeline: the one that loaded it (``SD.load``), else the first registered
    family of its class (a pipeline built or loaded by diffusers itself)."""
    name = type(pipe).__name__
    cls = getattr(pipe, "fed_ddp_family", None) or next(
        (c for c in REGISTRY.values() if c.pipeline_class_name == name), None)
    if cls is None:
        raise ValueError(f"{name}: not a pipeline fed_ddp trains (one of {pipeline_classes()})")
    return cls()


def denoiser(pipe):
    """The module that carries the LoRA: ``pipe.unet`` or ``pipe.transformer``."""
    unet = getattr(pipe, "unet", None)
    return pipe.transformer if unet is None else unet


def pipeline_classes() -> list[str]:
    return sorted({c.pipeline_class_name for c in REGISTRY.values()})


def denoiser_classes() -> list[str]:
    return sorted({c.denoiser_class_name for c in REGISTRY.values()})


def config_family(config: dict) -> str | None:
    """The first registered family that recognises a denoiser config; None: not a denoiser fed_ddp trains."""
    return next((name for name, cls in REGISTRY.items() if cls.recognises(config)), None)


def family_of_model(model) -> str:
    """The family name of a denoiser module, for its default targets and its export."""
    model = getattr(model, "module", model)
    family = config_family({**model.config, "_class_name": type(model).__name__})
    if family is None:
        raise ValueError(f"{type(model).__name__}: not a denoiser fed_ddp trains")
    return family


def pipeline_class_at(path: str | Path) -> str | None:
    """The pipeline class a diffusers pipeline directory names in its model_index.json (None: none readable)."""
    index = Path(path).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def detect_family(path: str | Path) -> str | None:
    """The first registered family of a pipeline directory's class (None: not one we know)."""
    cls = pipeline_class_at(path)
    return next((name for name, c in REGISTRY.items() if c.pipeline_class_name == cls), None)
