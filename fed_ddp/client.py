"""A client's local training: K LoRA steps from the current global adapter, then its delta and sample count.

``LocalTrainer`` is plain PyTorch (no process group), so the same code serves the workers that play
clients under torchrun, the in-process comparison baselines and the tests. Its random streams depend
on the run seed, the round and the client id only (``fed_ddp.seeds``), never on the worker.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from fed_ddp.data.digits import CaptionedImages
from fed_ddp.data.encoded import EncodedSet, take
from fed_ddp.diffusion.families import denoiser, family_of
from fed_ddp.diffusion.families.sd import to_device
from fed_ddp.diffusion.lora import lora_parameters
from fed_ddp.diffusion.models import encode_set, generate, unet_autocast
from fed_ddp.objectives import lookup as lookup_objective
from fed_ddp.seeds import client_objective, client_round
from fed_ddp.strategies import RoundPlan


def autocast_for(device: torch.device, mixed_precision: str, engine: str = "torch"):
    """bf16/fp16 autocast on CUDA where asked ("auto" = bf16 on CUDA); fp32 on CPU.

    DeepSpeed casts the model itself from its bf16/fp16 config, so no autocast there.
    """
    if device.type != "cuda" or mixed_precision == "no" or engine == "deepspeed":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def objective_context(pipe, client_id: int, run_seed: int):
    """The ``objectives.Context`` a client's objective prepares with."""
    import contextlib

    from fed_ddp.objectives import Context

    def images(prompts, seed, steps):
        x = generate(pipe, list(prompts), seed, steps, 1.0)  # [0, 1] NHWC
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() * 2 - 1

    def encode(x, captions):
        return encode_set(pipe, CaptionedImages(x, list(captions), np.full(len(captions), -1, dtype=np.int64)))

    @contextlib.contextmanager
    def base_only():
        model = denoiser(pipe)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    return Context(pipe, client_id, run_seed, images, encode, base_only)


class LocalTrainer:
    """Holds one client's encoded data and trains the shared LoRA-wrapped UNet on it through an engine.

    With R ranks per client, every rank of the client draws the same client-wide micro-batch of
    ``batch_size * R`` examples (and the same noise) and trains on its own slice, so a client of R
    ranks takes the same steps as one rank with an R-times larger batch.
    """

    def __init__(self, pipe, scheduler, data: CaptionedImages | EncodedSet, train_cfg, seed: int,
                 replay: CaptionedImages | EncodedSet | None = None, replay_fraction: float = 0.0, client_id: int = 0,
                 engine=None, rank_in_client: int = 0, ranks_per_client: int = 1, personal_lr: float | None = None):
        from fed_ddp.engines import TorchEngine

        self.unet, self.scheduler, self.cfg = denoiser(pipe), scheduler, train_cfg
        self.family = family_of(pipe)
        self.objective = lookup_objective(train_cfg.objective)(train_cfg)  # train.objective (fed_ddp/objectives.py)
        self.engine = engine or TorchEngine(self.unet, train_cfg)
        self.device = self.unet.device
        self.seed, self.client_id = seed, client_id
        self.personal_lr = personal_lr  # personal.mode=split: the personal adapter's lr (None: the round's)
        self.slot, self.ranks = rank_in_client, ranks_per_client
        own = data if isinstance(data, EncodedSet) else encode_set(pipe, data)
        self.num_examples = len(own)
        self.latents, self.cond = own.latents, own.cond
        self.replay_latents = self.replay_cond = None
        self.global_batch = train_cfg.batch_size * ranks_per_client
        self.n_replay = 0
        if replay is not None and replay_fraction > 0:
            rep = replay if isinstance(replay, EncodedSet) else encode_set(pipe, replay)
            self.replay_latents, self.replay_cond = rep.latents, rep.cond
            self.n_replay = round(replay_fraction * self.global_batch)
        self.objective.prepare(objective_context(pipe, client_id, seed))

    def _batch(self, rng: np.random.Generator, gen: torch.Generator):
        """This rank's slice of the client-wide micro-batch: latents, conditioning, noise, timesteps. On a GPU
        nothing here makes the host wait for the device (indices and host tensors go pinned, non-blocking)."""
        i = torch.from_numpy(rng.integers(0, len(self.latents), self.global_batch - self.n_replay))
        lat, cond = self.latents[to_device(i, self.latents.device)], take(self.cond, i)
        if self.n_replay:
            j = torch.from_numpy(rng.integers(0, len(self.replay_latents), self.n_replay))
            rep = take(self.replay_cond, j)
            lat = torch.cat([lat, self.replay_latents[to_device(j, self.replay_latents.device)]])
            cond = {k: torch.cat([v, rep[k]]) for k, v in cond.items()}
        noise, t = self.family.draw(lat, self.scheduler, gen)
        mine = slice(self.slot * self.cfg.batch_size, (self.slot + 1) * self.cfg.batch_size)
        d = self.device
        return (to_device(lat[mine], d), {k: to_device(v[mine], d) for k, v in cond.items()},
                to_device(noise[mine], d), to_device(t[mine], d))

    def fit(self, global_flat: torch.Tensor, plan: RoundPlan) -> tuple[torch.Tensor, dict[str, float]]:
        """Train ``plan.local_steps`` optimizer steps from ``global_flat``; return (local - global, metrics)."""
        t0 = time.perf_counter()
        eng = self.engine
        eng.write_adapter(global_flat)
        if self.personal_lr is None:
            eng.begin_round(plan.lr)
        else:
            eng.begin_round(plan.lr, self.personal_lr)
        params = lora_parameters(self.unet)
        self.objective.plan = plan  # what the objective may read of the round (plan.values: the strategy's)
        anchor = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else None
        seed = client_round(self.seed, plan.round, self.client_id)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        own = torch.Generator().manual_seed(client_objective(self.seed, plan.round, self.client_id))  # the objective's
        self.unet.train()
        losses, reported = [], {k: [] for k in self.objective.metrics}
        # LoRA dropout draws from torch's global generator: seed it per (client, round), so a client's update
        # does not depend on which clients its worker played before
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for _ in range(plan.local_steps * self.cfg.gradient_accumulation_steps):
                lat, cond, noise, t = self._batch(rng, gen)
                with autocast_for(self.device, self.cfg.mixed_precision, self.cfg.engine):
                    loss, said = self.objective.loss(self.family, eng.model, self.scheduler, lat, cond, noise, t, own)
                for k, seen in reported.items():
                    seen.append(torch.as_tensor(said[k], dtype=torch.float64).detach().reshape(()))
                if anchor is not None:
                    loss = loss + 0.5 * plan.proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                eng.backward_step(loss)
                losses.append(loss.detach())  # no .item() per step: the host would wait for the device each step
        self.unet.eval()
        delta = eng.read_adapter().cpu() - global_flat.cpu()
        train_loss = float(torch.stack(losses).double().mean()) if losses else float("nan")
        extra = {k: float(torch.stack(v).mean()) if v else float("nan") for k, v in reported.items()}
        return delta, {"train_loss": train_loss, "train_seconds": time.perf_counter() - t0, **extra}


@torch.no_grad()
def validation_loss(family, unet, scheduler, enc: EncodedSet, seed: int = 1234, batch_size: int | None = None,
                    repeats: int = 4) -> float:
    """Denoising loss on held-out data at fixed noise and timesteps (comparable across rounds).

    Default batch: 256, or about 2**16 latent pixels where that is fewer (16 at SD's 64x64 latents)."""
    latents = enc.latents
    batch_size = batch_size or max(1, min(256, 2 ** 16 // (latents.shape[-1] * latents.shape[-2])))
    gen = torch.Generator(device=unet.device).manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(repeats):
        for i in range(0, len(latents), batch_size):
            lat = latents[i:i + batch_size].to(unet.device)
            cond = {k: v[i:i + batch_size].to(unet.device) for k, v in enc.cond.items()}
            noise, t = family.draw(lat, scheduler, gen)
            with unet_autocast(unet):
                total += family.loss(unet, scheduler, lat, cond, noise, t).float().item() * len(lat)
            n += len(lat)
    return total / max(n, 1)
