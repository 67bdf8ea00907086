"""Local training engines: plain PyTorch or DeepSpeed, behind one small interface.

An engine is built once per run and reused every round. Per round it takes the new global adapter
(``write_adapter``), a fresh optimizer state and the round's learning rate (``begin_round``); per
micro-batch it runs forward/backward, stepping the optimizer every ``gradient_accumulation_steps``.
With several ranks per client, gradients are averaged inside the client's group only.

DeepSpeed specifics handled here: gradient clipping is always set explicitly (DeepSpeed clips to 1.0
when silent); after writing LoRA weights the fp32 master copy is refreshed; under ZeRO-3 the LoRA
parameters are read and written inside ``GatheredParameters`` so nobody sees empty shards.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from fed_ddp.diffusion.lora import get_flat, lora_parameters, set_flat
from fed_ddp.lora_names import is_lora_name, personal_named


class TorchEngine:
    """AdamW on the LoRA parameters; in-client data parallelism by one flat all-reduce per step."""

    def __init__(self, unet, train_cfg, dp_group=None):
        self.unet, self.cfg, self.group = unet, train_cfg, dp_group
        self.params = lora_parameters(unet)
        self.personal = [p for _, p in personal_named(unet)]  # personal.mode=split: trained here, never exchanged
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.model = unet
        self.opt = None
        self._micro = 0

    def read_adapter(self) -> torch.Tensor:
        return get_flat(self.unet)

    def write_adapter(self, flat: torch.Tensor) -> None:
        set_flat(self.unet, flat)

    @contextlib.contextmanager
    def gathered(self):
        yield

    def begin_round(self, lr: float, personal_lr: float | None = None) -> None:
        """A fresh AdamW; the personal adapter (if any) is a second parameter group at ``personal_lr`` (None: lr)."""
        groups = [{"params": self.params}]
        if self.personal:
            groups.append({"params": self.personal, "lr": lr if personal_lr is None else personal_lr})
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.cfg.weight_decay)
        self.opt.zero_grad(set_to_none=True)
        self._micro = 0

    def backward_step(self, loss: torch.Tensor) -> None:
        ga = self.cfg.gradient_accumulation_steps
        (loss / ga).backward()
        self._micro += 1
        if self._micro % ga:
            return
        if self.dp_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat /= self.dp_size
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        if self.cfg.max_grad_norm > 0:  # each adapter on its own: the personal one never rescales the shared one
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            if self.personal:
                torch.nn.utils.clip_grad_norm_(self.personal, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def deepspeed_config(train_cfg, ds_cfg, device_type: str, dp_size: int) -> dict:
    """The DeepSpeed JSON config from our typed config (raw ``deepspeed.config`` keys merged last)."""
    mp = train_cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if device_type == "cuda" else "no"
    zero: dict = {"stage": ds_cfg.zero_stage}
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    cfg = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
        "train_batch_size": train_cfg.batch_size * train_cfg.gradient_accumulation_steps * dp_size,
        "gradient_clipping": float(train_cfg.max_grad_norm),  # explicit: DeepSpeed clips to 1.0 when silent
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay,
                                                  "torch_adam": not ds_cfg.offload_optimizer}},
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, dict(ds_cfg.config))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _skip_shm_comm(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``, about 30 s of
    C++ on a 2-core machine, and a compiler) when its comm layer starts; only ``inference_all_reduce`` uses it,
    which training never calls (ZeRO's collectives go through torch.distributed over gloo). Marking the op
    incompatible makes DeepSpeed fall back to gloo for that too, as it does on platforms without the op."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """A DeepSpeed engine over the LoRA-wrapped UNet (only LoRA parameters are trained)."""

    def __init__(self, unet, train_cfg, ds_cfg, mpu, device_type: str):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
        import deepspeed

        if os.environ["DS_ACCELERATOR"] == "cpu":
            _skip_shm_comm(deepspeed)
        self._ds = deepspeed
        self.unet, self.cfg = unet, train_cfg
        self.params = lora_parameters(unet)
        # what an export reads: every LoRA tensor, the frozen ones too (FFA-LoRA's A under ZeRO-3)
        self.exported = [p for n, p in unet.named_parameters() if is_lora_name(n)] if train_cfg.method != "full" \
            else list(unet.parameters())
        self.config = deepspeed_config(train_cfg, ds_cfg, device_type, mpu.get_data_parallel_world_size())
        self.stage = ds_cfg.zero_stage
        if self.stage == 3:
            _scope_zero3_trace_checks(mpu.get_data_parallel_group())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=unet, model_parameters=self.params,
                                                                 config=self.config, mpu=mpu)
        self.model = self.engine

    @contextlib.contextmanager
    def gathered(self, write: bool = False):
        """Full LoRA tensors inside the block (ZeRO-3: gathered, frozen ones included, for exports; on exit, rank
        0's writes to the trained ones are re-partitioned)."""
        if self.stage == 3:
            with self._ds.zero.GatheredParameters(self.params if write else self.exported,
                                                  modifier_rank=0 if write else None):
                yield
        else:
            yield

    def read_adapter(self) -> torch.Tensor:
        with self.gathered():
            return get_flat(self.unet)

    def write_adapter(self, flat: torch.Tensor) -> None:
        with self.gathered(write=True):
            set_flat(self.unet, flat)
        if hasattr(self.optimizer, "refresh_fp32_params"):  # ZeRO / bf16: the fp32 master copy follows
            self.optimizer.refresh_fp32_params()

    def _inner(self):
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)

    def begin_round(self, lr: float) -> None:
        inner = self._inner()
        inner.state.clear()  # a fresh AdamW every round, as the torch engine does
        for group in inner.param_groups:
            group["lr"] = lr

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps the optimizer at accumulation boundaries only


def _scope_zero3_trace_checks(group) -> None:
    """ZeRO-3 checks that every rank traced the same module order, with broadcasts over the *whole
    world* from rank 0. In a federation the world holds several independent clients and a server
    that never step together, so the check would deadlock; we run the same check inside this
    rank's data-parallel group (the client's ranks), where it belongs.
    """
    from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator, stage3

    from fed_ddp.distributed.collectives import all_gather_ints

    def same_as_other_ranks_of_this_client(ints) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        seen = all_gather_ints([int(i) for i in ints], group=group, device=device)
        if any(s != seen[0] for s in seen):
            raise RuntimeError("ZeRO-3: ranks of one client traced different module orders")

    for module in (partitioned_param_coordinator, partition_parameters, stage3):
        module.assert_ints_same_as_other_ranks = same_as_other_ranks_of_this_client


def build_engine(unet, cfg, topo, device: torch.device):
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(unet, cfg.train, cfg.deepspeed, topo.deepspeed_mpu(), device.type)
    return TorchEngine(unet, cfg.train, topo.groups.client if topo.groups else None)


__all__ = ["DeepSpeedEngine", "TorchEngine", "build_engine", "deepspeed_config"]
