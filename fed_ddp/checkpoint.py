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

STATE = "server_state.safetensors"
INFO = "fed_ddp.json"


def save_checkpoint(out_dir: Path, unet, global_flat: torch.Tensor, rnd: int, strategy_state: dict,
                    info: dict, extra: dict | None = None) -> Path:
    """Write into a temporary folder, then rename: a crash never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if info.get("method", "lora") == "full":
        export_unet(unet, tmp)
    else:
        export_adapter(unet, tmp)
    write_state(tmp / STATE, {"round": rnd, "global": global_flat.cpu(), "strategy": strategy_state, **(extra or {})})
    (tmp / INFO).write_text(json.dumps({**info, "round": rnd}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    rounds = sorted(p for p in (Path(run_dir) / "checkpoints").glob("round_*") if re.fullmatch(r"round_\d{4}", p.name))
    return rounds[-1] if rounds else None


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
    p = Path(ckpt) / INFO
    if not p.exists():
        raise FileNotFoundError(f"{ckpt}: not a fed_ddp checkpoint (no {INFO})")
    return json.loads(p.read_text())
