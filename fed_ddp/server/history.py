"""A resumed run's history: the rows already in metrics.jsonl, and the checkpoint to continue from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fed_ddp.checkpoint import latest_checkpoint
from fed_ddp.files import read_text
from fed_ddp.results import RoundRecord

log = logging.getLogger("fed_ddp.server")


def logged_rows(run_dir: Path) -> dict[int, RoundRecord]:
    """Complete round records already in metrics.jsonl (a resumed run; the last line of a round wins). A line
    that is not a round's record (a schema-1 final line, damage an older version left) does not count."""
    path = run_dir / "metrics.jsonl"
    rows: dict[int, RoundRecord] = {}
    if not path.is_file():
        return rows
    for n, line in enumerate(read_text(path).splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line an older version glued to a cut one: skipped, said
            log.warning("%s:%d is not a JSON line: skipped", path, n)
            continue
        if isinstance(row, dict) and isinstance(row.get("seconds"), dict) and isinstance(row.get("round"), int):
            rows[row["round"]] = RoundRecord.from_json(row, f"{path}:{n}")
    return rows


def before(run_dir: Path, start: int) -> tuple[list[RoundRecord], dict | None]:
    """Records of rounds 0 .. start - 1 already in metrics.jsonl (a resumed run), and the base's evaluation."""
    if start == 1:
        return [], None
    rows = {r: row for r, row in logged_rows(run_dir).items() if r < start}
    base = rows.get(0)
    # of the row, not of the base's evaluation
    base_eval = {**{k: v for k, v in base.metrics.items() if k != "base_eval_cached"}, "seconds": base.seconds} \
        if base else None
    return [rows[r] for r in sorted(rows)], base_eval


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from: the newest whose round's row reached metrics.jsonl whole. A
    row cut by a crash after its checkpoint was written makes the resume compute that round again (from the
    checkpoint before it, bit for bit), so no round's row is lost."""
    newest = latest_checkpoint(run_dir)
    if newest is None or not (run_dir / "metrics.jsonl").is_file():
        return newest
    ckpt = latest_checkpoint(run_dir, logged=set(logged_rows(run_dir)))
    if ckpt != newest:
        log.warning("%s: the metrics row of %s is missing (cut by a crash): resuming from %s to compute it "
                    "again", run_dir / "metrics.jsonl", newest.name, ckpt.name if ckpt else "the start")
    return ckpt
