"""A family's denoiser on the ``meta`` device: shapes, no weights (Flux's 12 B parameters cost no memory).

Its config comes from ``--denoiser`` (a name shipped in ``fed_ddp/diffusion/configs``, a ``config.json`` or a
model directory), else ``model.pretrained`` (a local directory, a known hub id whose config ships here, or the
hub), else the family's built-in tiny base. Used by ``fed-ddp plan``, the pre-flight and the simulated cell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fed_ddp.diffusion.families import SD, config_family, denoiser_classes, get_family, lookup
from fed_ddp.errors import ConfigError

if TYPE_CHECKING:
    from fed_ddp.config import RunConfig

UNET_CONFIGS = Path(__file__).parent / "configs"  # the shipped denoiser configs (not only UNets)
# name -> (family, published config.json shipped in UNET_CONFIGS)
BUILTIN_DENOISERS = {"sd15": ("sd", "sd15_unet.json"), "sdxl": ("sdxl", "sdxl_unet.json"),
                     "sd3-medium": ("sd3", "sd3_medium_transformer.json"),
                     "flux1-dev": ("flux", "flux1_dev_transformer.json"),
                     "flux1-schnell": ("flux", "flux1_schnell_transformer.json")}
# hub ids whose denoiser config ships here (so `plan` needs no network for them): the same published config
KNOWN_HUB_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
                 "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
                 "stabilityai/stable-diffusion-3-medium-diffusers": "sd3-medium",
                 "black-forest-labs/FLUX.1-dev": "flux1-dev", "black-forest-labs/FLUX.1-schnell": "flux1-schnell"}


def read_denoiser(denoiser: str) -> tuple[dict, str, str]:
    """(config, where it came from, family) of ``--denoiser``: a shipped name, a config.json or a model directory."""
    if denoiser in BUILTIN_DENOISERS:
        family, file = BUILTIN_DENOISERS[denoiser]
        return json.loads((UNET_CONFIGS / file).read_text()), f"{denoiser} ({UNET_CONFIGS / file})", family
    path = Path(denoiser).expanduser()
    if path.is_dir():
        path = next((c for c in (path / "unet" / "config.json", path / "transformer" / "config.json",
                                 path / "config.json") if c.is_file()), path)
    if not path.is_file():
        raise ConfigError("--denoiser", denoiser, f"must be one of {sorted(BUILTIN_DENOISERS)}, a denoiser config.json "
                          "or a diffusers directory with unet/config.json or transformer/config.json")
    config = json.loads(path.read_text())
    family = config_family(config)
    if family is None:
        raise ConfigError("--denoiser", denoiser, f"{path} holds a {config.get('_class_name')}, not one of "
                          f"{denoiser_classes()}")
    return config, str(path), family


def denoiser_config(cfg: RunConfig, denoiser: str | None = None) -> tuple[dict | None, str, str]:
    """(denoiser config, where it came from, family); None config = the family's built-in tiny base."""
    family = cfg.model.family
    fam = lookup(family)
    if denoiser:
        config, source, found = read_denoiser(denoiser)
        # main() sets model.family from --denoiser: only an explicit override differs (a plug-in family may own it)
        if found != family and not fam.recognises(config):
            raise ConfigError("--denoiser", denoiser, f"is a {found} denoiser, but model.family={family}")
        return config, source, family
    if not cfg.model.pretrained:
        return None, f"built-in tiny {family} base", family
    attr, cls = fam.denoiser_attr, fam.denoiser_class_name
    local = Path(cfg.model.pretrained).expanduser() / attr / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local), family
    if cfg.model.pretrained in KNOWN_HUB_IDS:
        name = KNOWN_HUB_IDS[cfg.model.pretrained]
        found, file = BUILTIN_DENOISERS[name]
        if found != family and lookup(found).pipeline_class_name != fam.pipeline_class_name:
            raise ConfigError("model.pretrained", cfg.model.pretrained, f"is a {found} model: set model.family={found}")
        return (json.loads((UNET_CONFIGS / file).read_text()),
                f"{cfg.model.pretrained} (its {attr} config, shipped as {file})", family)
    import warnings

    import diffusers

    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument: not the user's
            warnings.simplefilter("ignore", UserWarning)
            loaded = getattr(diffusers, cls).load_config(cfg.model.pretrained, subfolder=attr,
                                                         revision=cfg.model.revision)
        return dict(loaded), f"{cfg.model.pretrained} (hub)", family
    except (OSError, ValueError) as e:  # offline, unknown repo, bad id
        raise ConfigError("model.pretrained", cfg.model.pretrained,
                          f"cannot read its {attr}/config.json ({type(e).__name__}); "
                          "give a local directory or --denoiser CONFIG.json") from None


def unet_config(cfg: RunConfig, unet: str | None = None) -> tuple[dict | None, str]:
    """(denoiser config, where it came from): ``denoiser_config`` without the family."""
    config, source, _ = denoiser_config(cfg, unet)
    return config, source


def meta_denoiser(config: dict | None, family: str | SD = "sd") -> torch.nn.Module:
    """The family's (a name or a family object) denoiser with the shapes of ``config`` and no weights (``meta``
    device); None: its tiny base."""
    fam = family if isinstance(family, SD) else get_family(family)
    with torch.device("meta"):
        return fam.tiny_denoiser() if config is None else fam.denoiser_class().from_config(config)


def meta_unet(config: dict | None) -> torch.nn.Module:
    """The UNet (or any denoiser, by its config's class) with the shapes of ``config``, no weights."""
    return meta_denoiser(config, (config_family(config) or "sd") if config else "sd")
