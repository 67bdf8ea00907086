"""Atomic checkpoints: the global adapter (diffusers-loadable) plus all server state a resume needs.

checkpoints/round_NNNN/
  pytorch_lora_weights.safetensors   load with StableDiffusionPipeline.load_lora_weights(dir)
  server_state.pt                    round, global vector, strategy state (e.g. FedAdam moments)
  fed_ddp.json                       base model path and LoRA config (what `fed-ddp generate` needs)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from fed_ddp.diffusion.lora import export_adapter

STATE = "server_state.pt"
INFO = "fed_ddp.json"


def save_checkpoint(out_dir: Path, unet, global_flat: torch.Tensor, rnd: int, strategy_state: dict,
                    info: dict, extra: dict | None = None) -> Path:
    """Write into a temporary folder, then rename: a crash never leaves a half-written checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_adapter(unet, tmp)
    torch.save({"round": rnd, "global": global_flat.cpu(), "strategy": strategy_state, **(extra or {})}, tmp / STATE)
    (tmp / INFO).write_text(json.dumps({**info, "round": rnd}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    rounds = sorted(p for p in (Path(run_dir) / "checkpoints").glob("round_*") if re.fullmatch(r"round_\d{4}", p.name))
    return rounds[-1] if rounds else None


def load_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=False)


def read_info(ckpt: Path) -> dict:
    p = Path(ckpt) / INFO
    if not p.exists():
        raise FileNotFoundError(f"{ckpt}: not a fed_ddp checkpoint (no {INFO})")
    return json.loads(p.read_text())
