"""What a run reports, typed: one ``RoundRecord`` per line of ``metrics.jsonl``, one ``RunSummary`` in
``summary.json``. The server builds them, and everything that reads a run (``report``, the CLI's closing
lines, ``compare``, a resume, W&B, the benchmarks) reads them through ``read_rows`` / ``read_summary``.

Schema versions (the ``schema`` field):

- 2: every line of ``metrics.jsonl`` is one round (round 0: the base model's evaluation), each round once
  per attempt (a resumed round's last line wins); the final evaluation is in ``summary.json`` (``final``)
  only.
- 1 (no ``schema`` field; written before it): the same round lines, and the final evaluation as one more
  line ``{"round": R, "final": {...}}`` carrying the last round's number. ``read_rows`` returns it apart
  (``Rows.final``), never as a round.

A record's typed fields are what every run writes; ``metrics`` holds the rest by name (the evaluator's
``val_loss``/``gen_acc*``, a strategy's ``update_norm``, ``empty_round``, the simulated cell's ``sim_*``,
``privacy``), so a new metric needs no new field. On disk a row is flat, as it always was.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 2
SECONDS = ("local_training", "client_overhead", "communication", "aggregation", "evaluation", "other", "round")
_NUMBER = (int, float, type(None))


def _is_number(v) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


@dataclass
class RoundRecord:
    """One round's line of ``metrics.jsonl`` (round 0: the base model's evaluation, before any training)."""
    round: int
    seconds: dict[str, float]  # the round's wall time split (``SECONDS``); round 0: its evaluation only
    started_at: float | None = None  # Unix seconds at the round's start
    clients: dict | None = None  # reachable, sampled, dropped, late, arrived, rejected, per_worker
    train_loss: dict[str, float] = field(default_factory=dict)  # per client id (str)
    train_loss_mean: float | None = None  # weighted by examples
    num_examples: dict[str, int] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: int | None = None  # what the collectives moved (cluster)
    bytes_down: int | None = None
    comm: dict | None = None  # {"air": ..., "cluster": ...}: per client over the air, and between ranks
    metrics: dict = field(default_factory=dict)  # everything else, by name (see the module's docstring)
    schema: int = SCHEMA

    def value(self, key: str):
        """A number by its row name (typed field or metric); None when absent or not a number."""
        v = getattr(self, key) if key in _ROW_FIELDS else self.metrics.get(key)
        return v if _is_number(v) and not (isinstance(v, float) and math.isnan(v)) else None

    def air(self, direction: str) -> dict:
        """Over-the-air bytes of this round, one direction (``comm.air.up``; runs before populations: ``comm.up``)."""
        comm = self.comm or {}
        return (comm.get("air") or {}).get(direction) or comm.get(direction) or {}

    def to_json(self) -> dict:
        if clash := sorted(set(self.metrics) & {*_ROW_FIELDS, *_TRAINING}):  # a metric never hides a typed field
            raise ValueError(f"round {self.round}: a metric is named {clash[0]!r}, like one of the record's fields")
        out = {"schema": self.schema, "round": self.round}
        for f in _ROW_FIELDS:
            v = getattr(self, f)
            if f in ("round", "schema") or (f in _TRAINING and self.clients is None):
                continue  # round 0 (the base's evaluation) trained nothing: no training fields at all
            out[f] = v
        return {**out, **self.metrics}

    @classmethod
    def from_json(cls, row: dict, where: str = "row") -> RoundRecord:
        """A row as written (schema 2, or 1: no ``schema`` field), checked: a bad field raises one line."""
        _check_row(row, where)
        if "round" not in row:
            raise ValueError(f"{where}: no 'round': not a round's record")
        typed = {k: row[k] for k in _ROW_FIELDS if k in row and k != "schema"}
        typed["schema"] = row.get("schema", 1)
        typed.setdefault("seconds", {})
        return cls(**typed, metrics={k: v for k, v in row.items() if k not in _ROW_FIELDS})


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(RoundRecord) if f.name != "metrics")
_TRAINING = ("clients", "train_loss", "train_loss_mean", "num_examples", "train_seconds", "bytes_up", "bytes_down",
             "comm")
_ROW_SHAPE = {"round": int, "seconds": dict, "comm": dict, "clients": dict, "final": dict, "val_loss": _NUMBER,
              "gen_acc_clients": _NUMBER, "bytes_up": _NUMBER, "bytes_down": _NUMBER, "train_loss_mean": _NUMBER,
              "sim_latency_s": _NUMBER, "sim_energy_j": _NUMBER, "sim_time_s": _NUMBER, "sim_stragglers": list}


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, not {type(row).__name__}")  # noqa: TRY004
    for key, kind in _ROW_SHAPE.items():
        if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
            raise ValueError(f"{where}: {key!r} is {json.dumps(row[key])[:40]}, not what a fed_ddp run writes there")
    for k, v in (row.get("seconds") or {}).items():
        if not _is_number(v):
            raise ValueError(f"{where}: seconds.{k} is {json.dumps(v)[:40]}, not a number")
    comm = row.get("comm") or {}
    for part in (comm, comm.get("air") if isinstance(comm.get("air"), dict) else {}):
        for d in ("up", "down", "air"):
            if d in part and not isinstance(part[d], dict):
                raise ValueError(f"{where}: comm.{d} is {json.dumps(part[d])[:40]}, not a JSON object")
    if "schema" in row and row["schema"] not in (1, SCHEMA):
        raise ValueError(f"{where}: schema {row['schema']!r}: this fed_ddp reads schemas 1 and {SCHEMA}")


@dataclass
class Rows:
    """A run's ``metrics.jsonl``: the base's evaluation (round 0), the training rounds (the last line of a round
    wins), and a schema-1 run's final line (``final``; schema 2 keeps it in ``summary.json`` only)."""
    base: RoundRecord | None = None
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    final: dict | None = None

    def ordered(self) -> list[RoundRecord]:
        """Round 0 (if any) then the training rounds in order."""
        return ([self.base] if self.base else []) + [self.rounds[r] for r in sorted(self.rounds)]


def parse_rows(lines, where: str) -> Rows:
    """``lines``: (line number, parsed JSON) pairs (``files.jsonl_rows``)."""
    out = Rows()
    for i, row in lines:
        at = f"{where}:{i}"
        if isinstance(row, dict) and "final" in row and "seconds" not in row:  # schema 1's final line
            _check_row(row, at)
            out.final = row["final"]
            continue
        rec = RoundRecord.from_json(row, at)
        if rec.round == 0:
            out.base = rec
        elif rec.round > 0:
            out.rounds[rec.round] = rec
    return out


def read_rows(run_dir: Path) -> tuple[Rows, str | None]:
    """``RUN_DIR/metrics.jsonl`` as records, and a warning if its last line was cut short by a crash (skipped)."""
    from fed_ddp.files import jsonl_rows

    path = Path(run_dir) / "metrics.jsonl"
    lines, warning = jsonl_rows(path)
    return parse_rows(lines, str(path)), warning


@dataclass
class RunSummary:
    """``summary.json``: the whole run, written once at its end. Every field but ``final`` may be missing from a
    summary an older version wrote (None here); a run of this version writes all but the optional three."""
    final: dict  # the final adapter's evaluation
    rounds: int | None = None  # the last round trained (fewer than fed.rounds when a privacy budget stopped it)
    run: str | None = None
    num_clients: int | None = None
    workers: int | None = None
    sampling: dict | None = None
    method: str | None = None  # train.method: lora or full
    lora_parameters: int | None = None  # the trained parameters (train.method=full: the whole denoiser)
    images_per_prompt: int | None = None
    classifier_test_accuracy: float | None = None
    base: dict = field(default_factory=dict)  # the base model's evaluation (round 0)
    bytes_up_total: int | None = None  # what the collectives moved over the run
    bytes_down_total: int | None = None
    comm: dict | None = None  # codecs, bytes per client round, over the air and in the cluster
    seconds_total: dict | None = None
    final_eval_seconds: float | None = None
    privacy: dict | None = None
    sim: dict | None = None  # the simulated wireless cell (wireless.enabled), labelled as simulated
    personal: dict | None = None  # personal.mode: each client's personal vs global evaluation
    stopped_early: str | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}  # every run writes the core

    @classmethod
    def from_json(cls, d, where: str = "summary.json") -> RunSummary:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be a JSON object, not {type(d).__name__}")  # noqa: TRY004
        for key in ("final", "base", "comm", "sampling", "privacy", "seconds_total"):
            if key in d and not isinstance(d[key], dict):
                raise ValueError(f"{where}: {key!r} must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where}: no {', '.join(missing)}: not a summary a fed_ddp run writes")
        return cls(**{k: v for k, v in d.items() if k in names} | {"schema": d.get("schema", 1)})


def read_summary(run_dir: Path) -> RunSummary | None:
    """``RUN_DIR/summary.json`` (None before the run has finished)."""
    from fed_ddp.files import read_json

    path = Path(run_dir) / "summary.json"
    return RunSummary.from_json(read_json(path), str(path)) if path.is_file() else None
