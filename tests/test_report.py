"""``fed-ddp report`` on three finished tiny runs: the table's numbers are the runs' metrics.jsonl numbers.

The runs differ in number of clients and uplink codec (``comm.uplink``), the axes of the plots: round
time split vs clients, bytes per round vs codec, quality vs rounds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from conftest import run_cli
from inproc_runs import STUDY, study_runs
from PIL import Image

from fed_ddp.report import Run, label, parameters

pytestmark = pytest.mark.slow
SPLIT = ("local_training", "client_overhead", "communication", "aggregation", "evaluation", "other")
RUNS = STUDY  # name: (clients, uplink codec); the runs are shared with test_tracking


@pytest.fixture(scope="module")
def report_dir(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    dirs = [run_dir for run_dir, _ in study_runs(tiny_base, tmp_path_factory).values()]
    proc = run_cli("report", *map(str, dirs), "--out", str(out / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dirs, out / "report"


def expected(run_dir) -> dict:
    """The figures, recomputed from metrics.jsonl and config.yaml here, independently of fed_ddp.report."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("round", 0) > 0 and "seconds" in r]
    final = json.loads((run_dir / "summary.json").read_text())["final"]  # schema 2: not a line of metrics.jsonl
    base = next(r for r in rows if r["round"] == 0)
    n = len(rounds)
    e = {"rounds": n, "round_s": sum(r["seconds"]["round"] for r in rounds) / n,
         "bytes_up_per_round": sum(r["comm"]["air"]["up"]["total"] for r in rounds) / n,
         "bytes_down_per_round": sum(r["comm"]["air"]["down"]["total"] for r in rounds) / n,
         "up_vs_dense_lora": sum(r["comm"]["air"]["up"]["vs_dense_lora"] for r in rounds) / n,
         "val_loss_final": rounds[-1]["val_loss"],
         "gen_acc_clients_base": base["gen_acc_clients"], "gen_acc_clients_final": final["gen_acc_clients"],
         "lora_parameters": json.loads((run_dir / "summary.json").read_text())["lora_parameters"]}
    e.update({f"{s}_s": sum(r["seconds"][s] for r in rounds) / n for s in SPLIT})
    return e


def test_csv_numbers_match_metrics(report_dir):
    dirs, out = report_dir
    with open(out / "table.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert set(table) == set(RUNS)
    for d in dirs:
        row, e = table[d.name], expected(d)
        assert (int(row["fed.num_clients"]), json.loads(row["comm.uplink"])) == RUNS[d.name]
        assert int(row["lora.rank"]) == 2
        assert e["rounds"] == int(row["rounds"]) == 2
        for key, value in e.items():
            assert math.isclose(float(row[key]), value, rel_tol=1e-12, abs_tol=1e-12), (d.name, key, row[key], value)
    # what the plots show differs between the runs as it must: int8 sends about a quarter of fp32's bytes
    # up (plus scales), the downlink stays dense, and a third client sends a third more
    fp32, int8 = (int(table[n]["bytes_up_per_round"]) for n in ("c2-fp32", "c2-int8"))
    assert fp32 / 4 <= int8 < fp32 / 3, (fp32, int8)
    assert table["c2-fp32"]["bytes_down_per_round"] == table["c2-int8"]["bytes_down_per_round"]
    assert int(table["c3-int8"]["bytes_up_per_round"]) * 2 == int8 * 3
    assert float(table["c2-fp32"]["up_vs_dense_lora"]) <= 1 and float(table["c2-int8"]["up_vs_dense_lora"]) > 3


def test_markdown_table_shows_the_same_numbers(report_dir):
    dirs, out = report_dir
    lines = (out / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].count("---") == len(header)
    cells = {row[0]: dict(zip(header, row)) for row in
             ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    for d in dirs:
        row, e = cells[d.name], expected(d)
        assert row["comm.uplink"] == ("+".join(RUNS[d.name][1]) or "fp32")
        assert int(row["bytes_up_per_round"].replace(",", "")) == e["bytes_up_per_round"]
        assert abs(float(row["val_loss_final"]) - e["val_loss_final"]) <= 5e-5
        assert abs(float(row["round_s"]) - e["round_s"]) <= 5e-4
        assert abs(float(row["local_training_s"]) - e["local_training_s"]) <= 5e-4
        assert abs(float(row["gen_acc_clients_final"].rstrip("%")) / 100 - e["gen_acc_clients_final"]) <= 5e-4


def test_plots_are_png_images(report_dir):
    _, out = report_dir
    for name in ("time_split.png", "bytes.png", "quality.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 300, (name, im.size)
            assert len(set(im.convert("L").getdata())) > 10, f"{name} looks blank"


def test_a_new_axis_becomes_a_column_and_a_label():
    """Any config key that differs between runs is shown (run.* excepted); codec chains read topk+int8 / fp32."""
    runs = [Run(path=Path(f"r{i}"), config={"fed.num_clients": 4, "lora.rank": 8, "comm.uplink": codec,
                                            "fed.strategy": strategy, "run.name": f"r{i}", "train.lr": 0.01})
            for i, (codec, strategy) in enumerate([([], "fedavg"), (["topk", "int8"], "fedadam")])]
    keys = parameters(runs)
    assert keys == ["fed.num_clients", "lora.rank", "comm.uplink", "fed.strategy"]  # run.name is no parameter
    assert label(runs[0], keys) == "clients=4 rank=8 uplink=fp32 strategy=fedavg"
    assert label(runs[1], keys) == "clients=4 rank=8 uplink=topk+int8 strategy=fedadam"


def test_not_a_run_directory_is_one_line(tmp_path):
    proc = run_cli("report", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fed-ddp:")]
    assert len(lines) == 1 and re.search(r"run_dir=.*not a run directory \(no config.yaml", lines[0]), proc.stderr
