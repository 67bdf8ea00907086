"""Personal adapters at the end of a run (``personal.mode``): export, and global vs personal on each client's digits.

- ``split``: each client's personal adapter (peft adapter ``personal``, trained next to the shared one in
  its local steps) is read from its newest state file in the ``ClientStateStore``; clients that never
  played have none. It is used *with* the global adapter (both active, weight 1).
- ``finetune``: each client trains ``personal.steps`` local steps from the final global adapter on its own
  data (seeded as a round ``fed.rounds + 1``); the result *replaces* the global adapter. This runs on the
  server rank, one client after another (a simulation shortcut: on devices, each client would do it).

Written next to the final checkpoint, each in diffusers' LoRA format::

    checkpoints/final/personal/personal.json                mode, clients, how each adapter is used (split: rank)
    checkpoints/final/personal/client_NNNN/pytorch_lora_weights.safetensors

``fed-ddp generate CKPT --client k`` loads them. Evaluation (digits): the generation accuracy of the
global and of each personal model on the client digits (same images per prompt and seeds as the global
figure, so the two are paired), averaged over the digits the client holds (``own``) and the others.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fed_ddp.diffusion.families import denoiser
from fed_ddp.diffusion.lora import (
    clear_personal,
    export_adapter,
    export_personal,
    init_personal,
    personal_state,
    set_personal,
)
from fed_ddp.evaluation import generation_accuracy, mean_over
from fed_ddp.hooks import ClientHook, ClientJob
from fed_ddp.seeds import client_personal

log = logging.getLogger("fed_ddp.personal")
FOLDER = "personal"
INDEX = "personal.json"


def client_dir(ckpt: str | Path, client: int) -> Path:
    return Path(ckpt) / FOLDER / f"client_{client:04d}"


def read_index(ckpt: str | Path) -> dict | None:
    """``personal.json`` of a checkpoint (None: the run has no personal adapters)."""
    p = Path(ckpt) / FOLDER / INDEX
    return json.loads(p.read_text()) if p.is_file() else None


PERSONAL_KEY = "personal|"  # prefix of the personal adapter's tensors in a client's state file


class PersonalClient(ClientHook):
    """personal.mode=split on the client: its personal adapter from its state file (or peft's initialisation from
    its own seed) before training, trained alongside the shared one, then kept in its state file, never in the
    message; the model is left without it."""

    prefix, saves = PERSONAL_KEY, True

    def __init__(self, seed: int):
        self.seed = seed

    def before_fit(self, worker, job: ClientJob) -> None:
        if job.state_round < 0:
            init_personal(denoiser(worker.pipe), client_personal(self.seed, job.client))
            return
        tensors, _ = worker.saved_state(job.client, job.state_round)
        set_personal(denoiser(worker.pipe), {k[len(PERSONAL_KEY):]: v for k, v in tensors.items()
                                             if k.startswith(PERSONAL_KEY)})

    def after_fit(self, worker, job: ClientJob, delta: torch.Tensor) -> torch.Tensor:
        job.saved.update({PERSONAL_KEY + k: v for k, v in personal_state(denoiser(worker.pipe)).items()})
        clear_personal(denoiser(worker.pipe))
        return delta


def split_states(server) -> dict[int, dict[str, torch.Tensor]]:
    """personal.mode=split: each client's personal adapter as of the last round it played."""
    from fed_ddp.population import ClientStateStore

    store = ClientStateStore(server.run_dir / "clients", cache_size=0)
    out = {}
    for c in map(int, np.flatnonzero(server.last_played > 0)):
        got = store.load_round(c, int(server.last_played[c]))
        if got is None:
            raise RuntimeError(f"client {c}: its state of round {server.last_played[c]} is missing under {store.root}")
        out[c] = {k[len(PERSONAL_KEY):]: v for k, v in got[0].items() if k.startswith(PERSONAL_KEY)}
    return out


def finetune_adapters(server, global_flat: torch.Tensor) -> dict[int, torch.Tensor]:
    """personal.mode=finetune: every client's adapter after ``personal.steps`` local steps from ``global_flat``."""
    from fed_ddp.client import LocalTrainer
    from fed_ddp.diffusion.models import encode_set
    from fed_ddp.engines import TorchEngine
    from fed_ddp.strategies import RoundPlan

    cfg, pipe = server.cfg, server.pipe
    replay = encode_set(pipe, server.data.replay) if server.data.replay is not None and cfg.data.replay_fraction > 0 \
        else None
    engine = TorchEngine(denoiser(pipe), cfg.train)
    plan = RoundPlan(round=cfg.fed.rounds + 1, local_steps=cfg.personal.steps or cfg.fed.local_steps,
                     lr=cfg.personal.lr if cfg.personal.lr is not None else cfg.train.lr,
                     values=server.plan(cfg.fed.rounds + 1).values)  # the strategy's plan values, as every round
    out = {}
    for c, data in enumerate(server.data.clients):
        t = LocalTrainer(pipe, server.scheduler, data, cfg.train, cfg.run.seed, replay, cfg.data.replay_fraction,
                         client_id=c, engine=engine)
        delta, _ = t.fit(global_flat, plan)
        out[c] = global_flat.cpu() + delta
    server.engine.write_adapter(global_flat)
    return out


def personalize(server, global_flat: torch.Tensor, final: dict) -> dict:
    """Export every client's personal adapter next to ``checkpoints/final``; on digits, evaluate each against the
    global adapter and log the table. Returns the ``personal`` block of summary.json."""
    cfg, unet = server.cfg, denoiser(server.pipe)
    mode, e = cfg.personal.mode, cfg.eval
    t0 = time.perf_counter()
    ckpt = server.run_dir / "checkpoints" / "final"
    adapters = split_states(server) if mode == "split" else finetune_adapters(server, global_flat)
    digits = list(cfg.data.digits)
    evaluate = cfg.data.source == "digits" and "gen_acc" in final
    held = [{int(k) for k, n in client["label_counts"].items() if n > 0} for client in server.data.summary()["clients"]]
    kept = personal_state(unet) if mode == "split" else None
    clients: dict[str, dict] = {}
    try:
        for c, adapter in adapters.items():
            if mode == "split":
                set_personal(unet, adapter)
                export_personal(unet, client_dir(ckpt, c))
            else:
                server.engine.write_adapter(adapter)
                export_adapter(unet, client_dir(ckpt, c))
            if not evaluate:
                continue
            acc = generation_accuracy(server.pipe, digits, e.images_per_prompt, cfg.run.seed, e.inference_steps,
                                      e.guidance_scale)
            glob = {d: final["gen_acc"][str(d)] for d in digits}
            own = [d for d in digits if d in held[c]]
            others = [d for d in digits if d not in held[c]]
            clients[str(c)] = {"own_digits": own, "own_global": mean_over(glob, own), "own_personal": mean_over(acc, own),
                               "others_global": mean_over(glob, others), "others_personal": mean_over(acc, others),
                               "gen_acc_personal": {str(d): a for d, a in acc.items()}}
    finally:
        if mode == "split":
            set_personal(unet, kept)
        else:
            server.engine.write_adapter(global_flat)
    use = "with the global adapter (both active, weight 1.0)" if mode == "split" else "instead of the global adapter"
    (ckpt / FOLDER / INDEX).parent.mkdir(parents=True, exist_ok=True)
    index = {"mode": mode, "clients": sorted(adapters), "use": use,
             **({"rank": cfg.personal.rank or cfg.lora.rank} if mode == "split" else {})}
    (ckpt / FOLDER / INDEX).write_text(json.dumps(index, indent=2))
    out: dict = {"mode": mode, "clients_with_adapter": len(adapters), "images_per_prompt": e.images_per_prompt,
                 "clients": clients}
    if mode == "split":
        out["rank"] = cfg.personal.rank or cfg.lora.rank
    else:
        out["steps"] = cfg.personal.steps or cfg.fed.local_steps
    if clients:
        keys = ("own_global", "own_personal", "others_global", "others_personal")
        out["mean"] = {k: float(np.nanmean([v[k] for v in clients.values()])) for k in keys}
        out["own_gain_min"] = min(v["own_personal"] - v["own_global"] for v in clients.values())
        log.info("%s", table(out))
    out["seconds"] = time.perf_counter() - t0
    log.info("personal adapters (%s) of %d clients in %s (%.1f s)", mode, len(adapters), ckpt / FOLDER, out["seconds"])
    return out


def table(block: dict) -> str:
    """The per-client table of a summary's ``personal`` block."""
    def pct(x: float) -> str:
        return "   -  " if np.isnan(x) else f"{100 * x:5.1f}%"  # nan: the client holds every client digit

    lines = [(f"Personalization ({block['mode']}): generation accuracy ({block['images_per_prompt']} images per "
              "digit) on each client's own digits and on the other clients' digits"),
             "  client  own digits   own: global  personal    others: global  personal"]
    for c, v in block["clients"].items():
        lines.append(f"  {c:>6}  {','.join(map(str, v['own_digits'])):11s}  {pct(v['own_global']):>11}  "
                     f"{pct(v['own_personal']):>8}    {pct(v['others_global']):>14}  {pct(v['others_personal']):>8}")
    m = block["mean"]
    lines.append(f"  {'mean':>6}  {'':11s}  {pct(m['own_global']):>11}  {pct(m['own_personal']):>8}    "
                 f"{pct(m['others_global']):>14}  {pct(m['others_personal']):>8}")
    return "\n".join(lines)
