"""The server's round loop: plan, exchange, aggregate, evaluate, checkpoint, log.

It talks to clients only through a transport (collectives or in-memory), so the same loop runs under
torchrun and in one process.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from fed_ddp.checkpoint import latest_checkpoint, load_state, save_checkpoint
from fed_ddp.client import _channels, validation_loss
from fed_ddp.compression import ChainState, layout_of
from fed_ddp.config import RunConfig
from fed_ddp.data.federated import FederatedData
from fed_ddp.diffusion.models import encode_captions, encode_images
from fed_ddp.diffusion.tiny import caption
from fed_ddp.evaluation import generation_accuracy, mean_over, reference_classifier
from fed_ddp.images import sample_grid, save_grid
from fed_ddp.protocol import Wire
from fed_ddp.strategies import Strategy

log = logging.getLogger("fed_ddp.server")


class Server:
    def __init__(self, cfg: RunConfig, pipe, scheduler, data: FederatedData, strategy: Strategy, transport,
                 tracker, base_model: str, engine=None, wire: Wire | None = None):
        from fed_ddp.engines import TorchEngine

        self.cfg, self.pipe, self.scheduler, self.data = cfg, pipe, scheduler, data
        self.engine = engine or TorchEngine(pipe.unet, cfg.train)  # reads/writes the adapter (ZeRO-3 aware)
        self.strategy, self.transport, self.tracker = strategy, transport, tracker
        self.run_dir = cfg.run.dir
        self.wire = wire or Wire(cfg.comm, layout_of(pipe.unet))
        self.down_state = ChainState(seed=cfg.run.seed * 1_000_003 + 999_983)  # downlink stochastic rounding
        self.unet_parameters = sum(getattr(p, "ds_numel", p.numel()) for n, p in pipe.unet.named_parameters()
                                   if "lora_" not in n)  # the frozen base (ZeRO-3: full sizes, not shards)
        self.info = {"base_model": base_model, "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                                                        "targets": list(cfg.lora.targets)}}
        self.val_sets = {"val_loss": self._encode(data.val)}
        if data.val_base is not None:
            self.val_sets["val_loss_base"] = self._encode(data.val_base)
        self.prompts = list(cfg.eval.prompts) or (
            [caption(d) for d in range(10)] if cfg.data.source == "digits" else sorted(set(data.val.captions))[:8])
        self.client_digits = list(cfg.data.digits)
        self.base_digits = [d for d in cfg.model.tiny.digits if d not in self.client_digits]

    def _encode(self, d):
        table = encode_captions(self.pipe, d.captions)
        return (encode_images(self.pipe, _channels(d.images, self.pipe.vae.config.in_channels)),
                torch.stack([table[c] for c in d.captions]))

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, rnd: int, losses: bool = True, grid: bool = True, accuracy: bool = False) -> dict:
        out: dict = {}
        if losses:
            for name, (lat, emb) in self.val_sets.items():
                out[name] = validation_loss(self.pipe.unet, self.scheduler, lat, emb)
        if grid:
            e = self.cfg.eval
            g = sample_grid(self.pipe, self.prompts, list(e.sample_seeds), e.inference_steps, e.guidance_scale)
            path = save_grid(g, self.prompts, self.run_dir / "samples" / f"round_{rnd:04d}.png")
            self.tracker.log_images({"samples": str(path)}, step=rnd)
        if accuracy and self.cfg.data.source == "digits":
            e = self.cfg.eval
            acc = generation_accuracy(self.pipe, sorted(set(self.client_digits + self.base_digits)),
                                      e.images_per_prompt, self.cfg.run.seed, e.inference_steps, e.guidance_scale)
            out["gen_acc"] = {str(d): a for d, a in acc.items()}
            out["gen_acc_clients"] = mean_over(acc, self.client_digits)
            if self.base_digits:
                out["gen_acc_base"] = mean_over(acc, self.base_digits)
        return out

    def _save(self, name: str, global_flat: torch.Tensor, rnd: int) -> None:
        with self.engine.gathered():  # ZeRO-3: export full LoRA tensors, never empty shards
            save_checkpoint(self.run_dir / "checkpoints" / name, self.pipe.unet, global_flat, rnd,
                            self.strategy.state_dict(), self.info)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        global_flat = self.engine.read_adapter()
        num_params = global_flat.numel()
        start = 1
        ckpt = latest_checkpoint(self.run_dir) if cfg.run.resume else None
        if ckpt is not None:
            state = load_state(ckpt)
            global_flat, start = state["global"], state["round"] + 1
            self.strategy.load_state_dict(state["strategy"])
            self.engine.write_adapter(global_flat)
            self.down_state.step = start - 1
            log.info("resuming from %s (round %d done)", ckpt, state["round"])
        w = self.wire
        log.info("LoRA: %d trainable parameters (%.1f KiB fp32 per adapter); %d clients, rounds %d..%d",
                 num_params, num_params * 4 / 1024, self.transport.num_clients, start, cfg.fed.rounds)
        log.info("wire per client per round: up %s = %d B, down %s = %d B (dense fp32 LoRA: %d B)",
                 w.up.describe(), w.up_nbytes, w.down.describe(), w.down_nbytes, 4 * num_params)
        history = []
        base_eval = None
        if start == 1:
            t0 = time.perf_counter()
            base_eval = self.evaluate(0, accuracy=True)
            base_eval["seconds"] = {"evaluation": time.perf_counter() - t0}
            self.tracker.log({"round": 0, **base_eval}, step=0)
            history.append({"round": 0, **base_eval})
            log.info("base model: %s", _brief(base_eval))
        bar = tqdm(range(start, cfg.fed.rounds + 1), desc="rounds", disable=not cfg.tracking.progress,
                   dynamic_ncols=True)
        for rnd in bar:
            t_round = time.perf_counter()
            plan = self.strategy.configure_round(rnd)
            ups, stats = self.transport.exchange(w.pack_downlink(plan, global_flat, self.down_state), w.up_nbytes)
            updates = [w.unpack_uplink(u, c) for c, u in enumerate(ups)]
            t_agg = time.perf_counter()
            global_flat, agg_metrics = self.strategy.aggregate(rnd, global_flat, updates)
            self.engine.write_adapter(global_flat)
            t_eval = time.perf_counter()
            last = rnd == cfg.fed.rounds
            e = cfg.eval
            every = last or rnd % e.every == 0
            acc = e.accuracy_every > 0 and rnd % e.accuracy_every == 0 and not last
            ev = self.evaluate(rnd, losses=every, grid=every, accuracy=acc)
            t_ckpt = time.perf_counter()
            self._save(f"round_{rnd:04d}", global_flat, rnd)
            t_end = time.perf_counter()
            train_s = [u.metrics["train_seconds"] for u in updates]
            client_s = [u.metrics["client_seconds"] for u in updates]
            crit = max if stats.parallel else sum
            seconds = {"local_training": crit(train_s),
                       "communication": max(0.0, stats.seconds - crit(client_s)),
                       "aggregation": t_eval - t_agg,
                       "evaluation": t_ckpt - t_eval}
            seconds["other"] = max(0.0, (t_end - t_round) - sum(seconds.values()))
            seconds["round"] = t_end - t_round
            losses = [u.metrics["train_loss"] for u in updates]
            row = {"round": rnd,
                   "train_loss": {str(u.client_id): u.metrics["train_loss"] for u in updates},
                   "train_loss_mean": float(np.average(losses, weights=[u.num_examples for u in updates])),
                   "num_examples": {str(u.client_id): u.num_examples for u in updates},
                   **ev, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "comm": self._comm(stats),
                   "seconds": seconds,
                   **agg_metrics}
            self.tracker.log(row, step=rnd)
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss_mean']:.4f}", val=f"{ev.get('val_loss', float('nan')):.4f}")
            log.info("round %d: %s", rnd, _brief(row))
        bar.close()
        self.transport.stop(w.pack_downlink(self.strategy.configure_round(cfg.fed.rounds + 1), global_flat,
                                            self.down_state, stop=True))
        return self.finish(global_flat, base_eval, history)

    def _comm(self, stats) -> dict:
        """Bytes of this round per direction: codec payload, metadata (codec + protocol fields), what the
        collectives moved, and how many times fewer than dense fp32 LoRA and the full-UNet equivalent."""
        n, w = self.transport.num_clients, self.wire
        out = {}
        for name, per_client, moved in (("up", w.up_bytes, stats.bytes_up), ("down", w.down_bytes, stats.bytes_down)):
            out[name] = {"payload": per_client.payload * n, "metadata": per_client.metadata * n, "moved": moved,
                         **self._ratios(moved, n)}
        out["up"]["padding"], out["up"]["sizes"] = stats.up_padding, stats.up_sizes
        return out

    def _ratios(self, moved: int, messages: int) -> dict:
        """How many times fewer bytes than ``messages`` adapters as dense fp32 LoRA, and as the full UNet."""
        return {"vs_dense_lora": 4 * self.wire.num_params * messages / moved,
                "vs_full_unet": 4 * self.unet_parameters * messages / moved}

    def _comm_summary(self, rounds: list[dict]) -> dict:
        w = self.wire
        out = {"uplink": w.up.describe(), "downlink": w.down.describe(), "lora_parameters": w.num_params,
               "unet_parameters": self.unet_parameters,
               "per_client_round": {"up": {"payload": w.up_bytes.payload, "metadata": w.up_bytes.metadata},
                                    "down": {"payload": w.down_bytes.payload, "metadata": w.down_bytes.metadata}}}
        for d in ("up", "down"):
            tot = {k: sum(h["comm"][d][k] for h in rounds) for k in ("payload", "metadata", "moved")}
            if tot["moved"]:
                tot.update(self._ratios(tot["moved"], self.transport.num_clients * len(rounds)))
            out[d] = tot
        return out

    def finish(self, global_flat: torch.Tensor, base_eval: dict | None, history: list[dict]) -> dict:
        t0 = time.perf_counter()
        final = self.evaluate(self.cfg.fed.rounds, losses=True, grid=False, accuracy=True)
        self._save("final", global_flat, self.cfg.fed.rounds)
        rounds = [h for h in history if h["round"] > 0]
        summary = {
            "run": self.cfg.run.name, "rounds": self.cfg.fed.rounds, "num_clients": self.transport.num_clients,
            "lora_parameters": int(global_flat.numel()),
            "images_per_prompt": self.cfg.eval.images_per_prompt,
            "classifier_test_accuracy": reference_classifier().test_accuracy,
            "base": {k: v for k, v in (base_eval or {}).items() if k != "seconds"},
            "final": final,
            "bytes_up_total": sum(h["bytes_up"] for h in rounds),
            "bytes_down_total": sum(h["bytes_down"] for h in rounds),
            "comm": self._comm_summary(rounds),
            "seconds_total": {k: sum(h["seconds"][k] for h in rounds) for k in
                              ("local_training", "communication", "aggregation", "evaluation", "other", "round")},
            "final_eval_seconds": time.perf_counter() - t0,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.log({"round": self.cfg.fed.rounds, "final": final}, step=self.cfg.fed.rounds)
        self.tracker.finish(summary)
        return summary


def _brief(row: dict) -> str:
    keys = ("train_loss_mean", "val_loss", "val_loss_base", "gen_acc_clients", "gen_acc_base", "bytes_up")
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))


def print_table(summary: dict, client_digits: list[int], base_digits: list[int], file=None) -> None:
    """The quickstart's closing table: generation accuracy of the base vs the federated adapter."""
    import sys

    file = file or sys.stdout
    b, f = summary.get("base", {}), summary["final"]
    if "gen_acc" not in f:
        return
    n = summary.get("images_per_prompt", "?")
    print(f"\nGeneration accuracy: share of {n} images per prompt that a reference classifier "
          f"({summary['classifier_test_accuracy']:.1%} on real digits) assigns to the prompted digit", file=file)
    print(f"  {'':26s}{'base':>8s}{'federated':>11s}", file=file)
    rows = [(f"digit {d} ({'client' if d in client_digits else 'base'} concept)",
             b.get("gen_acc", {}).get(str(d), float("nan")), f["gen_acc"][str(d)])
            for d in sorted(int(k) for k in f["gen_acc"])]
    rows.append(("mean, client concepts", b.get("gen_acc_clients", float("nan")), f["gen_acc_clients"]))
    if base_digits:
        rows.append(("mean, base concepts", b.get("gen_acc_base", float("nan")), f.get("gen_acc_base", float("nan"))))
    for name, bv, fv in rows:
        print(f"  {name:26s}{bv:8.1%}{fv:11.1%}", file=file)
