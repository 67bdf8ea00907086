"""What federation buys: federated vs centralized vs local-only LoRA fine-tuning, at equal total local steps.

    fed-ddp compare configs/quickstart.yaml [key=value ...]

All three arms run in this one process through the in-memory transport, with the same base, data
split, seeds, evaluation and server loop as ``fed-ddp run``:

- federated:   m sampled clients x K local steps per round, aggregated by ``fed.strategy`` (a sequential
               simulation of the multi-process run: same maths, clients one after another);
- centralized: one trainer on the pooled data of all clients, m*K steps per round;
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
from fed_ddp.config import RunConfig
from fed_ddp.data.federated import FederatedData, build_federated_data, concat
from fed_ddp.diffusion.lora import get_flat, prepare_trainable, set_flat
from fed_ddp.diffusion.models import base_path, load_pipeline, quiet_libraries, training_scheduler
from fed_ddp.protocol import Wire
from fed_ddp.server import run_server
from fed_ddp.tracking import setup_logging
from fed_ddp.transport import InMemoryTransport
from fed_ddp.worker import Worker


def run_arm(cfg: RunConfig, pipe, scheduler, data: FederatedData, init: torch.Tensor, base: str) -> dict:
    """One arm: the production server loop and worker over the in-memory transport (one worker plays every
    sampled client in turn; a client's update does not depend on which worker plays it)."""
    set_flat(pipe.unet, init)
    wire = Wire(cfg.comm, layout_of(pipe.unet), workers=1, privacy_fields=cfg.privacy.clips)
    worker = Worker(0, cfg, pipe, scheduler, data, wire)
    return run_server(cfg, pipe, scheduler, data, InMemoryTransport([worker.handle]), base, wire=wire)


def compare(cfg: RunConfig, client: int = 0) -> dict:
    quiet_libraries()
    setup_logging("compare", 0, cfg.run.log_level)
    base = base_path(cfg.model)
    pipe = load_pipeline(base, torch.device("cpu"), cfg.model.revision)
    prepare_trainable(pipe.unet, cfg)
    init = get_flat(pipe.unet)
    scheduler = training_scheduler(pipe)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    root = f"{cfg.run.name}-compare"
    n, k = round(cfg.fed.expected_round_size), cfg.fed.local_steps
    single = dataclasses.replace(cfg.fed, num_clients=1, workers=1, clients_per_round=None, sampling="all",
                                 sample_rate=None, availability=1.0, dropout_rate=0.0, local_steps=n * k)
    # the simulated cell models federated rounds: the pooled and the local-only trainer are not in it
    alone = dataclasses.replace(cfg, fed=single, wireless=dataclasses.replace(cfg.wireless, enabled=False))
    arms = {
        "federated": (dataclasses.replace(cfg, fed=cfg.fed), data),
        "centralized": (alone, dataclasses.replace(data, clients=[concat(data.clients)])),
        "local_only": (alone, dataclasses.replace(data, clients=[data.clients[client]])),
    }
    results = {}
    for name, (arm_cfg, arm_data) in arms.items():
        arm_cfg = dataclasses.replace(arm_cfg, run=dataclasses.replace(cfg.run, name=name, overwrite=not cfg.run.resume,
                                                                       output_dir=str(cfg.run.dir.parent / root)))
        print(f"\n== {name}: {arm_cfg.fed.num_clients} trainer(s) x {arm_cfg.fed.local_steps} steps x "
              f"{arm_cfg.fed.rounds} rounds on {sum(len(d) for d in arm_data.clients)} private examples", flush=True)
        results[name] = run_arm(arm_cfg, pipe, scheduler, arm_data, init, base)
    table = {name: {"total_local_steps": (n if name == "federated" else 1) * arms[name][0].fed.local_steps
                    * cfg.fed.rounds,
                    "examples": sum(len(d) for d in arms[name][1].clients),
                    "gen_acc_clients": r["final"].get("gen_acc_clients"),
                    "gen_acc_base": r["final"].get("gen_acc_base"),
                    "val_loss": r["final"].get("val_loss"),
                    "bytes_up_total": r["bytes_up_total"]}
             for name, r in results.items()}
    table["base"] = {"gen_acc_clients": results["federated"]["base"].get("gen_acc_clients"),
                     "gen_acc_base": results["federated"]["base"].get("gen_acc_base"),
                     "val_loss": results["federated"]["base"].get("val_loss")}
    out = cfg.run.dir.parent / root / "compare.json"
    out.write_text(json.dumps(table, indent=2))
    print_compare(table)
    print(f"\nwritten: {out}")
    return table


def print_compare(table: dict) -> None:
    print(f"\n{'':14s}{'steps':>8s}{'examples':>10s}{'acc, client concepts':>22s}{'acc, base concepts':>20s}"
          f"{'val loss':>10s}")
    for name in ("base", "federated", "centralized", "local_only"):
        r = table[name]

        def pct(v):
            return f"{v:.1%}" if isinstance(v, float) else "-"

        steps = r.get("total_local_steps", 0)
        print(f"{name:14s}{steps:8d}{r.get('examples', 0):10d}{pct(r['gen_acc_clients']):>22s}"
              f"{pct(r['gen_acc_base']):>20s}{r['val_loss']:10.4f}")
