"""Population benchmark: N = 10, 100, 1,000, 10,000 clients, m = 8 per round on 2 workers, side by side.

    .venv/bin/python benchmarks/population.py [--out runs/bench_population] [--sizes 10,100,1000,10000] [key=value ...]

Every run is the real thing (``fed_ddp.train`` on 1 server + 2 worker ranks over gloo, launched by torch's
elastic launcher), on one image folder of 12,000 augmented 8x8 digits (5-9; written once by this script:
the built-in digits hold about 900 client examples, too few for 10,000 clients), partitioned IID over N.
Only N changes between runs, so what grows with N shows. Per run it prints:

- round time (mean of rounds 2.., evaluation and checkpointing excluded) and the ratio to the compute
  floor (m / W) x one client's local training time, measured in the same run (mean ``train_seconds``
  of the clients);
- peak resident memory of the server and of each worker (``getrusage`` at exit);
- disk under ``clients/`` (per-client codec state: the uplink is top-k + int8 with error feedback, so
  every client that took part keeps a residual) and the number of clients with state.

Goals (issue 8): memory flat in N (within 10 % from N = 100 to 10,000), round-time ratio <= 1.15.
Writes ``<out>/population.md`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 12_000
SETTINGS = ["fed.strategy=fedavg", "fed.clients_per_round=8", "fed.workers=2", "fed.rounds=4", "fed.local_steps=20", "fed.client_cache=16",
            "data.source=imagefolder", "data.partition=iid", "data.label_field=label", "data.replay_fraction=0",
            "data.resolution=8", "comm.uplink=[topk,int8]", "comm.topk_fraction=0.1", "eval.every=1000",
            "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]", "tracking.progress=false",
            "train.batch_size=32", "train.lr=0.004", "run.overwrite=true"]


def write_digits(folder: Path, n: int = IMAGES) -> Path:
    """n augmented digits 5-9 (random shift by up to one pixel, pixel noise) as 8x8 PNGs + metadata.jsonl."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from fed_ddp.diffusion.tiny import caption

    if (folder / "metadata.jsonl").exists() and len((folder / "metadata.jsonl").read_text().splitlines()) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    keep = np.flatnonzero(d.target >= 5)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        j = keep[rng.integers(len(keep))]
        img = np.roll(d.images[j] / 16.0, shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        name = f"{i:05d}.png"
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption(int(d.target[j])), "label": str(d.target[j])}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_one(n: int, out: Path, data: Path, extra: list[str]) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    name = f"pop_n{n}"
    bench = out / f"{name}_rss"
    bench.mkdir(parents=True, exist_ok=True)
    args = [str(ROOT / "configs" / "quickstart.yaml"), f"run.output_dir={out}", f"run.name={name}",
            f"fed.num_clients={n}", f"data.path={data}", *SETTINGS, *extra]
    os.environ["FED_DDP_BENCH_DIR"] = str(bench)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=3, run_id=uuid.uuid4().hex[:8], rdzv_backend="c10d",
                       rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    elastic_launch(cfg, sys.executable)(str(ROOT / "benchmarks" / "population_rank.py"), *args)
    run = out / name
    from fed_ddp.results import read_rows  # the installed package (pip install -e .)

    rounds = [r.to_json() for r in read_rows(run)[0].ordered() if r.round > 0]  # typed, checked (fed_ddp.results)
    steady = rounds[1:] or rounds
    rss = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["peak_rss_mib"] for p in bench.glob("*.json")}
    round_s = np.mean([r["seconds"]["round"] - r["seconds"]["evaluation"] for r in steady])
    per_client = np.mean([s for r in steady for s in r["train_seconds"].values()])  # each client's own clock
    m = np.mean([len(r["clients"]["arrived"]) for r in steady])
    floor = m / 2 * per_client
    clients = run / "clients"
    disk = sum(p.stat().st_size for p in clients.rglob("*.safetensors")) if clients.exists() else 0
    return {"N": n, "round_s": round_s, "client_train_s": per_client, "floor_s": floor, "ratio": round_s / floor,
            "server_mib": rss.get(0), "worker_mib": [rss.get(1), rss.get(2)],
            "disk_mib": disk / 2**20,
            "clients_with_state": len(list(clients.glob("client_*"))) if clients.exists() else 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_population"))
    p.add_argument("--sizes", default="10,100,1000,10000")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out)
    data = write_digits(out / "digits12k")
    results = [run_one(int(n), out, data, a.overrides) for n in a.sizes.split(",")]
    lines = [("| N clients | round (s) | one client's training (s) | floor (m/W) x client (s) | round / floor | "
              "server peak RSS (MiB) | worker peak RSS (MiB) | clients with state | state on disk (MiB) |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['N']:,} | {r['round_s']:.2f} | {r['client_train_s']:.3f} | {r['floor_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['server_mib']:.0f} | {' / '.join(f'{w:.0f}' for w in r['worker_mib'])} | "
                     f"{r['clients_with_state']:,} | {r['disk_mib']:.1f} |")
    by = {r["N"]: r for r in results}
    if 100 in by and 10000 in by:
        for who, get in (("server", lambda r: r["server_mib"]), ("worker (max)", lambda r: max(r["worker_mib"]))):
            lines.append(f"\n{who} peak RSS, N = 10,000 vs N = 100: {get(by[10000]) / get(by[100]):.3f}x")
    text = "\n".join(lines)
    print(text)
    (out / "population.md").write_text(text + "\n")
    (out / "population.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
