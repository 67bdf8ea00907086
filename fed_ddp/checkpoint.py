"""Atomic checkpoints: the global adapter (diffusers-loadable) plus all server state a resume needs.

checkpoints/round_NNNN/
  pytorch_lora_weights.safetensors   load with StableDiffusionPipeline.load_lora_weights(dir)
  unet/                              instead, with train.method=full: the whole UNet, diffusers format
                                     (UNet2DConditionModel.from_pretrained(dir / "unet"))
  server_state.safetensors           round, global vector, strategy state (e.g. FedAdam moments), when each
                                     client last played: tensors + JSON metadata (nothing is unpickled)
  fed_ddp.json                       base model path, train.method and LoRA config (what `fed-ddp generate`
                                     needs; no "method": lora)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fed_ddp.diffusion.lora import export_adapter, export_unet
from fed_ddp.files import read_json, refuse_link, write_text

STATE = "server_state.safetensors"
INFO = "fed_ddp.json"


def save_checkpoint(out_dir: Path, unet, global_flat: torch.Tensor, rnd: int, strategy_state: dict,
                    info: dict, extra: dict | None = None) -> Path:
    """Write into a temporary folder, then rename: a crash never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    for p in (out_dir.parent, out_dir, tmp):  # a link planted in the run directory is refused, never followed
        refuse_link(p)
    shutil.rmtree(tmp, ignore_errors=True)
    if info.get("method", "lora") == "full":
        export_unet(unet, tmp)
    else:
        export_adapter(unet, tmp)
    write_state(tmp / STATE, {"round": rnd, "global": global_flat.cpu(), "strategy": strategy_state, **(extra or {})})
    write_text(tmp / INFO, json.dumps({**info, "round": rnd}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def round_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete round checkpoints by round number (``round_0007``, ``round_12345``: no digit limit)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := re.fullmatch(r"round_(\d{4,})", p.name))}


def latest_checkpoint(run_dir: Path, logged: set[int] | None = None) -> Path | None:
    """The newest round checkpoint; with ``logged`` (rounds whose metrics row is complete), the newest whose
    round was also logged, so a row cut by a crash is computed again rather than lost."""
    ckpts = round_checkpoints(run_dir)
    usable = [r for r in ckpts if logged is None or r in logged]
    return ckpts[max(usable)] if usable else None


def write_state(path: Path, state: dict) -> None:
    """A flat dict of tensors, ints, floats, strings, None and one level of nested dicts (the strategy's
    state) as safetensors: tensors by dotted name, everything else as JSON metadata."""
    tensors, plain = {}, {}
    for key, value in state.items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            name = key if k is None else f"{key}.{k}"
            if isinstance(v, torch.Tensor):
                tensors[name] = v.detach().cpu().contiguous()
            elif v is None or isinstance(v, (bool, int, float, str)):
                plain[name] = v
            else:
                raise TypeError(f"checkpoint state {name!r}: {type(v).__name__} is neither a tensor nor plain JSON")
    nested = sorted(k for k, v in state.items() if isinstance(v, dict))
    save_file(tensors, str(path), metadata={"fed_ddp": json.dumps({"plain": plain, "nested": nested})})


def load_state(ckpt: Path) -> dict:
    """The server state of checkpoint folder ``ckpt`` (``write_state``'s inverse)."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {STATE} (not a fed_ddp checkpoint, or one from before safetensors)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["fed_ddp"])
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    flat.update(meta["plain"])
    out: dict = {k: {} for k in meta["nested"]}
    for name, v in flat.items():
        key, _, sub = name.partition(".")
        if key in out and sub:
            out[key][sub] = v
        else:
            out[name] = v
    return out


def read_info(ckpt: Path) -> dict:
    """A checkpoint's ``fed_ddp.json``, checked: a JSON object naming its base model (str), method and LoRA
    settings (a mapping). Raises ValueError (one line, the file named) for anything else."""
    p = Path(ckpt) / INFO
    if not Path(ckpt).is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint folder")
    if not p.exists():
        raise FileNotFoundError(f"{ckpt}: not a fed_ddp checkpoint (no {INFO})")
    try:
        info = read_json(p, limit=2 ** 20)
    except OSError as e:
        raise ValueError(str(e)) from None
    if not isinstance(info, dict):
        raise ValueError(f"{p}: must be a JSON object, not {type(info).__name__}")  # noqa: TRY004 (bad input)
    if not isinstance(info.get("base_model"), str) or not info["base_model"]:
        raise ValueError(f"{p}: 'base_model' must name the base pipeline (a folder or hub id)")
    if info.get("method", "lora") not in ("lora", "full"):
        raise ValueError(f"{p}: 'method' must be lora or full, not {info.get('method')!r}")
    if info.get("method", "lora") == "lora" and not isinstance(info.get("lora"), dict):
        raise ValueError(f"{p}: 'lora' must be the run's LoRA settings (a JSON object)")
    if info.get("family") is not None and not isinstance(info["family"], str):
        raise ValueError(f"{p}: 'family' must be a model family name")
    return info
