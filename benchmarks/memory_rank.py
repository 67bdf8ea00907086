"""One real fed_ddp rank (``fed_ddp.train.main``, unchanged) that also measures its memory and step times.

Launched by benchmarks/deepspeed_memory.py through torchrun, in place of ``-m fed_ddp.train``::

    FED_DDP_MEM_DIR=DIR torchrun --standalone --nproc-per-node 3 benchmarks/memory_rank.py CONFIG.yaml [key=value ...]

Only observers are added (wrappers around ``engines.build_engine`` and ``LocalTrainer.fit``, one forward
hook on the UNet); the training path is the production one. Each rank writes ``DIR/rank<RANK>.json``:

- ``vm_hwm_train_kib``: peak resident set size while training. Before the first local step the rank
  frees what it can (``gc`` + glibc ``malloc_trim``) and resets the kernel's peak counter
  (``/proc/self/clear_refs`` = 5), so loading the pipeline does not count; ``ru_maxrss_kib`` is the
  whole-process peak, loading included.
- ``base_bytes``: bytes of the UNet's frozen (non-LoRA) parameters this rank actually holds, per
  device: a full tensor counts its ``numel``; a ZeRO-3 partitioned one counts its own shard
  (``ds_tensor``) plus the full tensor only while it is gathered. Measured after the engine is built,
  after every UNet forward in training (``fwd_max``: the most ever gathered at once at that point) and
  after every round.
- ``rounds``: local training seconds and optimizer steps per round (``LocalTrainer.fit``'s own clock).
- on CUDA, ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` over training.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from fed_ddp import engines, train
from fed_ddp.client import LocalTrainer
from fed_ddp.lora_names import is_lora_name

REC: dict = {"rank": int(os.environ.get("RANK", "0")), "rounds": [], "fwd_max": {}}
_STATE: dict = {"armed": False}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def param_bytes(unet) -> dict:
    """Frozen-base and LoRA parameter bytes held by this rank, per device, and the full (unpartitioned) sizes."""
    out = {"base_held": {}, "base_full": 0, "lora_held": {}, "lora_full": 0, "partitioned": 0, "persistent": 0}
    for name, p in unet.named_parameters():
        es = p.element_size()
        which = "lora" if is_lora_name(name) else "base"
        held = out[f"{which}_held"]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: own shard always, the full tensor only while gathered
            out["partitioned"] += 1
            out["persistent"] += int(bool(getattr(p, "ds_persist", False)))
            full = p.ds_numel * es
            shard = p.ds_tensor
            held[str(shard.device)] = held.get(str(shard.device), 0) + shard.numel() * shard.element_size()
            if p.data.numel():
                held[str(p.device)] = held.get(str(p.device), 0) + p.data.numel() * es
        else:
            full = p.numel() * es
            held[str(p.device)] = held.get(str(p.device), 0) + full
        out[f"{which}_full"] += full
    return out


def _after_forward(module, args, output) -> None:
    b = param_bytes(module)["base_held"]
    for dev, n in b.items():
        REC["fwd_max"][dev] = max(REC["fwd_max"].get(dev, 0), n)


_build = engines.build_engine


def build_engine(unet, cfg, topo, device):
    _trim()
    rss0, t0 = _status_kib("VmRSS"), time.perf_counter()
    eng = _build(unet, cfg, topo, device)
    opt = getattr(eng, "optimizer", None)
    REC["engine"] = {
        "class": type(eng).__name__, "seconds": time.perf_counter() - t0,
        "optimizer": type(opt).__name__ if opt is not None else "AdamW (per round)",
        "inner_optimizer": type(getattr(opt, "optimizer", opt)).__name__ if opt is not None else "AdamW",
        "zero_optimization": getattr(eng, "config", {}).get("zero_optimization"),
        "rss_before_kib": rss0, "rss_after_kib": _status_kib("VmRSS"),
        "params_after_build": param_bytes(unet),
    }
    return eng


engines.build_engine = build_engine  # train.run_rank imports it at call time
_fit = LocalTrainer.fit


def fit(self, global_flat, plan):
    if not _STATE["armed"]:
        _STATE["armed"] = True
        self.unet.register_forward_hook(_after_forward)
        _trim()
        REC["rss_before_train_kib"] = _status_kib("VmRSS")
        REC["hwm_reset"] = _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    delta, metrics = _fit(self, global_flat, plan)
    REC["rounds"].append({"round": plan.round, "steps": plan.local_steps,
                          "micro_batches": plan.local_steps * self.cfg.gradient_accumulation_steps,
                          "seconds": metrics["train_seconds"], "vm_hwm_kib": _status_kib("VmHWM"),
                          "params_after_round": param_bytes(self.unet)})
    if torch.cuda.is_available():
        REC["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return delta, metrics


LocalTrainer.fit = fit


def main(argv: list[str]) -> int:
    rc = train.main(argv)
    REC["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    REC["vm_hwm_train_kib"] = max((r["vm_hwm_kib"] or 0 for r in REC["rounds"]), default=None)
    REC["exit_code"] = rc
    out = Path(os.environ["FED_DDP_MEM_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{REC['rank']}.json").write_text(json.dumps(REC, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
