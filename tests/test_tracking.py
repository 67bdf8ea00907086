"""What reaches W&B is what metrics.jsonl holds, and offline runs land where ``wandb sync`` finds them.

W&B ships no Python reader of its offline ``.wandb`` files, so the server loop runs here (the study runs of
inproc_runs, shared with test_report) with a recording stand-in for the ``wandb`` module behind the real
``WandbLogger``; the real library is used for the offline-directory check, and test_plugins reads a real
offline file back (its records, with W&B's protobuf) for the callbacks' values of a launched run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from inproc_runs import STUDY, STUDY_GROUP, study_runs

pytestmark = pytest.mark.slow


def _leaves(row: dict, prefix: str = "") -> dict:
    """Numeric leaves of a metrics.jsonl row under W&B's key convention (nested keys joined by '/')."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    nan = (lambda x: x is None or (isinstance(x, float) and math.isnan(x)))
    return (nan(a) and nan(b)) or a == b


@pytest.fixture(scope="module")
def recorded_runs(tiny_base, tmp_path_factory):
    """{name: (recorder, run dir, metrics.jsonl rows, metric logs)} of the study runs (inproc_runs.STUDY)."""
    out = {}
    for name, (run_dir, rec) in study_runs(tiny_base, tmp_path_factory).items():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = [(step, d) for step, d in rec.logs if "samples" not in d]  # image logs are the sample grids
        out[name] = rec, run_dir, rows, metrics
    return out


def test_every_run_is_in_the_group_with_its_parameters(recorded_runs):
    """A study's runs share one W&B group; what was swept is in each run's W&B config."""
    for name, (rec, run_dir, _, _) in recorded_runs.items():
        kw = rec.init_kwargs
        assert kw["group"] == STUDY_GROUP and kw["mode"] == "offline" and kw["name"] == name
        assert kw["tags"] == ["a", "b"] and Path(kw["dir"]) == run_dir
        clients, codec = STUDY[name]
        assert kw["config"]["fed"]["num_clients"] == clients and kw["config"]["comm"]["uplink"] == codec
        assert kw["config"]["lora"]["rank"] == 2
        assert rec.finished and rec.summary["lora_parameters"] == 4096
        summary = json.loads((run_dir / "summary.json").read_text())  # W&B's run summary: summary.json, flattened
        assert rec.summary["run"] == name and rec.summary["seconds_total/round"] == summary["seconds_total"]["round"]


def test_wandb_gets_the_jsonl_rows_at_their_rounds(recorded_runs):
    """One W&B log per metrics.jsonl row, same step, and every value W&B gets is the row's value."""
    for name, (_, _, rows, metrics) in recorded_runs.items():
        assert [step for step, _ in metrics] == [r["round"] for r in rows], name
        for row, (_, logged) in zip(rows, metrics):
            leaves = _leaves(row)
            for key, value in logged.items():
                assert key in leaves and _same(value, leaves[key]), (name, row["round"], key, value, leaves.get(key))


def test_wandb_gets_every_number_of_the_jsonl_rows(recorded_runs):
    """The other direction: every number of every row, at any depth (final/gen_acc/<digit>), reaches W&B.
    Together with the test above, what W&B records is exactly what metrics.jsonl holds."""
    for name, (_, _, rows, metrics) in recorded_runs.items():
        assert any(isinstance(v, dict) for r in rows for x in r.values() if isinstance(x, dict) for v in x.values())
        for row, (_, logged) in zip(rows, metrics):
            numbers = {k for k, v in _leaves(row).items() if v is not None}  # null: no number (or NaN, sent as NaN)
            missing = sorted(numbers - set(logged))
            assert not missing, f"{name} round {row['round']}: not sent to W&B: {missing[:6]}"


def test_offline_run_is_where_wandb_sync_finds_it(tmp_path):
    """The real library, offline: the run lands in <run_dir>/wandb and `wandb sync` would upload it."""
    from fed_ddp.config import load_config, to_dict
    from fed_ddp.tracking import maybe_wandb

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=wb", "tracking.wandb.mode=offline",
                             "tracking.wandb.group=g"])
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True)
    logger = maybe_wandb(cfg, run_dir, to_dict(cfg))
    logger.log({"round": 1, "val_loss": 0.5, "seconds": {"round": 1.0}}, step=1)
    logger.finish({"rounds": 1})
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "sync", "--dry-run", str(runs[0])], check=False, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Would sync 1 run(s)" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
