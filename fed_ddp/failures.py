"""A rank's failure where the user finds it (torchtitan's ``@record`` pattern, without its teardown).

``record(exc, role, rank, run_dir)``, called in a rank's ``except`` block, writes the exception twice:

- to torch elastic's error file (``TORCHELASTIC_ERROR_FILE``, the JSON its launcher reads), so the
  launcher's ``ChildFailedError`` carries it and ``fed-ddp run`` prints it as its last line:
  ``fed-ddp: worker1 rank 2 failed: RuntimeError: ...``;
- to ``RUN_DIR/errors/rank_N.txt`` (role, rank, host, pid, time, traceback), once the run directory is a
  run's (its marker exists; never through a link).

The rank then leaves with ``os._exit`` as before: a dead peer cannot hang the exit in
``destroy_process_group``. ``first_failure(e)`` turns the launcher's ``ChildFailedError`` into that line: the
rank that failed first (by the recorded clock), whose failure the others' are consequences of.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import traceback
from pathlib import Path

ERRORS = "errors"


def message(exc: BaseException, role: str, rank: int) -> str:
    text = " ".join(str(exc).split())
    return f"{role} rank {rank} failed: {type(exc).__name__}{': ' + text[:500] if text else ''}"


def record(exc: BaseException, role: str, rank: int, run_dir: Path | None) -> Path | None:
    """Write the exception being handled to the launcher's error file and the run directory; returns the run
    directory's file (None if there is none). Never raises: a failure to record must not hide the failure."""
    line, tb = message(exc, role, rank), traceback.format_exc()
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        # Written whole, then renamed: the launcher reads this file the moment the process is gone, and a rank
        # killed (or polled) between open("w") and the dump left it empty, which made the launcher itself crash
        # on a JSONDecodeError instead of restarting the ranks.
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": tb, "timestamp": str(int(time.time())), "time_ns": str(time.time_ns())}}}, f)
            os.replace(tmp, path)
        except OSError:
            pass
    if run_dir is None:
        return None
    from fed_ddp.files import refuse_link, write_text
    from fed_ddp.rundir import MARKER

    out = Path(run_dir) / ERRORS / f"rank_{rank}.txt"
    try:
        if not (Path(run_dir) / MARKER).is_file():
            return None  # not (yet) a run's directory: the terminal has it
        refuse_link(out.parent)
        out.parent.mkdir(exist_ok=True)
        write_text(out, f"{line}\nhost {socket.gethostname()} pid {os.getpid()} at "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n{tb}")
    except OSError:
        return None
    return out


def _when(failure) -> int:
    """When a rank failed, in ns: our record's clock (the launcher's own is whole seconds, so a worker that raised
    and the server that saw it die a moment later tie, and the server, the consequence, would win on rank)."""
    data = getattr(failure, "error_file_data", None) or {}
    extra = data.get("message", {}).get("extraInfo", {}) if isinstance(data.get("message"), dict) else {}
    try:
        return int(extra["time_ns"])
    except (KeyError, TypeError, ValueError):
        return int(getattr(failure, "timestamp", 0) or 0) * 10 ** 9


def _stopped(failure) -> bool:
    return getattr(failure, "exitcode", None) == -signal.SIGTERM


def first_failure(err, run_dir: Path | None = None) -> str:
    """The line ``fed-ddp run`` ends with when a rank failed: the first failed rank's recorded exception (or,
    with no record, e.g. a rank killed by a signal, its exit code), and where its traceback is."""
    # a rank ended by SIGTERM is the launcher stopping the others after a failure: a consequence, never the cause
    # (its time is whole seconds, so it could tie with, or even precede, the record of the rank that raised)
    rank, failure = min(err.failures.items(), key=lambda kv: (_stopped(kv[1]), _when(kv[1]), kv[0]))
    msg = failure.message if isinstance(failure.message, str) else (failure.message or {}).get("message", "")
    if not msg or msg.startswith("To enable traceback"):  # no record: the rank died before, or not in Python
        return f"rank {rank} failed (exit code {failure.exitcode}); see its log lines above"
    if " failed: " not in msg:  # the launcher's own words (a signal)
        return f"rank {rank} failed: {msg}"
    where = Path(run_dir) / ERRORS / f"rank_{rank}.txt" if run_dir is not None else None
    return msg + (f" (traceback above and in {where})" if where is not None and where.is_file() else
                  " (traceback above)")
