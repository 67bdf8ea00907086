"""LoRA on the denoiser through peft: attach, read and write as one flat vector, export, import.

Adapter state goes only through peft on the unwrapped UNet (``get_peft_model_state_dict`` /
``set_peft_model_state_dict``), and the export is the file diffusers' ``load_lora_weights`` reads:
``pytorch_lora_weights.safetensors`` with peft keys prefixed ``unet.`` and the adapter config saved as
metadata (without it, ``lora_alpha != r`` silently loads with the wrong scale).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from fed_ddp.config import LoraSection
from fed_ddp.lora_names import is_lora_name

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(unet, cfg: LoraSection, seed: int = 0) -> None:
    """Freeze the UNet and inject LoRA adapters (fp32) on ``cfg.targets``; B starts at zero."""
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # A's init is part of the shared starting point: every rank must agree
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                target_modules=list(cfg.targets), init_lora_weights="gaussian"))
    for p in lora_parameters(unet):
        p.data = p.data.float()
    if not lora_parameters(unet):
        raise ValueError(f"lora.targets={list(cfg.targets)}: matched no module of the UNet")


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """Trainable LoRA parameters in a fixed (named) order: the layout of every flat vector."""
    return [p for n, p in unet.named_parameters() if p.requires_grad and is_lora_name(n)]


def num_lora_parameters(unet) -> int:
    return sum(p.numel() for p in lora_parameters(unet))


def get_flat(unet) -> torch.Tensor:
    """All LoRA parameters as one fp32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in lora_parameters(unet)])


@torch.no_grad()
def set_flat(unet, flat: torch.Tensor) -> None:
    """Write a flat vector (as produced by ``get_flat``) back into the LoRA parameters, in place."""
    params = lora_parameters(unet)
    n = sum(p.numel() for p in params)
    if flat.numel() != n:
        raise ValueError(f"adapter vector has {flat.numel()} values, the model's LoRA has {n}")
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def export_adapter(unet, out_dir: str | Path) -> Path:
    """Save the adapter as diffusers' LoRA file (loadable by ``pipe.load_lora_weights(out_dir)``)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), weight_name=WEIGHT_NAME)
    return out_dir / WEIGHT_NAME


def load_adapter(unet, path: str | Path) -> None:
    """Load an exported adapter file (or a directory holding one) into a UNet that has LoRA attached."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} adapter tensors do not fit this model "
                         f"(e.g. {unexpected[0]}); check lora.targets and lora.rank")


def adapter_config_of(path: str | Path) -> dict | None:
    """The LoRA config stored in an exported adapter's metadata (None if absent)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else None
