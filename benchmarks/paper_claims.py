"""The seed paper's case study, regenerated: does federated LoRA cut communication cost and training latency
for users in a wireless cell? (arXiv 2307.07146, Sec. V.)

    .venv/bin/python benchmarks/paper_claims.py [--parts sd15,digits] [--out runs/bench_paper]

Parts (each prints its table; together they are written to ``benchmarks/results/paper_claims.md`` with plots):

- ``sd15``: Stable Diffusion v1.5 at full size, analytically (``fed-ddp plan --wireless``: the UNet on the meta
  device, no weights): per round, the bytes one client sends, the FLOPs of its local steps (counted by
  ``torch.utils.flop_counter`` on the real architecture and batch), and over a seeded 1,000-device cell the
  simulated upload time, round time and energy per device class, for full UNet FedAvg, LoRA r4, LoRA r4 +
  int8 and LoRA r4 + segtopk + int4. Config: configs/sd15_lora_deepspeed.yaml (100 local steps of batch 8)
  with 10 of 50 clients per round in the cell of configs/wireless.yaml (deadline 600 s).
- ``digits``: real runs of ``configs/wireless.yaml`` (50 devices, 10 per round, 12 rounds, deadline 60 s) with
  full fine-tuning, LoRA, and LoRA + int8; the full and LoRA arms again under a 5 s deadline. Generation
  accuracy on the clients' digits every 2 rounds against simulated time and energy; rounds, simulated time
  and energy to reach the target accuracy; stragglers dropped. About 4 minutes per run on 2 cores.

Every time and energy figure is simulated (``fed_ddp.wireless``: the cell and the devices are modelled);
bytes and FLOPs are real.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fed_ddp.results import read_rows, read_summary

RESULTS = ROOT / "benchmarks" / "results"
FULL_LR = "1e-3"  # full fine-tuning needs a smaller step than LoRA (train.lr; see the README)
TARGET = 0.3  # accuracy on the clients' digits the "to reach" columns ask for


def fed_ddp(*args: str) -> str:
    env = {**os.environ}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "fed_ddp.cli", "run", *args], cwd=ROOT, env=env, text=True, check=False,
                       capture_output=True)
    if r.returncode:
        sys.exit(f"fed-ddp run {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


# -- SD v1.5, analytically ------------------------------------------------------------------------------------
def sd15(out: Path) -> list[str]:
    from fed_ddp.config import load_config
    from fed_ddp.plan import unet_config
    from fed_ddp.wireless.plan import format_rows, latent_shapes, wireless_rows

    cfg = load_config(ROOT / "configs" / "sd15_lora_deepspeed.yaml",
                      ["fed.num_clients=50", "fed.clients_per_round=10", "fed.workers=7", "wireless.enabled=true",
                       "wireless.deadline_s=600"])
    config, _source = unet_config(cfg, "sd15")
    rows = wireless_rows(cfg, config, *latent_shapes(cfg, config))
    (out / "sd15.json").write_text(json.dumps(rows, indent=2))
    print(format_rows(cfg, rows), flush=True)
    classes = list(rows[0]["per_class"])
    lines = ["## SD v1.5 at full size (analytic: meta-device UNet, FLOPs counted, cell simulated)", "",
             (f"configs/sd15_lora_deepspeed.yaml: {cfg.fed.local_steps} local steps of batch "
              f"{cfg.train.batch_size * cfg.train.gradient_accumulation_steps} at 64x64 latents per round; 10 of 50 "
              "clients per round in a 500 m cell, 20 MHz shared, 10 dBm devices, 33 dBm base station; medians and "
              "90th percentiles over 20 rounds x 10 clients of a seeded 1,000-device cell."), "",
             "| variant | uplink / client | FLOP / round | " + " | ".join(f"compute, {k}" for k in classes)
             + " | upload median / p90 | round median / p90 | energy median | client rounds past 600 s |",
             "|" + " --- |" * (7 + len(classes))]
    for r in rows:
        lines.append(f"| {r['variant']} | {_b(r['up_bytes'])} | {r['round_flops']:.3g} | "
                     + " | ".join(_t(r["per_class"][k]["compute_s"]) for k in classes)
                     + f" | {_t(r['upload_s']['median'])} / {_t(r['upload_s']['p90'])} | {_t(r['round_s']['median'])}"
                     f" / {_t(r['round_s']['p90'])} | {r['energy_j']['median'] / 1e3:.1f} kJ | {r['past_deadline']:.0%} |")
    full, lora = rows[0], rows[1]
    lines += ["", (f"LoRA r4 sends {full['up_bytes'] / lora['up_bytes']:,.0f}x fewer bytes than the full UNet (so "
                   "each upload is that much shorter on the same channel); the "
                   f"90th-percentile round {full['round_s']['p90'] / lora['round_s']['p90']:.1f}x shorter; a LoRA step "
                   f"costs {lora['step_flops'] / full['step_flops']:.0%} of a full step's FLOPs "
                   f"({lora['step_flops'] / 8e12:.2f} vs {full['step_flops'] / 8e12:.2f} TFLOP per example).")]
    _plot_sd15(rows, classes)
    lines += ["", "![SD v1.5 round time](paper_claims_sd15.png)"]
    return lines


def _plot_sd15(rows: list[dict], classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = np.arange(len(rows))
    comp = [np.median([r["per_class"][k]["compute_s"] for k in classes]) for r in rows]
    ax.bar(x - 0.2, [r["upload_s"]["median"] for r in rows], 0.4, label="upload, median client")
    ax.bar(x + 0.2, [r["round_s"]["p90"] for r in rows], 0.4, label="round, 90th percentile client")
    ax.scatter(x, comp, color="black", marker="_", s=400, zorder=3, label="compute, median device class")
    ax.set_yscale("log")
    ax.set_xticks(x, [r["variant"].replace(" (fp32)", "").replace(" + ", "\n+ ") for r in rows], fontsize=8)
    ax.set_ylabel("simulated seconds (log)")
    ax.set_title("SD v1.5, one round in a simulated 20 MHz cell (bytes and FLOPs real)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_claims_sd15.png", dpi=120)
    plt.close(fig)


# -- the digits demo, real runs ------------------------------------------------------------------------------
ARMS = {"full fine-tuning": ["train.method=full", f"train.lr={FULL_LR}"], "LoRA": [],
        "LoRA + int8": ["comm.uplink=[int8]"],
        "full, deadline 5 s": ["train.method=full", f"train.lr={FULL_LR}", "wireless.deadline_s=5"],
        "LoRA, deadline 5 s": ["wireless.deadline_s=5"]}
ONLY: list[str] = []


def digits(out: Path) -> list[str]:
    runs = {}
    for name, extra in ARMS.items():
        if ONLY and name not in ONLY:
            continue
        run = "paper_" + "".join(ch for ch in name if ch.isalnum())
        t0 = time.perf_counter()
        printed = fed_ddp("configs/wireless.yaml", f"run.output_dir={out}", f"run.name={run}", "run.overwrite=true",
                          "tracking.progress=false", "eval.accuracy_every=2", *extra)
        (out / f"{run}.txt").write_text(printed)
        s = read_summary(out / run).to_json()  # typed and checked (fed_ddp.results), read as its JSON
        rows = {r.round: r.to_json() for r in read_rows(out / run)[0].ordered()}
        curve = [(0, 0.0, 0.0, rows[0]["gen_acc_clients"])]
        for rnd in sorted(r for r in rows if r > 0):
            acc = s["final"]["gen_acc_clients"] if rnd == s["rounds"] else rows[rnd].get("gen_acc_clients")
            if acc is not None:
                curve.append((rnd, rows[rnd]["sim_time_s"], rows[rnd]["sim_energy_total_j"], acc))
        hit = next((c for c in curve if c[3] >= TARGET), None)
        runs[name] = {"summary": s, "curve": curve, "hit": hit, "wall_s": time.perf_counter() - t0}
        print(f"{name}: {s['final']['gen_acc_clients']:.1%}, sim {s['sim']['time_s']:.1f} s, "
              f"{s['sim']['energy_j']:.1f} J, {s['sim']['stragglers']} stragglers, wall {runs[name]['wall_s']:.0f} s",
              flush=True)
    (out / "digits.json").write_text(json.dumps({k: {**v, "summary": None} for k, v in runs.items()}, indent=2))
    base = next(iter(runs.values()))["curve"][0][3]
    lines = ["## The digits demo in the simulated cell (real runs of configs/wireless.yaml)", "",
             (f"50 devices, 10 per round, 12 rounds of 25 local steps, 2 workers; base model {base:.1%} on the "
              f"clients' digits 5-9. Full fine-tuning at train.lr={FULL_LR}, LoRA (rank 8) at 0.004. Accuracy measured "
              f"every 2 rounds; 'to {TARGET:.0%}' = the first measured round at or above it."), "",
             ("| arm | uplink / client | digits 5-9 | digits 0-4 | sim time, 12 rounds | sim energy | stragglers | "
             f"rounds to {TARGET:.0%} | sim time to {TARGET:.0%} | sim energy to {TARGET:.0%} | wall |"),
             "|" + " --- |" * 11]
    for name, r in runs.items():
        s, hit = r["summary"], r["hit"]
        lines.append(f"| {name} | {_b(s['sim']['message_bytes']['up'])} | {s['final']['gen_acc_clients']:.1%} | "
                     f"{s['final']['gen_acc_base']:.1%} | {s['sim']['time_s']:.1f} s | {s['sim']['energy_j']:.1f} J | "
                     f"{s['sim']['stragglers']} | {hit[0] if hit else '–'} | {f'{hit[1]:.1f} s' if hit else '–'} | "
                     f"{f'{hit[2]:.1f} J' if hit else '–'} | {r['wall_s'] / 60:.1f} min |")
    _plot_digits(runs)
    lines += ["", "![accuracy vs simulated time](paper_claims_digits.png)"]
    return lines


def _plot_digits(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in runs.items():
        c = r["curve"]
        style = "--" if "deadline" in name else "-"
        axes[0].plot([p[1] for p in c], [p[3] for p in c], style, marker="o", label=name)
        axes[1].plot([p[2] for p in c], [p[3] for p in c], style, marker="o", label=name)
    axes[0].set(xlabel="simulated time (s)", ylabel="generation accuracy, digits 5-9", ylim=(-0.02, 1.0),
                title="accuracy vs simulated time")
    axes[1].set(xlabel="simulated energy, all devices (J)", ylim=(-0.02, 1.0), title="accuracy vs simulated energy")
    for a in axes:
        a.legend(fontsize=7)
    fig.text(0.5, 0.005, "simulated cell (fed_ddp.wireless); bytes, FLOPs and accuracy real", ha="center", fontsize=7,
             color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "paper_claims_digits.png", dpi=120)
    plt.close(fig)


def _t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.0f} ms"


def _b(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


PARTS = {"sd15": sd15, "digits": digits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_paper")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--arms", default="", help="digits: only these arms (names of ARMS, separated by ';')")
    args = ap.parse_args()
    ONLY.extend(a for a in args.arms.split(";") if a)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# The paper's claims, regenerated", "", (f"`python benchmarks/paper_claims.py --parts {args.parts}` on "
             f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. Times and energy are simulated "
             "(fed_ddp.wireless); bytes, FLOPs and accuracy are real."), ""]
    for part in args.parts.split(","):
        lines += [*PARTS[part](out), ""]
    (RESULTS / "paper_claims.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
