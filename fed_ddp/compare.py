"""What federation buys: federated vs centralized vs local-only LoRA fine-tuning, at equal total local steps.

    fed-ddp compare configs/quickstart.yaml [key=value ...]
    fed-ddp compare configs/quickstart.yaml --strategies fedavg,ffa_lora,flexlora,fedyogi:server_lr=0.01   # one arm each

All three arms run in this one process through the in-memory transport, with the same base, data
split, seeds, evaluation and server loop as ``fed-ddp run``:

- federated:   m sampled clients x K local steps per round, aggregated by ``fed.strategy`` (a sequential
               simulation of the multi-process run: same maths, clients one after another); with
               ``--strategies`` one such arm per strategy, ``federated-<strategy>``;
- centralized: one trainer on the pooled data of all clients, m*K steps per round (plain: fedavg);
- local-only:  client ``--client`` (0) alone on its own data, m*K steps per round.

m = the expected clients per round (all N by default), so every arm takes the same number of steps.

Results go to ``<output_dir>/<name>-compare/{federated,centralized,local_only}/`` and a table is
printed and written to ``compare.json``.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from fed_ddp.compression import layout_of
from fed_ddp.config import ConfigError, RunConfig
from fed_ddp.data.federated import FederatedData, build_federated_data, concat
from fed_ddp.diffusion.families import denoiser
from fed_ddp.diffusion.lora import get_flat, prepare_trainable, set_flat
from fed_ddp.diffusion.models import base_path, load_pipeline, quiet_libraries, training_scheduler
from fed_ddp.lora_ranks import client_rank
from fed_ddp.protocol import wire_for
from fed_ddp.results import RunSummary
from fed_ddp.server import run_server
from fed_ddp.tracking import setup_logging
from fed_ddp.transport import InMemoryTransport
from fed_ddp.worker import Worker


def run_arm(cfg: RunConfig, pipe, scheduler, data: FederatedData, init: torch.Tensor, base: str) -> RunSummary:
    """One arm: the production server loop and worker over the in-memory transport (one worker plays every
    sampled client in turn; a client's update does not depend on which worker plays it)."""
    set_flat(denoiser(pipe), init)
    wire = wire_for(cfg, layout_of(denoiser(pipe)), workers=1)
    worker = Worker(0, cfg, pipe, scheduler, data, wire)
    return run_server(cfg, pipe, scheduler, data, InMemoryTransport([worker.handle]), base, wire=wire)


def compare(cfg: RunConfig, client: int = 0, strategies: list[str] | None = None) -> dict:
    """Run the arms and print one table. ``strategies``: one federated arm per strategy (``fed.strategy``
    otherwise), each from the same initial adapter; the centralized and local-only arms train plainly
    (fedavg: the trainer's own steps)."""
    if cfg.personal.mode != "none":
        raise ConfigError("personal.mode", cfg.personal.mode, "fed-ddp compare measures global models: set "
                          "personal.mode=none (fed-ddp run reports each client's personal vs global accuracy)")
    quiet_libraries()
    setup_logging("compare", 0, cfg.run.log_level)
    base = base_path(cfg.model)
    pipe = load_pipeline(base, torch.device("cpu"), cfg.model.revision, cfg.model.family)
    prepare_trainable(denoiser(pipe), cfg)
    start = {n: p.detach().clone() for n, p in denoiser(pipe).named_parameters() if p.requires_grad or ".lora_" in n}
    scheduler = training_scheduler(pipe)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    root = f"{cfg.run.name}-compare"
    n, k = round(cfg.fed.expected_round_size), cfg.fed.local_steps
    single = dataclasses.replace(cfg.fed, num_clients=1, workers=1, clients_per_round=None, sampling="all",
                                 sample_rate=None, availability=1.0, dropout_rate=0.0, local_steps=n * k,
                                 strategy="fedavg", server_lr=1.0, aggregator="mean")
    # the simulated cell models federated rounds: the pooled and the local-only trainer are not in it
    alone = dataclasses.replace(cfg, fed=single, wireless=dataclasses.replace(cfg.wireless, enabled=False))
    # lora.client_ranks: the pooled trainer at the global rank, the local-only client at its own
    own = [client_rank(cfg.lora.client_ranks, client)] if cfg.lora.client_ranks else []
    pooled = dataclasses.replace(alone, lora=dataclasses.replace(cfg.lora, client_ranks=[]))
    alone = dataclasses.replace(alone, lora=dataclasses.replace(cfg.lora, client_ranks=own))
    federated = {"federated": cfg} if not strategies else {arm_name(s): arm_config(cfg, s) for s in strategies}
    arms = {**{name: (c, data) for name, c in federated.items()},
            "centralized": (pooled, dataclasses.replace(data, clients=[concat(data.clients)])),
            "local_only": (alone, dataclasses.replace(data, clients=[data.clients[client]]))}
    results = {}
    for name, (arm_cfg, arm_data) in arms.items():
        arm_cfg = dataclasses.replace(arm_cfg, run=dataclasses.replace(cfg.run, name=name, overwrite=not cfg.run.resume,
                                                                       output_dir=str(cfg.run.dir.parent / root)))
        print(f"\n== {name}: {arm_cfg.fed.num_clients} trainer(s) x {arm_cfg.fed.local_steps} steps x "
              f"{arm_cfg.fed.rounds} rounds on {sum(len(d) for d in arm_data.clients)} private examples", flush=True)
        results[name] = run_arm(arm_cfg, pipe, scheduler, arm_data, _start_arm(denoiser(pipe), start, arm_cfg), base)
    # the pooled and the local-only trainer send nothing: their one-client runs' wire bytes are not theirs (None)
    sent = {name: name not in ("centralized", "local_only") for name in results}
    table = {name: {"total_local_steps": (1 if not sent[name] else n) * arms[name][0].fed.local_steps * cfg.fed.rounds,
                    "examples": sum(len(d) for d in arms[name][1].clients),
                    "gen_acc_clients": r.final.get("gen_acc_clients"),
                    "gen_acc_base": r.final.get("gen_acc_base"),
                    "val_loss": r.final.get("val_loss"),
                    "bytes_up_total": r.bytes_up_total if sent[name] else None,
                    "air_up_total": r.comm["air"]["up"]["total"] if sent[name] else None}
             for name, r in results.items()}
    first = results[next(iter(federated))]
    table["base"] = {"gen_acc_clients": first.base.get("gen_acc_clients"),
                     "gen_acc_base": first.base.get("gen_acc_base"),
                     "val_loss": first.base.get("val_loss")}
    out = cfg.run.dir.parent / root / "compare.json"
    out.write_text(json.dumps(table, indent=2))
    print_compare(table)
    print(f"\nwritten: {out}")
    return table


ARM_KEYS = ("server_lr", "server_momentum", "beta1", "beta2", "tau", "proximal_mu", "aggregator", "trim_fraction")


def arm_name(spec: str) -> str:
    """The arm's name and run folder: ``federated-fedyogi+server_lr=0.01`` for ``fedyogi:server_lr=0.01``."""
    return "federated-" + spec.replace(":", "+")


def arm_config(cfg: RunConfig, spec: str) -> RunConfig:
    """One federated arm from ``--strategies``: ``name`` or ``name:key=value[:key=value]`` with the strategy's
    fed.* hyper-parameters (``ARM_KEYS``; ``fedyogi:server_lr=0.01``: each strategy at its own settings in one
    table); everything that sets the number of steps stays the same for every arm."""
    from fed_ddp.config import load_config

    name, *settings = spec.split(":")
    for kv in settings:
        if kv.split("=", 1)[0] not in ARM_KEYS or "=" not in kv:
            raise ConfigError("--strategies", spec, f"{kv!r}: an arm may set only {', '.join(ARM_KEYS)} "
                              "(as name:key=value); every arm takes the same clients, rounds and steps")
    try:
        arm = load_config(None, [f"fed.strategy={name}", *(f"fed.{kv}" for kv in settings)], base=cfg)
        dataclasses.replace(arm.run, name=arm_name(spec))  # a valid run folder name
    except ConfigError as e:
        raise ConfigError("--strategies", spec, str(e)) from None
    return arm


def _start_arm(unet, start: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor:
    """Every arm starts from the same adapter, and trains what its strategy trains (FFA-LoRA's arm: B only, its flat
    vector holds no A)."""
    from fed_ddp.strategies import REGISTRY

    frozen = REGISTRY[cfg.fed.strategy].frozen_factors
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in start:
                p.copy_(start[name])
                if ".lora_A." in name:
                    p.requires_grad_("lora_A" not in frozen)
    return get_flat(unet)


def _bytes(n) -> str:
    return "-" if n is None else f"{n:,}"  # the base, and the pooled and local-only trainers, send nothing


def print_compare(table: dict) -> None:
    rows = ["base", *[k for k in table if k.startswith("federated")], "centralized", "local_only"]
    width = max(14, *(len(r) + 2 for r in rows))
    print(f"\n{'':{width}s}{'steps':>8s}{'examples':>10s}{'acc, client concepts':>22s}{'acc, base concepts':>20s}"
          f"{'val loss':>10s}{'uplink bytes':>16s}")
    central = table["centralized"].get("gen_acc_clients")
    for name in rows:
        r = table[name]

        def pct(v):
            return f"{v:.1%}" if isinstance(v, float) else "-"

        steps = r.get("total_local_steps", 0)
        print(f"{name:{width}s}{steps:8d}{r.get('examples', 0):10d}{pct(r['gen_acc_clients']):>22s}"
              f"{pct(r['gen_acc_base']):>20s}{r['val_loss']:10.4f}{_bytes(r.get('air_up_total')):>16s}")
    if isinstance(central, float) and central > 0:
        for name in rows[1:-2]:
            acc = table[name].get("gen_acc_clients")
            if isinstance(acc, float):
                print(f"{name}: {acc / central:.0%} of centralized on the client concepts")
