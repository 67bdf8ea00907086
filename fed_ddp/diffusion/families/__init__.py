"""Model families: what differs between SD 1.5, SDXL, SD3 and Flux, behind one small interface.

A family knows its diffusers pipeline class, which module carries the LoRA (``unet`` or ``transformer``)
and its default targets, how prompts become conditioning tensors, the training loss (ε / v prediction
or flow matching), the sampling arguments, the LoRA export, and how to build a tiny base from configs.
Everything else (clients, server, codecs, strategies, DeepSpeed, population, privacy) sees only the
denoiser module and a dict of per-sample conditioning tensors::

    fam = family_of(pipe)               # from the pipeline's class
    model = fam.denoiser(pipe)          # pipe.unet or pipe.transformer
    cond = fam.encode_prompts(pipe, captions)       # {"embeds": (N, L, D), ...}
    noise, t = fam.draw(latents, scheduler, generator)
    loss = fam.loss(model, scheduler, latents, cond, noise, t)
"""

from __future__ import annotations

import json
from pathlib import Path

from fed_ddp.errors import ConfigError

NAMES = ("sd", "sdxl", "sd3", "flux")

# what each family's pipeline class and denoiser are called (model_index.json `_class_name`, plan, README)
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
DENOISERS = {"sd": ("unet", "UNet2DConditionModel"), "sdxl": ("unet", "UNet2DConditionModel"),
             "sd3": ("transformer", "SD3Transformer2DModel"), "flux": ("transformer", "FluxTransformer2DModel")}
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT = ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # MM-DiT: the text stream's projections
# default LoRA targets (`lora.targets: []`): those of diffusers' LoRA training scripts for each family
DEFAULT_TARGETS = {"sd": ATTENTION, "sdxl": ATTENTION, "sd3": JOINT,
                   "flux": JOINT + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]}


def get_family(name: str):
    """The family object for ``model.family``."""
    if name not in NAMES:
        raise ConfigError("model.family", name, f"must be one of {list(NAMES)}")
    if name == "sd":
        from fed_ddp.diffusion.families.sd import SD as cls
    elif name == "sdxl":
        from fed_ddp.diffusion.families.sdxl import SDXL as cls
    elif name == "sd3":
        from fed_ddp.diffusion.families.sd3 import SD3 as cls
    else:
        from fed_ddp.diffusion.families.flux import Flux as cls
    return cls()


def family_of(pipe):
    """The family of a loaded diffusers pipeline (by its class)."""
    name = type(pipe).__name__
    for fam, cls in PIPELINES.items():
        if cls == name:
            return get_family(fam)
    raise ValueError(f"{name}: not a pipeline fed_ddp trains (one of {sorted(PIPELINES.values())})")


def denoiser(pipe):
    """The module that carries the LoRA: ``pipe.unet`` or ``pipe.transformer``."""
    unet = getattr(pipe, "unet", None)
    return pipe.transformer if unet is None else unet


def config_family(config: dict) -> str | None:
    """The family of a denoiser config (its ``_class_name``; an SDXL UNet adds ``text_time`` conditioning,
    SD and SDXL share one UNet class); None: not a denoiser fed_ddp trains."""
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls == "UNet2DConditionModel":
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    return next((fam for fam, (_, name) in DENOISERS.items() if name == cls), None)


def family_of_model(model) -> str:
    """The family name of a denoiser module, for its default targets and its export."""
    model = getattr(model, "module", model)
    family = config_family({**model.config, "_class_name": type(model).__name__})
    if family is None:
        raise ValueError(f"{type(model).__name__}: not a denoiser fed_ddp trains")
    return family


def detect_family(path: str | Path) -> str | None:
    """The family of a diffusers pipeline directory, from its model_index.json (None: not one we know)."""
    index = Path(path).expanduser() / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None
    return next((fam for fam, name in PIPELINES.items() if name == cls), None)
