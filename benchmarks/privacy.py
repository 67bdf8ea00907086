"""Privacy benchmark: what differential privacy costs in accuracy, what secure aggregation costs in bytes and time.

    .venv/bin/python benchmarks/privacy.py [--out runs/bench_privacy] [--parts accuracy,secagg_bytes,secagg_time]

Parts (each prints its table and writes it to ``<out>/privacy.md``; ``accuracy`` also a plot):

- ``accuracy``: ``fed-ddp run configs/population.yaml`` (100 clients, Poisson q = 0.1, 12 rounds, 2 workers)
  without DP, and with central DP-FedAvg calibrated to epsilon = 8 and epsilon = 2 (delta = 1e-5, PLD
  accountant, clip C = 10, the default): generation accuracy on the clients' digits 5-9 and on the base digits 0-4,
  the epsilon the run reports, z, and how many updates the clip left untouched; one more arm at epsilon 8 with
  C = 1 (less noise, smaller steps). Real runs, about 3 min each.
- ``secagg_bytes``: the protocol in one process at 10 and 100 clients per round on the quickstart adapter's
  size, 8- and 16-bit fixed point: bytes one client sends and receives in each step (lengths of the real
  messages), against the same fixed-point values sent without masking, and the CPU seconds of each side
  (clients' crypto summed over clients; the server's unmasking), with no dropouts and with 10 % dropping
  after they shared their keys (recovered from shares).
- ``secagg_time``: real runs of the quickstart model with 10 clients per round on 2 workers, int8 uplink and
  clipping in both arms, secure aggregation off and on, side by side: round time without evaluation.

Goals (issue 10): air bytes with secure aggregation <= 1.75x the same fixed-point uplink without it at
100 clients per round; added round time <= 25 % at 10 clients per round on the quickstart model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fed_ddp.results import read_rows, read_summary


def fed_ddp(*args: str) -> str:
    env = {**os.environ}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "fed_ddp.cli", "run", *args], cwd=ROOT, env=env, text=True, check=False,
                       capture_output=True)
    if r.returncode:
        sys.exit(f"fed-ddp run {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


# -- accuracy vs epsilon ------------------------------------------------------------------------------------
ARMS = {"no DP": [], "epsilon 8": ["privacy.dp.target_epsilon=8"], "epsilon 2": ["privacy.dp.target_epsilon=2"],
        "epsilon 8, C 1": ["privacy.dp.target_epsilon=8", "privacy.dp.clip_norm=1"]}
ONLY: list[str] = []  # --arms


def accuracy(out: Path) -> list[str]:
    rows, results = [], {}
    for name, extra in ARMS.items():
        if ONLY and name not in ONLY:
            continue
        run = "priv_" + "".join(ch for ch in name if ch.isalnum())
        t0 = time.perf_counter()
        printed = fed_ddp("configs/population.yaml", f"run.output_dir={out}", f"run.name={run}", "run.overwrite=true",
                          "tracking.progress=false", *extra)
        (out / f"{run}.txt").write_text(printed)  # what the user sees at the end of the run
        s = read_summary(out / run).to_json()  # typed and checked (fed_ddp.results), read as its JSON
        metrics = [r.to_json() for r in read_rows(out / run)[0].ordered()]
        p = s["privacy"]
        unclipped = [r["privacy"].get("unclipped", 0) for r in metrics if "privacy" in r and "comm" in r]
        arrived = [len(r["clients"]["arrived"]) for r in metrics if "privacy" in r and "comm" in r]
        results[name] = s
        eps = f"{p['epsilon']:.2f}" if "epsilon" in p else "inf"
        z = f"{p['noise_multiplier']:.3f}" if "noise_multiplier" in p else "-"
        share = f"{sum(unclipped) / max(1, sum(arrived)):.0%}" if unclipped else "-"
        rows.append(f"| {name} | {eps} | {z} | {share} | {s['final']['gen_acc_clients']:.1%} | "
                    f"{s['final']['gen_acc_base']:.1%} | {s['final']['val_loss']:.4f} | {time.perf_counter() - t0:.0f} s |")
    base = next(iter(results.values()))["base"]
    lines = ["## Accuracy vs epsilon (configs/population.yaml: 100 clients, q = 0.1, 12 rounds, C = 10)", "",
             (f"Base model before training: {base['gen_acc_clients']:.1%} on the clients' digits 5-9, "
             f"{base['gen_acc_base']:.1%} on digits 0-4."), "",
             "| arm | epsilon (delta 1e-5, PLD) | z | updates within C | digits 5-9 | digits 0-4 | val loss | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]
    _plot(results, out)
    return lines


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(results)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["final"]["gen_acc_clients"] for n in names], 0.4, label="clients' digits 5-9")
    ax.bar(x + 0.2, [results[n]["final"]["gen_acc_base"] for n in names], 0.4, label="base digits 0-4")
    ax.set_xticks(x, names)
    ax.set_ylabel("generation accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("population config, 12 rounds: accuracy vs epsilon", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "privacy_accuracy.png", dpi=120)
    fig.savefig(ROOT / "benchmarks" / "results" / "privacy_accuracy.png", dpi=120)


# -- secure aggregation: bytes and CPU time of the protocol ----------------------------------------------------
def quickstart_numel() -> int:
    from fed_ddp.config import load_config
    from fed_ddp.plan import make_plan

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    return make_plan(cfg, cfg.comm).lora_parameters


def protocol(m: int, n: int, bits: int, drop: float, rng) -> dict:
    from fed_ddp.privacy import secagg as sa

    ring = sa.ring_bits(bits, m)
    lim = 2 ** (bits - 1) - 1
    xs = {c: rng.integers(-lim, lim + 1, n) for c in range(m)}
    lost = set(rng.choice(m, round(drop * m), replace=False).tolist())
    t_client = 0.0
    t0 = time.perf_counter()
    clients = {c: sa.Client(c, 1) for c in range(m)}
    adverts = {c: cl.advert() for c, cl in clients.items()}
    t_client += time.perf_counter() - t0
    t0 = time.perf_counter()
    roster, _ = sa.collect_adverts(adverts)
    server = sa.Server(1, m // 2 + 1, n, ring, roster)
    t_server = time.perf_counter() - t0
    t0 = time.perf_counter()
    sent = {c: cl.share(roster, m // 2 + 1) for c, cl in clients.items()}
    inbox = {c: [] for c in clients}
    for c, cts in sent.items():
        for ct in cts:
            inbox[int.from_bytes(ct[4:8], "little")].append(ct)
    for c, cl in clients.items():
        cl.receive(inbox[c])
    masked = {c: sa.pack(clients[c].mask(xs[c], ring), ring) for c in clients if c not in lost}
    reveals = {c: clients[c].reveal(set(masked)) for c in masked}
    t_client += time.perf_counter() - t0
    t0 = time.perf_counter()
    total = server.unmask({c: sa.unpack(b, n, ring) for c, b in masked.items()}, reveals)
    t_server += time.perf_counter() - t0
    assert np.array_equal(total, sum(xs[c] for c in masked)), "secure aggregation gave a wrong sum"
    one = next(iter(masked))
    up = {"keys": len(adverts[one]), "shares": sum(map(len, sent[one])), "masked": 16 + len(masked[one]),
          "unmask": len(reveals[one])}
    down = {"keys": len(roster) * sa.ADVERT_BYTES, "shares": sum(map(len, inbox[one])), "unmask": m}
    return {"up": up, "down": down, "ring": ring, "client_s": t_client / m, "server_s": t_server,
            "plain": 8 + sa.packed_bytes(n, bits)}


def secagg_bytes(out: Path) -> list[str]:
    from fed_ddp.compression import CommConfig
    from fed_ddp.protocol import UP_TAIL_BYTES

    n = quickstart_numel()
    rng = np.random.default_rng(0)
    from fed_ddp.config import load_config
    from fed_ddp.plan import make_plan

    int8 = make_plan(load_config(ROOT / "configs" / "quickstart.yaml"), CommConfig(uplink=["int8"])).up.total.total
    lines = [f"## Secure aggregation: bytes and CPU per round ({n:,} values: the quickstart adapter)", "",
             (f"'plain' = the same fixed-point values sent without masking (8 B header + n x bits); the block-scaled "
             f"int8 codec sends {int8 + UP_TAIL_BYTES:,} B per client."), "",
             ("| clients | bits | ring | dropouts | up: keys + shares + masked + unmask = total | plain | ratio | "
             "down extra (keys + shares + flags) | client CPU s | server CPU s |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in (10, 100):
        for bits in (8, 16):
            for drop in (0.0, 0.1):
                r = protocol(m, n, bits, drop, rng)
                up, tot = r["up"], sum(r["up"].values())
                lines.append(f"| {m} | {bits} | {r['ring']} | {drop:.0%} | {up['keys']:,} + {up['shares']:,} + "
                             f"{up['masked']:,} + {up['unmask']:,} = {tot:,} | {r['plain']:,} | "
                             f"{tot / r['plain']:.2f}x | {sum(r['down'].values()):,} | {r['client_s']:.3f} | "
                             f"{r['server_s']:.2f} |")
                print(lines[-1], flush=True)
    return lines


# -- secure aggregation: round time on the quickstart model ------------------------------------------------------
def secagg_time(out: Path) -> list[str]:
    common = ["fed.strategy=fedavg", "fed.num_clients=10", "fed.sampling=all", "fed.workers=2", "fed.rounds=3", "comm.uplink=[int8]",
              "eval.every=100", "eval.images_per_prompt=4", "tracking.progress=false",
              f"run.output_dir={out}", "run.overwrite=true"]
    res = {}
    for name, extra in (("off", []), ("on", ["privacy.secagg=true"])):
        run = f"secagg_{name}"
        fed_ddp("configs/quickstart.yaml", f"run.name={run}", *common, *extra)
        rounds = [r.to_json() for r in read_rows(out / run)[0].ordered() if r.round > 0]
        res[name] = {"round_s": np.mean([r["seconds"]["round"] - r["seconds"]["evaluation"] for r in rounds]),
                     "train_s": np.mean([r["seconds"]["local_training"] for r in rounds]),
                     "air_up": np.mean([r["comm"]["air"]["up"]["total"] for r in rounds]),
                     "acc": read_summary(out / run).final["gen_acc_clients"]}
        if name == "on":
            res[name]["steps"] = {k: np.mean([r["privacy"]["secagg"]["steps"][k]["seconds"] for r in rounds])
                                  for k in ("keys", "shares", "masked", "unmask")}
    off, on = res["off"], res["on"]
    st = on["steps"]
    return ["## Secure aggregation: round time (quickstart model, 10 clients per round on 2 workers, int8, C = 10)",
            "", ("| arm | round s (no evaluation) | of which local training (busiest worker) | air bytes up per round | "
            "digits 5-9 after 3 rounds |"), "| --- | --- | --- | --- | --- |",
            f"| secagg off | {off['round_s']:.2f} | {off['train_s']:.2f} | {off['air_up']:,.0f} | {off['acc']:.1%} |",
            f"| secagg on | {on['round_s']:.2f} | {on['train_s']:.2f} | {on['air_up']:,.0f} | {on['acc']:.1%} |", "",
            (f"Added round time: {on['round_s'] / off['round_s'] - 1:+.1%} (steps, mean s: keys {st['keys']:.2f}, "
            f"shares {st['shares']:.2f}, masked input incl. training {st['masked']:.2f}, unmask {st['unmask']:.2f}).")]


PARTS = {"accuracy": accuracy, "secagg_bytes": secagg_bytes, "secagg_time": secagg_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_privacy")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--arms", default="", help="accuracy: only these arms (names of ARMS, separated by ';')")
    args = ap.parse_args()
    ONLY.extend(a for a in args.arms.split(";") if a)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Privacy benchmark", "", (f"`python benchmarks/privacy.py --parts {args.parts}` on "
             f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}."), ""]
    for part in args.parts.split(","):
        lines += [*PARTS[part](out), ""]
        print("\n".join(lines), flush=True)
    (out / "privacy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
