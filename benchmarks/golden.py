"""Is a restructuring behaviour-preserving? Hashes of what the shipped configs produce, before and after.

Runs ``fed-ddp run CONFIG fed.rounds=3`` for each config (a fresh launcher, its real ranks) and prints, per
config, two SHA-256 hashes:

- ``adapter``: the final adapter's tensors (``checkpoints/final/pytorch_lora_weights.safetensors``), key by
  key: name, dtype, shape and raw bytes, in sorted order. Not the file's bytes: peft's metadata order varies.
- ``rows``: every number of every ``metrics.jsonl`` row (and the final evaluation) but the measured times (``seconds``, ``started_at``,
  ``train_seconds``, ``*_seconds``) and ``base_eval_cached`` (whether an earlier run's base evaluation was
  reused, which depends on the cache, not on the code).

    .venv/bin/python benchmarks/golden.py --out benchmarks/results/golden.json     # about 10 min on 2 cores
    .venv/bin/python benchmarks/golden.py --check benchmarks/results/golden.json   # after the change: same?

``--check`` exits 1 naming every config whose hashes differ from the file's.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("quickstart", "population", "wireless")
TIMES = ("seconds", "started_at", "train_seconds", "base_eval_cached")


def adapter_hash(path: Path) -> str:
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(path)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMES and not k.endswith("_seconds")}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def rows_hash(run_dir: Path) -> str:
    """Over the run's lines as schema 1 wrote them (the baseline's): each round's row without the ``schema``
    field, then the final evaluation as a line ``{"round": R, "final": ...}`` (schema 2 keeps it in summary.json
    only), so a file of either schema hashes the same when its numbers are the same."""
    from fed_ddp.results import read_rows, read_summary

    rows, _ = read_rows(run_dir)
    lines = [{k: v for k, v in r.to_json().items() if k != "schema"} for r in rows.ordered()]
    summary = read_summary(run_dir)
    from fed_ddp.tracking import _clean  # schema 1's final line went through the tracker: NaN -> null

    lines.append({"round": summary.rounds, "final": _clean(rows.final if rows.final is not None else summary.final)})
    return hashlib.sha256(json.dumps([_untimed(x) for x in lines], sort_keys=True).encode()).hexdigest()


def run(config: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fed_ddp.cli", "run", str(ROOT / "configs" / f"{config}.yaml"), "fed.rounds=3",
           f"run.output_dir={out}", f"run.name={config}", "tracking.progress=false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{config}: fed-ddp run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    d = out / config
    return {"adapter": adapter_hash(d / "checkpoints" / "final" / "pytorch_lora_weights.safetensors"),
            "rows": rows_hash(d)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, help="write the hashes (and the commit and date) to this JSON file")
    ap.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.configs.split(","):
            got[c] = run(c, Path(tmp), args.overrides)
            print(f"{c:11s} adapter {got[c]['adapter'][:16]}  rows {got[c]['rows'][:16]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": "benchmarks/golden.py " + " ".join(argv or sys.argv[1:]),
                                        "commit": commit, "date": datetime.date.today().isoformat(),
                                        "rounds": 3, "hashes": got}, indent=1) + "\n")
    if args.check:
        want = json.loads(args.check.read_text())["hashes"]
        bad = [c for c in got if want.get(c) != got[c]]
        for c in bad:
            print(f"{c}: differs from {args.check} ({want.get(c)} != {got[c]})")
        if bad:
            return 1
        print(f"identical to {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
