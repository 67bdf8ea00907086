"""Plots and a table from finished run directories: what a scaling study reports. No network, no torch.

    fed-ddp report runs/scaling-* [--out runs/report]

Reads each RUN_DIR's ``config.yaml``, ``metrics.jsonl`` and, when present, ``summary.json``, and writes
to ``--out``:

    table.md, table.csv   one row per run: the parameters that differ between the runs (number of
                          clients, LoRA rank and uplink codec always, anything else when it varies), LoRA
                          parameters, rounds, mean seconds per round and its split, bytes per round up
                          and down over the air (all clients), how many times fewer bytes the uplink moves than
                          dense fp32 LoRA (comm.air.up.vs_dense_lora), final val_loss, gen_acc_clients of
                          the base and final, and the final eval.metrics (FID / KID / CLIP score: pooled
                          and the mean over clients) where a run has them
    time_split.png        mean seconds per round split into local training / communication /
                          aggregation / evaluation / other, runs ordered by number of clients
    bytes.png             bytes per round up and down, per run, labelled by codec (and clients, rank)
    quality.png           val_loss per round, and gen_acc_clients (base, measured rounds, final) where present
    wireless.png          runs with wireless.enabled: gen_acc_clients against *simulated* time and energy
                          (sim_time_s, sim_energy_total_j at each round where accuracy was measured)

Means are over the training rounds (1..R) found in metrics.jsonl; a round logged twice (a resumed run)
counts once, its last line winning.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fed_ddp.files import read_yaml
from fed_ddp.results import RoundRecord, RunSummary, read_rows, read_summary

log = logging.getLogger(__name__)

SPLIT = ("local_training", "client_overhead", "communication", "aggregation", "evaluation", "other")
ALWAYS = ("fed.num_clients", "lora.rank", "comm.uplink")
NOT_PARAMETERS = ("run.name", "run.output_dir", "run.resume", "run.log_level", "tracking.")
SHORT = {"fed.num_clients": "clients", "lora.rank": "rank", "comm.uplink": "uplink", "comm.downlink": "downlink"}
CHAINS = ("comm.uplink", "comm.downlink")  # codec chains: [] is dense fp32


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mean(xs: list) -> float | int | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    return int(m) if all(isinstance(x, int) for x in xs) and m.is_integer() else m  # bytes stay integers


@dataclass
class Run:
    path: Path
    config: dict  # flattened: {"fed.num_clients": 4, ...}
    rounds: dict[int, RoundRecord] = field(default_factory=dict)  # training rounds 1..R
    base: RoundRecord | None = None  # round 0 (the base model's evaluation)
    final: dict = field(default_factory=dict)  # the final evaluation
    summary: RunSummary | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_sim(self) -> bool:
        """A run of the simulated wireless cell (sim_* in its rounds)."""
        return any("sim_time_s" in row.metrics for row in self.rounds.values())

    def sim_series(self, key: str, at: str) -> list[tuple[float, float]]:
        """(simulated ``at`` so far, ``key``) at round 0 (nothing spent yet), at every training round that
        measured ``key``, and at the final evaluation: for plots of accuracy against simulated time or energy."""
        if not self.has_sim:
            return []
        spent = {r: row.value(at) for r, row in self.rounds.items()}
        return [(0.0 if r == 0 else spent.get(r), v) for r, v in self.series(key)
                if r == 0 or spent.get(r) is not None]

    def series(self, key: str) -> list[tuple[int, float]]:
        """(round, value) of a top-level metric over round 0, the training rounds and the final evaluation."""
        pts = {}
        if self.base is not None and self.base.value(key) is not None:
            pts[0] = self.base.value(key)
        for r, row in self.rounds.items():
            if row.value(key) is not None:
                pts[r] = row.value(key)
        if isinstance(self.final.get(key), (int, float)) and self.rounds:
            pts.setdefault(max(self.rounds), self.final[key])
        return sorted(pts.items())


def load_run(path: str | Path) -> Run:
    """A run directory's config, rows and summary (schema 2, or 1: before the schema field), checked: every
    failure one line naming the file (and line). A last line cut short by a crash is skipped with a warning
    (as a resume skips it)."""
    p = Path(path)
    missing = [n for n in ("config.yaml", "metrics.jsonl") if not (p / n).is_file()]
    if missing:
        raise ValueError(f"run_dir={str(path)!r}: not a run directory (no {' and no '.join(missing)})")
    try:
        stored = read_yaml(p / "config.yaml")
        rows, warning = read_rows(p)
        summary = read_summary(p)
    except OSError as e:  # damaged, not UTF-8, a link, too large: named
        raise ValueError(str(e)) from None
    if not isinstance(stored, dict):
        raise ValueError(f"{p / 'config.yaml'}: not a mapping of config groups")  # noqa: TRY004 (bad input, one line)
    if warning:
        log.warning(warning)
    run = Run(p, _flatten(stored), rounds=rows.rounds, base=rows.base, final=rows.final or {}, summary=summary)
    if summary is not None:
        run.final = run.final or summary.final
    return run


def parameters(runs: list[Run]) -> list[str]:
    """Config keys shown per run: number of clients, LoRA rank, and whatever else differs between runs."""
    keys = sorted({k for r in runs for k in r.config})
    varying = [k for k in keys if k not in ALWAYS and not k.startswith(NOT_PARAMETERS)
               and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    return list(ALWAYS) + varying


def show(key: str, value) -> str:
    """A config value as the table and the plots print it; a codec chain reads ``topk+int8``, [] ``fp32``."""
    if key in CHAINS and isinstance(value, list):
        return "+".join(map(str, value)) or "fp32"
    return "–" if value is None else str(value)


def label(run: Run, keys: list[str]) -> str:
    shown = [k for k in keys if k in SHORT or k not in ALWAYS]
    return " ".join(f"{SHORT.get(k, k.rsplit('.', 1)[-1])}={show(k, run.config.get(k))}" for k in shown)


QUALITY = re.compile(r"(fid|kid)_(pooled|clients_\w+_mean)|clip_score(_clients_\w+_mean)?")  # eval.metrics


def table_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    keys = parameters(runs)
    columns = (["run"] + keys + ["lora_parameters", "rounds", "round_s"] + [f"{s}_s" for s in SPLIT]
               + ["bytes_up_per_round", "bytes_down_per_round", "up_vs_dense_lora", "val_loss_final",
                  "gen_acc_clients_base",
                  "gen_acc_clients_final"]
               + (["sim_time_s", "sim_energy_j", "sim_stragglers"] if any(r.has_sim for r in runs) else []))
    quality = sorted({k for r in runs for k, v in r.final.items() if QUALITY.fullmatch(k) and not isinstance(v, dict)})
    columns += [f"{k}_final" for k in quality]  # eval.metrics: the final figures, pooled and mean over clients
    out = []
    for run in runs:
        rows = [run.rounds[r] for r in sorted(run.rounds)]
        val = [v for row in rows if (v := row.value("val_loss")) is not None]
        d = {"run": run.name, **{k: run.config.get(k) for k in keys},
             "lora_parameters": run.summary.lora_parameters if run.summary else None,
             "rounds": len(rows),
             "round_s": _mean([row.seconds.get("round") for row in rows]),
             **{f"{s}_s": _mean([row.seconds.get(s) for row in rows]) for s in SPLIT},
             "bytes_up_per_round": _mean([row.air("up").get("total", row.bytes_up) for row in rows]),
             "bytes_down_per_round": _mean([row.air("down").get("total", row.bytes_down) for row in rows]),
             "up_vs_dense_lora": _mean([row.air("up").get("vs_dense_lora") for row in rows]),
             "val_loss_final": val[-1] if val else None,
             "gen_acc_clients_base": run.base.value("gen_acc_clients") if run.base else None,
             "gen_acc_clients_final": run.final.get("gen_acc_clients"),
             **{f"{k}_final": run.final.get(k) for k in quality}}
        if "sim_time_s" in columns:
            sims = [row.metrics for row in rows if "sim_latency_s" in row.metrics]
            d.update({"sim_time_s": sum(row["sim_latency_s"] for row in sims) if sims else None,
                      "sim_energy_j": sum(row["sim_energy_j"] for row in sims) if sims else None,
                      "sim_stragglers": sum(len(row["sim_stragglers"]) for row in sims) if sims else None})
        out.append(d)
    return columns, out


def _fmt(col: str, v) -> str:
    if v is None:
        return "–"
    if col in CHAINS:
        return show(col, v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if col.startswith("bytes") or col in ("lora_parameters", "rounds", "sim_stragglers") or col in ALWAYS:
        return f"{v:,.0f}" if isinstance(v, float) else f"{v:,}"
    if col == "up_vs_dense_lora":
        return f"{v:.2f}x"
    if col.startswith("gen_acc"):
        return f"{v:.1%}"
    if col in ("sim_time_s", "sim_energy_j"):
        return f"{v:,.1f}"
    if col.endswith("_s"):
        return f"{v:.3f}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(columns: list[str], rows: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({c: "" if r[c] is None else (json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c])
                     for c in columns} for r in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in columns) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[Run], columns: list[str], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = parameters(runs)
    labels = [label(r, keys) or r.name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r.name})" for lab, r in zip(labels, runs)]
    order = sorted(range(len(runs)), key=lambda i: (runs[i].config.get("fed.num_clients") or 0, labels[i]))
    xt = [labels[i].replace(" ", "\n") for i in order]
    written = [_plot_time(plt, runs, rows, order, xt, out), _plot_bytes(plt, runs, rows, order, xt, out),
               _plot_quality(plt, runs, labels, order, out)]
    wireless = _plot_wireless(plt, runs, labels, out)
    return written + ([wireless] if wireless else [])


def _plot_time(plt, runs, rows, order, xt, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(runs) + 2) + 1.8, 4.2))  # + the legend
    bottom = [0.0] * len(order)
    for s in SPLIT:
        vals = [rows[i][f"{s}_s"] or 0.0 for i in order]
        ax.bar(range(len(order)), vals, bottom=bottom, label=s.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(order)), xt, fontsize=8)
    ax.set_ylabel("seconds per round (mean)")
    ax.set_title("Round time split vs number of clients")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=120)
    plt.close(fig)
    return out / "time_split.png"


def _plot_bytes(plt, runs, rows, order, xt, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(runs) + 2), 4.2))
    w = 0.4
    for j, (col, name) in enumerate((("bytes_up_per_round", "up"), ("bytes_down_per_round", "down"))):
        vals = [(rows[i][col] or 0.0) / 1024 for i in order]
        bars = ax.bar([x + (j - 0.5) * w for x in range(len(order))], vals, w, label=f"{name} (over the air, all clients)")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(order)), xt, fontsize=8)
    ax.set_ylabel("KiB per round")
    ax.set_title("Bytes per round vs codec")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)
    return out / "bytes.png"


def _plot_quality(plt, runs, labels, order, out: Path) -> Path:
    acc = [r.series("gen_acc_clients") for r in runs]
    panels = 2 if any(acc) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for i in order:
        pts = runs[i].series("val_loss")
        if pts:
            axes[0][0].plot(*zip(*pts), marker="o", label=labels[i])
        if panels == 2 and acc[i]:
            axes[0][1].plot(*zip(*acc[i]), marker="s", label=labels[i])
    axes[0][0].set(xlabel="round", ylabel="val_loss (client concepts)", title="Validation loss vs rounds")
    if panels == 2:
        axes[0][1].set(xlabel="round", ylabel="gen_acc_clients", title="Generation accuracy (client concepts)",
                       ylim=(-0.02, 1.02))
    for a in axes[0]:
        a.legend(fontsize=7)
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
    return out / "quality.png"


def _plot_wireless(plt, runs, labels, out: Path) -> Path | None:
    """Accuracy against *simulated* time and energy, for runs of the simulated cell (None: no such run)."""
    sim = [(i, r.sim_series("gen_acc_clients", "sim_time_s"), r.sim_series("gen_acc_clients", "sim_energy_total_j"))
           for i, r in enumerate(runs)]
    if not any(t for _, t, _ in sim):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, t, e in sim:
        if t:
            axes[0].plot(*zip(*t), marker="o", label=labels[i])
            axes[1].plot(*zip(*e), marker="o", label=labels[i])
    axes[0].set(xlabel="simulated time (s, sim_time_s)", ylabel="gen_acc_clients",
                title="Accuracy vs simulated wall-clock time", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="simulated energy, all clients (J, sim_energy_total_j)", ylabel="gen_acc_clients",
                title="Accuracy vs simulated energy", ylim=(-0.02, 1.02))
    for a in axes:
        a.set_xscale("symlog", linthresh=1.0)
        a.legend(fontsize=7)
    fig.text(0.5, 0.005, "simulated (fed_ddp.wireless): cell and devices modelled, bytes and FLOPs real",
             ha="center", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "wireless.png", dpi=120)
    plt.close(fig)
    return out / "wireless.png"


def report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Load the runs, write the table (md + csv) and the plots into ``out``; returns what was written."""
    out = Path(out).expanduser()
    # a glob like runs/scaling-* also matches an earlier report's folder (--out runs/scaling-report): not a run
    run_dirs = [d for d in run_dirs if Path(d).expanduser().resolve() != out.resolve()]
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"run_dirs: two runs named {dup[0]!r}; rows are keyed by directory name")
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"--out={str(out)!r}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table_rows(runs)
    write_tables(columns, rows, out)
    plots = plot(runs, columns, rows, out)
    return {"table_md": out / "table.md", "table_csv": out / "table.csv", "plots": plots, "rows": rows}
