"""LoRA on the denoiser through peft: attach, read and write as one flat vector, export, import; and the
full fine-tuning baseline (``train.method=full``), where the flat vector is every UNet weight.

Adapter state goes only through peft on the unwrapped UNet (``get_peft_model_state_dict`` /
``set_peft_model_state_dict``), and the export is the file diffusers' ``load_lora_weights`` reads:
``pytorch_lora_weights.safetensors`` with peft keys prefixed ``unet.`` and the adapter config saved as
metadata (without it, ``lora_alpha != r`` silently loads with the wrong scale).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from fed_ddp.config import LoraSection
from fed_ddp.lora_names import PERSONAL, is_personal_name, personal_named, trainable_named

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"  # train.method=full: the whole UNet, diffusers format (UNet2DConditionModel.from_pretrained)


def prepare_trainable(unet, cfg) -> None:
    """Make ``unet`` trainable the way ``cfg.train.method`` says (``cfg``: a RunConfig): ``lora`` attaches
    adapters on ``cfg.lora.targets``; ``full`` trains every UNet weight (fp32). The strategy's ``frozen_factors``
    (``fed.strategy=ffa_lora``: A) stay frozen at their shared initialisation (from ``run.seed``), never sent.
    With ``personal.mode=split`` a second adapter, ``personal``, is attached and active next to the shared one."""
    if cfg.train.method == "full":
        unet.requires_grad_(True)
        for p in unet.parameters():
            p.data = p.data.float()
        return
    attach_lora(unet, cfg.lora, seed=cfg.run.seed)
    if cfg.personal.mode == "split":
        attach_personal(unet, cfg.lora, cfg.personal.rank)
    from fed_ddp.strategies import REGISTRY

    frozen = REGISTRY[cfg.fed.strategy].frozen_factors  # FFA-LoRA: A. The shared adapter's only: a personal
    for name, p in unet.named_parameters():             # adapter is never averaged
        if any(f".{f}." in name for f in frozen) and not is_personal_name(name):
            p.requires_grad_(False)


def attach_lora(unet, cfg: LoraSection, seed: int = 0) -> None:
    """Freeze the denoiser and inject LoRA adapters (fp32) on ``cfg.targets`` (empty: the family's default
    targets); B starts at zero."""
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # A's init is part of the shared starting point: every rank must agree
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                target_modules=targets_of(unet, cfg), init_lora_weights="gaussian"))
    for p in lora_parameters(unet):
        p.data = p.data.float()
    if not lora_parameters(unet):
        raise ValueError(f"lora.targets={list(cfg.targets)}: matched no module of the {type(unet).__name__}")


def targets_of(model, cfg: LoraSection) -> list[str]:
    """``cfg.targets``, or the default targets of the model's family when empty."""
    from fed_ddp.diffusion.families import family_of_model, lookup

    return list(cfg.targets) or list(lookup(family_of_model(model)).default_targets)


def attach_personal(unet, cfg: LoraSection, rank: int | None = None) -> None:
    """Add the personal adapter (peft adapter ``personal``) on ``cfg.targets`` at ``rank`` (None: ``cfg.rank``), at
    the shared adapter's scale alpha/r and without dropout (so the shared adapter's dropout draws stay as they
    are), and make both adapters active with weight 1. Its initial values are replaced per client
    (``init_personal``); the global random stream is left untouched."""
    rank = rank or cfg.rank
    with torch.random.fork_rng(devices=[]):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=cfg.alpha * rank / cfg.rank, lora_dropout=0.0,
                                    target_modules=targets_of(unet, cfg), init_lora_weights="gaussian"),
                         adapter_name=PERSONAL)
    unet.set_adapters(["default", PERSONAL], [1.0, 1.0])  # both active and trainable
    for _, p in personal_named(unet):
        p.data = p.data.float()


@torch.no_grad()
def init_personal(unet, seed: int) -> dict[str, torch.Tensor]:
    """Re-initialise the personal adapter as peft does (A gaussian, B = 0) from ``seed``; its tensors (copies)."""
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in unet.modules():
            if isinstance(module, LoraLayer) and PERSONAL in module.lora_A:
                module.reset_lora_parameters(PERSONAL, "gaussian")
    return personal_state(unet)


def personal_state(unet) -> dict[str, torch.Tensor]:
    """The personal adapter's tensors by parameter name (CPU copies)."""
    return {n: p.detach().cpu().clone() for n, p in personal_named(unet)}


@torch.no_grad()
def set_personal(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``personal_state`` tensors back into the personal adapter (every one of its parameters)."""
    named = personal_named(unet)
    if set(tensors) != {n for n, _ in named}:
        raise ValueError(f"personal adapter state has {len(tensors)} tensors, the model's personal adapter {len(named)}")
    for n, p in named:
        p.copy_(tensors[n])


@torch.no_grad()
def clear_personal(unet) -> None:
    """Zero the personal adapter's B factors: the model is then the shared adapter alone, exactly."""
    for n, p in personal_named(unet):
        if ".lora_B." in n:
            p.zero_()


def export_personal(unet, out_dir: str | Path) -> Path:
    """Save the personal adapter as a diffusers LoRA file of its own
    (``pipe.load_lora_weights(out_dir, adapter_name=...)`` loads it next to the shared one)."""
    return _save(unet, out_dir, PERSONAL)


@contextlib.contextmanager
def merged_lora(model):
    """Inference with the active LoRA adapters merged into their base weights (peft's ``merge``): one matmul per
    layer instead of three, 1.5x faster sampling on the tiny UNet. The base weights are copied first and
    restored bit for bit afterwards (peft's ``unmerge`` subtracts, which rounds). A zero B (an untrained
    adapter) merges to the base weights exactly. It does nothing (the adapter stays a separate branch) where a
    merge would change what is computed or cannot be undone by a copy: base weights in bf16/fp16 (DeepSpeed's
    cast: W + BA would round the update away relative to |W|), ZeRO-3's partitioned weights, DoRA, layer types
    other than peft's LoRA Linear / Conv / Embedding."""
    from peft.tuners.lora.layer import Embedding, Linear, _ConvNd
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters]
    mergeable = all(isinstance(m, (Linear, _ConvNd, Embedding)) and not any(m.use_dora.values())
                    and not getattr(m, "lora_variant", None)
                    and all(p.dtype == torch.float32 for p in m.get_base_layer().parameters(recurse=False))
                    for m in layers)
    if not layers or not mergeable or any(hasattr(p, "ds_shape") for p in model.parameters()):
        yield
        return
    saved = [(m, {n: p.detach().clone() for n, p in m.get_base_layer().named_parameters(recurse=False)})
             for m in layers]
    try:
        for m in layers:
            m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, params in saved:
                base = m.get_base_layer()
                for n, value in params.items():
                    getattr(base, n).copy_(value)
                m.merged_adapters = []


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The trained parameters in a fixed (named) order, the layout of every flat vector: the LoRA parameters,
    or every UNet weight under ``train.method=full`` (``lora_names.trainable_named``)."""
    return [p for _, p in trainable_named(unet)]


def num_lora_parameters(unet) -> int:
    return sum(p.numel() for p in lora_parameters(unet))


def get_flat(unet) -> torch.Tensor:
    """All trained parameters (``lora_parameters``) as one fp32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in lora_parameters(unet)])


@torch.no_grad()
def set_flat(unet, flat: torch.Tensor) -> None:
    """Write a flat vector (as produced by ``get_flat``) back into the trained parameters, in place."""
    params = lora_parameters(unet)
    n = sum(p.numel() for p in params)
    if flat.numel() != n:
        raise ValueError(f"adapter vector has {flat.numel()} values, the model's trained parameters {n}")
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def export_adapter(unet, out_dir: str | Path) -> Path:
    """Save the adapter as diffusers' LoRA file through the family's pipeline class (``unet_lora_layers`` or
    ``transformer_lora_layers``), so that family's ``pipe.load_lora_weights(out_dir)`` loads it."""
    return _save(unet, out_dir, "default")


def _save(model, out_dir: str | Path, adapter: str) -> Path:
    from fed_ddp.diffusion.families import family_of_model, get_family

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    get_family(family_of_model(model)).save_lora(
        out_dir, get_peft_model_state_dict(model, adapter_name=adapter), model.peft_config[adapter].to_dict(),
        WEIGHT_NAME)
    return out_dir / WEIGHT_NAME


def load_adapter(unet, path: str | Path, adapter_name: str = "default") -> None:
    """Load an exported adapter file (or a directory holding one) into a UNet that has LoRA attached
    (into its adapter ``adapter_name``)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    prefix = "unet." if type(unet).__name__ == "UNet2DConditionModel" else "transformer."
    state = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
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


def export_unet(unet, out_dir: str | Path) -> Path:
    """train.method=full: save the whole UNet in diffusers format, ``out_dir/unet`` (``from_pretrained`` loads it)."""
    out = Path(out_dir) / UNET_DIR
    unet.save_pretrained(out, safe_serialization=True)
    return out


def load_unet(unet, ckpt: str | Path) -> None:
    """Load a checkpoint's full UNet (``export_unet``) into ``unet`` in place (its device and dtype kept)."""
    path = Path(ckpt) / UNET_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{ckpt}: no {UNET_DIR}/ folder (a train.method=full checkpoint has one)")
    try:
        unet.load_state_dict(type(unet).from_pretrained(path, use_safetensors=True).state_dict())
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"{path}: this UNet does not fit the base model's: {' '.join(str(e).split())[:300]}") from None
