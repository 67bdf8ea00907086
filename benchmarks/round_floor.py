"""A round vs its compute floor, communication vs the raw collective, start-up vs one load (issue 14, floors 2, 3, 5).

One command measures, side by side and interleaved (a shared, noisy machine slows both alike):

- **Floor 2, round vs compute floor.** Real ``fed-ddp run``s (a fresh launcher, 1 + W ranks) of each config with
  a few rounds, in each thread/worker layout asked for, read back from their metrics.jsonl; against the same
  rounds' clients (the ids each run reports, their data, steps, seeds and replay; scaffold's gradient hooks)
  trained one after another by ``LocalTrainer`` in this one process with all cores. Ratio = the round's wall
  time without its evaluation / the floor. Round 1 (data encoding, workers still starting) is shown apart.
- **Floor 3, communication vs the raw collective.** The rounds' ``communication`` (the server's exchange wall
  time minus the busiest worker's client time) against bare ``torch.distributed`` broadcasts + gather of the
  run's byte counts on a gloo group of the same 1 + W processes. The workers' protocol work outside training
  (unpacking the downlink, joining the uplink) is timed on its own, so what is left is waiting on the workers.
- **Floor 5, start-up.** From the launch of ``fed-ddp run`` to round 1's start (``started_at`` in
  metrics.jsonl), against a fresh interpreter that imports torch + diffusers and loads the base pipeline once;
  the work every rank repeats is timed in that interpreter too.

    .venv/bin/python benchmarks/round_floor.py                      # 20-30 min on 2 shared CPU cores
    .venv/bin/python benchmarks/round_floor.py --quick --base DIR   # smoke test: tiny config, one layout

Goals (issue 14): round <= 1.15x its compute floor; communication <= 1.25x the raw collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fed_ddp.distributed.nodes import cpu_cores  # the cores the launcher counts (affinity mask)
from fed_ddp.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("local_training", "client_overhead", "communication", "aggregation", "other")  # + evaluation = round
# layouts: (label, fed.workers or None for the config's own, train.num_threads or None for the config's own)
# (more threads per rank are left out: on a 2-core machine shared with other jobs a rank at 2 threads trained 24x
# slower than at 1, measured; the one-thread vs all-cores check of the floor shows it on every run)
LAYOUTS = {"quickstart": [("default", None, None), ("w2 t1", 2, 1)],
           "population": [("default", None, None), ("w4 t1", 4, 1)]}
STARTUP_REF = r"""
import json, sys, time
t0 = time.time()
import torch
t1 = time.time()
import diffusers
t2 = time.time()
pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1])
t3 = time.time()
out = {"loaded_at": t3, "import_torch": t1 - t0, "import_diffusers": t2 - t1, "load_pipeline": t3 - t2}
# what every rank of a run does again after that (timed here once)
from fed_ddp.client import encode_set
from fed_ddp.config import load_config
from fed_ddp.data.federated import build_federated_data
from fed_ddp.diffusion.models import load_pipeline
from fed_ddp.evaluation import reference_classifier
from fed_ddp.results import read_rows
t = time.time(); cfg = load_config(sys.argv[2], json.loads(sys.argv[3])); out["fed_ddp_imports_config"] = time.time() - t
t = time.time(); pipe = load_pipeline(sys.argv[1], torch.device("cpu"), cfg.model.revision, cfg.model.family)
out["fed_ddp_load_pipeline"] = time.time() - t
t = time.time(); data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
out["build_federated_data"] = time.time() - t
if data.replay is not None:
    t = time.time(); encode_set(pipe, data.replay); out["encode_replay_set"] = time.time() - t
t = time.time(); reference_classifier(); out["reference_classifier"] = time.time() - t
print(json.dumps(out))
"""


# -- the real run ------------------------------------------------------------------------------------
def fed_run(config: str, overrides: list[str]) -> dict:
    """``fed-ddp run`` in a fresh interpreter, as a user starts it; its metrics rows and launch time."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    launch = time.time()
    p = subprocess.run([sys.executable, "-m", "fed_ddp.cli", "run", config, *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"fed-ddp run {config} {' '.join(overrides)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir="))) / next(
        o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
    rows, _ = read_rows(run_dir)  # typed and checked (fed_ddp.results); read below as the rows' JSON
    return {"launch": launch, "wall": time.time() - launch, "base": rows.base.to_json(),
            "rounds": [r.to_json() for r in rows.ordered() if r.round > 0]}


def breakdown(row: dict) -> dict:
    """A round's parts, checked to add up to its wall time."""
    s = row["seconds"]
    total = sum(s[k] for k in PARTS) + s["evaluation"]
    if abs(total - s["round"]) > 1e-6 * max(1.0, s["round"]):
        raise AssertionError(f"round {row['round']}: parts add up to {total:.6f} s, round {s['round']:.6f} s")
    return {**{k: s[k] for k in PARTS}, "evaluation": s["evaluation"], "without_eval": s["round"] - s["evaluation"]}


# -- the compute floor -------------------------------------------------------------------------------
class Floor:
    """The clients' local training, one after another, in this process with all cores (no ranks, no wire)."""

    def __init__(self, config: str, overrides: list[str]):
        from fed_ddp.client import encode_set
        from fed_ddp.compression import layout_of
        from fed_ddp.config import load_config
        from fed_ddp.data.federated import build_federated_data
        from fed_ddp.diffusion.families import denoiser
        from fed_ddp.diffusion.lora import get_flat, prepare_trainable
        from fed_ddp.diffusion.models import base_path, load_pipeline, training_scheduler
        from fed_ddp.engines import TorchEngine
        from fed_ddp.strategies import build_strategy

        self.cfg = cfg = load_config(config, overrides)
        self.base = base_path(cfg.model)
        self.pipe = load_pipeline(self.base, torch.device("cpu"), cfg.model.revision, cfg.model.family)
        prepare_trainable(denoiser(self.pipe), cfg)
        self.scheduler = training_scheduler(self.pipe)
        self.data = build_federated_data(cfg, channels=self.pipe.vae.config.in_channels)
        self.replay = encode_set(self.pipe, self.data.replay) if self.data.replay is not None and \
            cfg.data.replay_fraction > 0 else None
        self.engine = TorchEngine(denoiser(self.pipe), cfg.train)
        self.layout = layout_of(denoiser(self.pipe))
        self.strategy = build_strategy(cfg.fed, cfg.train, self.layout)
        self.start = get_flat(denoiser(self.pipe))
        self.trainers: dict = {}
        self.warm = False

    def trainer(self, client: int):
        from fed_ddp.client import LocalTrainer, encode_set

        if client not in self.trainers:  # encoded once, outside the timing: the floor is training only
            c = self.cfg
            self.trainers[client] = LocalTrainer(self.pipe, self.scheduler, encode_set(self.pipe, self.data.clients[client]),
                                                 c.train, c.run.seed, self.replay, c.data.replay_fraction,
                                                 client_id=client, engine=self.engine)
        return self.trainers[client]

    def fit(self, client: int, plan) -> float:
        """Wall seconds of one client's ``LocalTrainer.fit`` (scaffold: through its gradient hooks, c - c_i = 0)."""
        from fed_ddp.strategies.scaffold import corrected_gradients

        t = self.trainer(client)
        if not self.warm:  # the process's first steps (allocator, kernels) are not the floor's
            t.fit(self.start, dataclasses.replace(plan, local_steps=3))
            self.warm = True
        t0 = time.perf_counter()
        if self.strategy.controls:
            with corrected_gradients(t.engine.params, torch.zeros_like(self.start),
                                     self.cfg.train.gradient_accumulation_steps):
                t.fit(self.start, plan)
        else:
            t.fit(self.start, plan)
        return time.perf_counter() - t0

    def round(self, rnd: int, clients: list[int]) -> float:
        """Seconds of ``clients``' local training in round ``rnd``, one after another at one thread (each from the
        same start adapter: the cost of a step does not depend on the adapter's values)."""
        torch.set_num_threads(1)
        plan = self.strategy.configure_round(rnd)
        return sum(self.fit(c, plan) for c in clients)

    def speed(self, client: int, steps: int) -> tuple[float, float]:
        """(seconds at one thread, seconds at all cores) of the same ``steps``-step fit of ``client``, back to back."""
        plan = dataclasses.replace(self.strategy.configure_round(1), local_steps=steps)
        out = []
        for n in (1, cpu_cores()):
            torch.set_num_threads(n)
            out.append(self.fit(client, plan))
        torch.set_num_threads(1)
        return out[0], out[1]


# -- the raw collective ------------------------------------------------------------------------------
def _collective_rank(rank: int, world: int, port: int, sizes: dict, repeats: int, threads: int, out: str) -> None:
    """One rank of the bare exchange: broadcast head, broadcast body, gather the uplinks (the run's method).

    With ``sizes["work"]`` > 0 every worker first does that many fixed matmuls (the same CPU work each, as
    clients of equal steps) and sends its wall time of it in its uplink's first 8 bytes; the server then times
    the exchange as fed_ddp does: wall time minus the busiest worker's own time."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    head = torch.zeros(sizes["head"], dtype=torch.uint8)
    body = torch.zeros(sizes["body"], dtype=torch.uint8)
    ups = sizes["up"]  # by worker
    times = []
    a = torch.randn(96, 96) / 10
    for _ in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(head, src=0)
        dist.broadcast(body, src=0)
        n = max(ups) if sizes["method"] == "gather" else ups[rank - 1] if rank else 0
        mine = torch.zeros(n, dtype=torch.uint8)  # "gather": every slot padded to the largest, the server's too
        if rank and sizes["work"]:
            t1 = time.perf_counter()
            x = a
            for _ in range(sizes["work"]):
                x = torch.tanh(x @ a)
            mine[:8] = torch.tensor([time.perf_counter() - t1], dtype=torch.float64).view(torch.uint8)
        got = [torch.empty(max(ups), dtype=torch.uint8) for _ in range(world)] if rank == 0 else []
        if sizes["method"] == "gather":
            dist.gather(mine, gather_list=got if rank == 0 else None, dst=0)
        elif rank == 0:
            got = [torch.empty(0, dtype=torch.uint8)] + [torch.empty(k, dtype=torch.uint8) for k in ups]
            ops = [dist.P2POp(dist.irecv, got[w + 1], w + 1) for w, k in enumerate(ups) if k]
            for op in dist.batch_isend_irecv(ops) if ops else []:
                op.wait()
        elif n:
            for op in dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, 0)]):
                op.wait()
        busy = max((float(g[:8].view(torch.float64)) for g in got[1:] if g.numel() >= 8), default=0.0) \
            if sizes["work"] else 0.0
        times.append(time.perf_counter() - t0 - busy)
    if rank == 0:
        Path(out).write_text(json.dumps(times[2:]))  # two warm-ups
    dist.destroy_process_group()


def raw_collective(workers: int, sizes: dict, repeats: int, threads: int) -> list[float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        mp.spawn(_collective_rank, args=(1 + workers, port, sizes, repeats, threads, out), nprocs=1 + workers)
        return json.loads(Path(out).read_text())


def exchange_sizes(floor: Floor, row: dict, workers: int) -> dict:
    """The round's buffers, packed here by the run's own wire and checked against the bytes the run moved."""
    from fed_ddp.compression import ChainState
    from fed_ddp.population import assign
    from fed_ddp.protocol import wire_for

    wire = wire_for(floor.cfg, floor.layout, workers)
    table = assign(row["clients"]["arrived"], workers)
    if [len(r) for r in table] != row["clients"]["per_worker"]:
        raise AssertionError(f"round {row['round']}: assignment {table} vs the run's per_worker {row['clients']['per_worker']}")
    head = wire.pack_head(floor.strategy.configure_round(row["round"]), max(len(r) for r in table))
    body = wire.pack_body(table, floor.strategy.downlink(floor.start), ChainState(seed=0), {})
    if (head.numel() + body.numel()) * workers != row["bytes_down"]:
        raise AssertionError(f"round {row['round']}: downlink {head.numel()} + {body.numel()} B x {workers} workers "
                             f"!= the run's bytes_down {row['bytes_down']}")
    ups = wire.up_sizes(table)
    up = row["comm"]["cluster"]["up"]
    if sum(ups) != up["moved"] - up["padding"] - up["sizes"]:
        raise AssertionError(f"round {row['round']}: uplink {ups} != the run's {up}")
    return {"head": head.numel(), "body": body.numel(), "up": ups, "method": floor.cfg.comm.gather,
            "wire": wire, "table": table, "head_t": head, "body_t": body}


def worker_protocol_seconds(sizes: dict, repeats: int) -> float:
    """A worker's protocol work outside playing clients, per exchange (the busiest worker's): read the head and
    the body (table, state rounds, global adapter; scaffold: its split) and join its messages."""
    from fed_ddp.protocol import ControlWire

    wire, head, body = sizes["wire"], sizes["head_t"], sizes["body_t"]
    busiest = max(range(len(sizes["up"])), key=lambda w: sizes["up"][w])
    n = len(sizes["table"][busiest])
    msgs = [torch.zeros(sizes["up"][busiest] // max(1, n), dtype=torch.uint8) for _ in range(n)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = wire.unpack_head(head.clone())
        wire.body_nbytes(h.slots)
        _, _, flat = wire.unpack_body_rounds(body.clone(), h.slots)
        if isinstance(wire, ControlWire):
            wire.split(flat)
        torch.cat(msgs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- start-up reference ------------------------------------------------------------------------------
def startup_reference(base: str, config: str, overrides: list[str]) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", STARTUP_REF, base, config, json.dumps(overrides)], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"start-up reference failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["load_once"] = out.pop("loaded_at") - t0  # interpreter start + import torch + diffusers + one load
    return out


# -- the benchmark -----------------------------------------------------------------------------------
def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_config(config: str, label: str, layouts, common: list[str], args, out_dir: Path, log) -> dict:
    floor = Floor(config, common)
    cfg = floor.cfg
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in layouts}
    floors: list[dict[int, float]] = []  # per repeat: round -> one-thread serial training seconds
    speeds: list[tuple[float, float]] = []  # per repeat: the same fit at one thread, at all cores
    refs: list[dict] = []
    for rep in range(args.repeats):
        for i, (name, workers, threads) in enumerate(layouts):
            extra = [f"run.output_dir={out_dir}", f"run.name={label}-{name.replace(' ', '')}-{rep}", "run.overwrite=true"]
            extra += [f"fed.workers={workers}"] if workers else []
            extra += [f"train.num_threads={threads}"] if threads else []
            run = fed_run(config, common + extra)
            runs[name].append(run)
            clients = {r["round"]: r["clients"]["arrived"] for r in run["rounds"]}
            if i == 0:  # the floor of these rounds, right after the default layout's run (interleaved)
                t0 = time.perf_counter()
                floors.append({rnd: floor.round(rnd, cs) for rnd, cs in clients.items()})
                speeds.append(floor.speed(clients[1][0], min(args.speed_steps, cfg.fed.local_steps)))
                log(f"  {label} repeat {rep + 1}: one-thread floor {sum(floors[-1].values()):.1f} s "
                    f"({time.perf_counter() - t0:.1f} s with the first encodings and the speed check: one client at "
                    f"1 / {cpu_cores()} threads {speeds[-1][0]:.2f} / {speeds[-1][1]:.2f} s); load {os.getloadavg()[0]:.1f}")
                refs.append(startup_reference(floor.base, config, common))
            elif clients != {r["round"]: r["clients"]["arrived"] for r in runs[layouts[0][0]][rep]["rounds"]}:
                raise AssertionError(f"{label} {name}: other clients than the default layout's run: {clients}")
            rs = [breakdown(r) for r in run["rounds"]]
            log(f"  {label} repeat {rep + 1} {name}: rounds without evaluation "
                + ", ".join(f"{b['without_eval']:.2f}" for b in rs) + " s (training alone "
                + ", ".join(f"{floors[-1][r['round']]:.2f}" for r in run["rounds"]) + " s at one thread); run wall "
                f"{run['wall']:.0f} s; load {os.getloadavg()[0]:.1f}")
    # floor 2: per layout, steady rounds (2..R) and round 1
    table = []
    for name, workers, threads in layouts:
        steady, steady_all, first, parts = [], [], [], {k: [] for k in (*PARTS, "without_eval")}
        for run, fl, (one, every) in zip(runs[name], floors, speeds):
            for r in run["rounds"]:
                b = breakdown(r)
                ideal = fl[r["round"]] / cpu_cores()
                (first if r["round"] == 1 else steady).append(b["without_eval"] / ideal)
                if r["round"] > 1:
                    steady_all.append(b["without_eval"] / (fl[r["round"]] * every / one))
                    for k, v in parts.items():
                        v.append(b[k])
        w = workers or cfg.fed.num_workers
        t = threads or cfg.train.num_threads
        startup = [r["rounds"][0]["started_at"] - r["launch"] for r in runs[name]]
        table.append({"layout": name, "workers": w, "threads": t, "ranks": 1 + w, "ratio": med(steady),
                      "ratio_allcores": med(steady_all), "ratio_round1": med(first),
                      **{k: med(v) for k, v in parts.items()},
                      "floor": med([fl[r] / cpu_cores() for fl in floors for r in fl if r > 1]),
                      "floor_allcores": med([fl[r] * e / o for fl, (o, e) in zip(floors, speeds) for r in fl if r > 1]),
                      "startup": med(startup)})
    # floor 3: the default layout's communication vs the bare collective of its bytes
    default = runs[layouts[0][0]]
    w0 = cfg.fed.num_workers
    row = default[0]["rounds"][-1]
    sizes = exchange_sizes(floor, row, w0)
    bare = {k: sizes[k] for k in ("head", "body", "up", "method")}
    raw = raw_collective(w0, {**bare, "work": 0}, args.collective_repeats, cfg.train.num_threads)
    busy = raw_collective(w0, {**bare, "work": args.work}, max(3, args.collective_repeats // 3), cfg.train.num_threads)
    proto = worker_protocol_seconds(sizes, args.collective_repeats)
    comm = [r["seconds"]["communication"] for run in default for r in run["rounds"] if r["round"] > 1]
    comm1 = [r["seconds"]["communication"] for run in default for r in run["rounds"] if r["round"] == 1]
    # floor 5: launch -> round 1 (default layout) vs one fresh load
    st = [{"ready": run["base"]["started_at"] - run["launch"], "base_eval": run["base"]["seconds"]["evaluation"],
           "round1": run["rounds"][0]["started_at"] - run["launch"]} for run in default]
    ref = {k: med([r[k] for r in refs]) for k in refs[0]}
    return {"config": label, "world": cfg.world_size, "workers": w0, "threads": cfg.train.num_threads,
            "clients_per_round": med([len(r["clients"]["arrived"]) for run in default for r in run["rounds"]]),
            "local_steps": cfg.fed.local_steps, "strategy": cfg.fed.strategy, "layouts": table,
            "speed": {"steps": min(args.speed_steps, cfg.fed.local_steps), "one_thread": med([o for o, _ in speeds]),
                      "all_cores": med([e for _, e in speeds])},
            "comm": {"round_steady": med(comm), "round1": med(comm1), "raw": med(raw), "raw_min": min(raw),
                     "raw_busy": med(busy), "ratio_busy": med(comm) / med(busy),
                     "worker_protocol": proto, "ratio": med(comm) / med(raw),
                     "ratio_with_protocol": med(comm) / (med(raw) + proto),
                     "bytes": {"head": sizes["head"], "body": sizes["body"], "up": sizes["up"],
                               "method": sizes["method"]}},
            "startup": {**{k: med([s[k] for s in st]) for k in st[0]}, "reference": ref,
                        "ratio": med([s["round1"] for s in st]) / ref["load_once"],
                        "ratio_ready": med([s["ready"] for s in st]) / ref["load_once"]}}


def report(results: list[dict], args, seconds: float) -> str:
    n = cpu_cores()
    lines = [(f"Machine: {n} CPU cores, shared with other jobs while this ran (load average {os.getloadavg()[0]:.1f} at "
              f"the end): runs and floors interleaved, medians of {args.repeats} repeat(s); torch {torch.__version__}; "
              f"{args.rounds} rounds per run; benchmark wall {seconds / 60:.1f} min."), ""]
    for res in results:
        sp = res["speed"]
        lines += [(f"## {res['config']}: {res['workers']} workers x {res['threads']} thread(s) ({res['world']} ranks) "
                   f"by default, {res['clients_per_round']:g} clients x {res['local_steps']} steps per round "
                   f"({res['strategy']})"), "",
                  ("Floor 2, round vs compute floor (goal <= 1.15x). Round = its wall time without its evaluation, "
                   "rounds 2.. (round 1 apart: it encodes the clients' data and may wait for starting workers). "
                   f"Ideal floor = the same clients' LocalTrainer.fit one after another in one process at one thread, "
                   f"/ {n} cores (perfect use of every core). All-cores floor = that loop at "
                   f"torch.set_num_threads({n}) (the issue's definition), from the same {sp['steps']}-step fit timed "
                   f"at 1 and {n} threads back to back: {sp['one_thread']:.2f} s vs {sp['all_cores']:.2f} s."), "",
                  ("| layout | ranks | round s | training | client overhead | comm | aggregation | other | ideal floor s "
                   "| ratio | all-cores floor s | ratio | round 1 / ideal | start-up s |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in res["layouts"]:
            lines.append(f"| {t['layout']} (workers {t['workers']}, threads {t['threads']}) | {t['ranks']} | "
                         f"{t['without_eval']:.2f} | {t['local_training']:.2f} | {t['client_overhead']:.2f} | "
                         f"{t['communication']:.3f} | {t['aggregation']:.3f} | {t['other']:.2f} | {t['floor']:.2f} | "
                         f"**{t['ratio']:.2f}x** | {t['floor_allcores']:.2f} | {t['ratio_allcores']:.2f}x | "
                         f"{t['ratio_round1']:.2f}x | {t['startup']:.1f} |")
        c = res["comm"]
        b = c["bytes"]
        lines += ["", (f"Floor 3, communication vs the raw collective (default layout; one exchange: broadcast "
                       f"{b['head']} B + {b['body']:,} B, {b['method']} of {b['up']} B; goal <= 1.25x):"), "",
                  (f"- round communication (exchange minus the busiest worker's client time), rounds 2..: "
                   f"{c['round_steady'] * 1e3:.1f} ms (round 1: {c['round1'] * 1e3:.1f} ms)"),
                  (f"- bare torch.distributed broadcast + broadcast + {b['method']}, same bytes, gloo, "
                   f"{res['world']} processes: {c['raw'] * 1e3:.1f} ms (min {c['raw_min'] * 1e3:.1f} ms)"),
                  (f"- the same collective after {args.work} fixed matmuls on every worker (equal work, "
                   f"{res['threads']} thread(s) each), timed as fed_ddp times it (wall minus the busiest worker's "
                   f"own time): {c['raw_busy'] * 1e3:.1f} ms"),
                  (f"- a worker's protocol work outside training (unpack head + body, join its messages): "
                   f"{c['worker_protocol'] * 1e3:.1f} ms"),
                  (f"- communication / bare collective: **{c['ratio']:.2f}x**; / the collective around busy workers: "
                   f"{c['ratio_busy']:.2f}x; / (bare collective + worker protocol): {c['ratio_with_protocol']:.2f}x")]
        s, r = res["startup"], res["startup"]["reference"]
        redo = ", ".join(f"{k.replace('_', ' ')} {r[k]:.2f} s" for k in ("fed_ddp_imports_config", "fed_ddp_load_pipeline",
                         "build_federated_data", "encode_replay_set", "reference_classifier") if k in r)
        lines += ["", "Floor 5, start-up (default layout):", "",
                  (f"- launch -> server ready (base evaluation starts): {s['ready']:.1f} s; base evaluation "
                   f"{s['base_eval']:.1f} s (reduced here); launch -> round 1 starts: {s['round1']:.1f} s"),
                  (f"- fresh interpreter: import torch {r['import_torch']:.1f} s + diffusers {r['import_diffusers']:.1f} "
                   f"s + load the pipeline {r['load_pipeline']:.2f} s = {r['load_once']:.1f} s with interpreter start"),
                  (f"- ratio launch -> round 1 / one load: **{s['ratio']:.2f}x**; launch -> server ready / one load: "
                   f"{s['ratio_ready']:.2f}x"),
                  f"- then, in that interpreter, what each rank of a run does after it: {redo}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[str(ROOT / "configs" / "quickstart.yaml"),
                                                      str(ROOT / "configs" / "population.yaml")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--collective-repeats", type=int, default=30)
    ap.add_argument("--speed-steps", type=int, default=10, help="steps of the one-thread vs all-cores check")
    ap.add_argument("--work", type=int, default=20000, help="matmuls per worker in the busy-collective variant")
    ap.add_argument("--base", help="model.pretrained for every run (default: the configs' own base)")
    ap.add_argument("--quick", action="store_true", help="smoke test: configs/tiny_test.yaml, one layout, 2 rounds, "
                    "1 repeat (pass --base)")
    ap.add_argument("--out", help="markdown results (default: benchmarks/results/round_floor.md; none with --quick)")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.rounds, args.repeats, args.collective_repeats, args.work = \
            [str(ROOT / "configs" / "tiny_test.yaml")], 2, 1, 6, 2000
        args.speed_steps = 2
    out_md = args.out or (None if args.quick else str(ROOT / "benchmarks" / "results" / "round_floor.md"))
    from fed_ddp.diffusion.models import quiet_libraries

    quiet_libraries()
    # cheap evaluation (it is left out of every ratio): losses and a grid after the last round only, a small base
    # evaluation; the runs' own settings otherwise
    common = [f"fed.rounds={args.rounds}", "eval.every=1000", "eval.images_per_prompt=2", "eval.inference_steps=4",
              "eval.sample_seeds=[0]", "tracking.progress=false"] + ([f"model.pretrained={args.base}"] if args.base else [])
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="round_floor_") as tmp:
        for config in args.configs:
            label = Path(config).stem
            layouts = [LAYOUTS.get(label, [("default", None, None)])[0]] if args.quick else \
                LAYOUTS.get(label, [("default", None, None)])
            results.append(bench_config(config, label, layouts, common, args, Path(tmp), lambda m: print(m, flush=True)))
    text = report(results, args, time.perf_counter() - t0)
    print(text)
    if out_md:
        Path(out_md).write_text("# Round vs compute floor, communication vs raw collective, start-up "
                                "(benchmarks/round_floor.py)\n\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return {"results": results}


if __name__ == "__main__":
    main()
