"""Who owns a run directory, and what a new run may do with an old one.

- ``RunLock``: an exclusive ``flock`` on ``RUN_DIR/.lock`` held by the server for the run's life; a second
  run on the same directory fails at once, naming the owner's host and pid. The kernel drops the lock
  when the owner dies, however it dies.
- ``check(cfg)``: a fresh run (``run.resume=false``) refuses a directory that already holds a run unless
  ``run.overwrite=true``; a resume refuses a stored config that differs in anything but the keys a
  resume may change (rounds, evaluation, tracking, timeouts, logging), naming the keys that differ.
- ``clear(run_dir)``: what ``run.overwrite`` removes (the old run's files, nothing else).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from fed_ddp.errors import ConfigError

LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "privacy_ledger.jsonl")
RUN_DIRS = ("checkpoints", "clients", "samples", "wandb")
# what a resume may change (where the run lives, how long it runs, what it reports, machine resources);
# everything else must equal the stored config
RESUMABLE = ("run.resume", "run.overwrite", "run.log_level", "run.max_restarts", "run.output_dir", "run.name",
             "model.cache_dir", "fed.rounds", "fed.timeout_s", "fed.round_timeout_s", "fed.max_bad_rounds",
             "fed.client_cache", "fed.workers", "train.num_threads", "eval.", "tracking.", "privacy.dp.max_epsilon")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / f).exists() for f in RUN_FILES + RUN_DIRS)


class RunBusy(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunBusy(f"{self.path.parent} is in use by {owner}: one run per directory (pick another run.name)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).startswith("deepspeed.config"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, current value) wherever they differ, except keys a resume may change."""
    a, b = _flat(stored), _flat(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == r or k.startswith(r) for r in RESUMABLE)]


def check(cfg) -> None:
    """Raise ConfigError (one line) if this run may not use its directory as configured."""
    from omegaconf import OmegaConf

    from fed_ddp.config import to_dict

    run_dir = cfg.run.dir
    if not holds_a_run(run_dir):
        return
    if not cfg.run.resume:
        if not cfg.run.overwrite:
            raise ConfigError("run.name", cfg.run.name, f"{run_dir} already holds a run: run.resume=true continues "
                              "it, run.overwrite=true replaces it, or pick another run.name")
        return
    stored_path = run_dir / "config.yaml"
    if stored_path.is_file():
        from fed_ddp.config import RunConfig

        # a key the stored config lacks came with a later version: the run used that key's default
        stored = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(to_dict(RunConfig())),
                                                        OmegaConf.load(stored_path)))
        diff = config_differences(stored, to_dict(cfg))
        if diff:
            shown = ", ".join(f"{k} ({was!r} -> {now!r})" for k, was, now in diff[:6])
            raise ConfigError("run.resume", True, f"the stored config of {run_dir} differs in {shown}"
                              f"{' ...' if len(diff) > 6 else ''}; resume with the same settings or start a new run")


def clear(run_dir: Path) -> None:
    """Remove an earlier run's files (run.overwrite), keeping anything else the user put there."""
    for f in RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(run_dir / d, ignore_errors=True)


def open_run(cfg) -> RunLock:
    """Take the run directory for this run: lock it (held until released), check it, clear an overwritten run.
    Raises RunBusy or ConfigError (one line each)."""
    lock = RunLock(cfg.run.dir).acquire()
    try:
        check(cfg)
        if cfg.run.overwrite and not cfg.run.resume:
            clear(cfg.run.dir)
    except Exception:
        lock.release()
        raise
    return lock
