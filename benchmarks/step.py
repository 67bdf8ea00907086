"""Local step vs the plainest correct loop (issue 14, floor 1), side by side in one process.

``LocalTrainer.fit`` (what a client does each round: write the global adapter into the engine, a fresh AdamW,
K steps of the diffusion loss on batches drawn from its encoded data, read the delta back) against the loop a
diffusers user would write: the same UNet with the same peft LoRA, AdamW, the same batch size, loss and
gradient clipping, batches drawn the plain way. Same device, same threads. The two are interleaved (A, B, A,
B, ...) so that a shared, noisy machine slows both alike; the ratio of their medians is printed.

    .venv/bin/python benchmarks/step.py [--config configs/quickstart.yaml] [--steps 30] [--repeats 5] [--threads 1]

Goal (issue 14): LocalTrainer at >= 0.95x the plain loop's throughput.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def plain_steps(unet, scheduler, latents, embeds, steps: int, batch: int, lr: float, weight_decay: float,
                max_grad_norm: float, autocast_dtype: torch.dtype | None = None) -> float:
    """The plain loop (on the device of ``latents``; ``autocast_dtype``: mixed precision, as accelerate's
    ``mixed_precision=bf16`` would run it); returns its last loss."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    unet.train()
    loss = torch.zeros(())
    device = latents.device
    for _ in range(steps):
        i = torch.randint(0, len(latents), (batch,))
        lat, emb = latents[i], embeds[i]
        noise = torch.randn_like(lat)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = unet(scheduler.add_noise(lat, noise, t), t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    unet.eval()
    return float(loss.detach())


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, before: Callable[[str], object] = lambda _: None,
                sync: Callable[[], object] = lambda: None,
                report: Callable[[int, dict[str, float]], object] = lambda rep, row: None) -> dict[str, list[float]]:
    """Wall seconds of each of ``runs``, run in turn (A, B, A, B, ...) so that a shared, noisy machine slows all
    alike, ``repeats`` times after one uncounted warm-up round (caches, allocator, compilation). ``before(name)``
    runs untimed before each; ``sync`` waits for queued device work before each clock read; ``report(rep, row)``
    sees each counted round's seconds."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(repeats + 1):
        row = {}
        for name, fn in runs.items():
            before(name)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            row[name] = time.perf_counter() - t0
        if rep:
            for k, v in row.items():
                times[k].append(v)
            report(rep, row)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from fed_ddp.client import LocalTrainer, encode_set
    from fed_ddp.config import load_config
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import get_flat, prepare_trainable, set_flat
    from fed_ddp.diffusion.models import base_path, load_pipeline, quiet_libraries, training_scheduler
    from fed_ddp.strategies import RoundPlan

    quiet_libraries()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    pipe = load_pipeline(base_path(cfg.model), torch.device("cpu"), cfg.model.revision)
    prepare_trainable(pipe.unet, cfg)
    scheduler = training_scheduler(pipe)
    if scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"the plain loop here trains epsilon-prediction; the base predicts {scheduler.config.prediction_type}")
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    own = encode_set(pipe, data.clients[0])
    start = get_flat(pipe.unet)
    tc = cfg.train
    trainer = LocalTrainer(pipe, scheduler, own, tc, cfg.run.seed, client_id=0)  # no replay: same batches' cost
    plan = RoundPlan(round=1, local_steps=args.steps, lr=tc.lr)
    print(f"{cfg.run.name}: {len(start):,} LoRA parameters, batch {tc.batch_size}, {args.steps} steps per measure, "
          f"{args.threads} thread(s), {args.repeats} interleaved repeats (+1 warm-up)", flush=True)
    runs = {"local": lambda: trainer.fit(start, plan),
            "plain": lambda: plain_steps(pipe.unet, scheduler, own.latents, own.embeds, args.steps, tc.batch_size,
                                         tc.lr, tc.weight_decay, tc.max_grad_norm)}
    times = interleaved(runs, args.repeats, before=lambda _: set_flat(pipe.unet, start),
                        report=lambda rep, row: print(
                            f"  repeat {rep}: LocalTrainer {args.steps / row['local']:6.2f} steps/s, plain loop "
                            f"{args.steps / row['plain']:6.2f} steps/s, ratio {row['plain'] / row['local']:.3f}",
                            flush=True))
    local_s, plain_s = times["local"], times["plain"]
    ratio = statistics.median(plain_s) / statistics.median(local_s)
    print(f"LocalTrainer throughput / plain loop: {ratio:.3f}x (median of {args.repeats}; goal >= 0.95; "
          f"per-repeat ratios {min(p / q for p, q in zip(plain_s, local_s)):.3f}..{max(p / q for p, q in zip(plain_s, local_s)):.3f})")


if __name__ == "__main__":
    main()
