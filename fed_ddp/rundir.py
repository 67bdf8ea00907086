"""Who owns a run directory, what a new run may do with an old one, and nothing followed outside it.

- A run directory is recognised by the marker ``.fed_ddp_run`` that every run writes (runs from before
  the marker: a ``config.yaml`` with a ``run`` group beside a ``metrics.jsonl``), never by folder names
  alone: a folder of the user's that happens to hold ``samples/`` or ``checkpoints/`` is refused, not
  overwritten.
- ``inspect(run_dir)``: nothing the project writes or removes there may be a symbolic link (checked with
  ``lstat``, refused with one line naming the link), nor anything but a regular file or folder; the
  parent must be a writable folder.
- ``RunLock``: an exclusive ``flock`` on ``RUN_DIR/.lock`` (opened with ``O_NOFOLLOW``), held by the server
  for the run's life; a second run on the same directory fails at once, naming the owner's host and pid.
- ``check(cfg)``: a fresh run (``run.resume=false``) refuses a directory that holds a run unless
  ``run.overwrite=true``; an earlier start that completed no round (no checkpoint) blocks nothing; a
  resume refuses a stored config that differs in anything but the keys a resume may change.
- ``clear(run_dir)``: what ``run.overwrite`` removes: the run files and, inside the run's folders, only
  entries named as the project names them (``checkpoints/round_0003``, ``samples/round_0003.png``,
  ``clients/client_000007/round_0003.safetensors``, W&B's ``run-*``); a folder left empty goes too.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import stat
from pathlib import Path

from fed_ddp.errors import ConfigError
from fed_ddp.files import UnsafePath, open_new, read_yaml, refuse_link, repair_jsonl

LOCK = ".lock"
MARKER = ".fed_ddp_run"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "privacy_ledger.jsonl", MARKER)
RUN_DIRS = ("checkpoints", "clients", "samples", "wandb", "errors")
# inside each run folder, the entries the project (or W&B, in wandb/) creates: all that run.overwrite removes
OWNED = {"checkpoints": re.compile(r"(round_\d{4,}|final)(\.tmp)?"),
         "clients": re.compile(r"client_\d{6,}"),
         "samples": re.compile(r"round_\d{4,}\.png"),
         "errors": re.compile(r"rank_\d+\.txt"),
         "wandb": re.compile(r"(offline-)?run-[\w.-]+|latest-run|debug(-internal|-cli\.[\w.-]+)?\.log")}
CLIENT_FILE = re.compile(r"\.?round_\d{4,}\.safetensors(\.tmp)?")
# what a resume may change (where the run lives, how long it runs, what it reports, machine resources);
# everything else must equal the stored config
RESUMABLE = ("run.resume", "run.overwrite", "run.log_level", "run.max_restarts", "run.output_dir", "run.name",
             "model.cache_dir", "fed.rounds", "fed.timeout_s", "fed.round_timeout_s", "fed.max_bad_rounds",
             "fed.client_cache", "fed.workers", "train.num_threads", "eval.", "tracking.", "privacy.dp.max_epsilon")


class RunBusy(RuntimeError):
    pass


def _refuse(run_dir: Path, what: str) -> ConfigError:
    return ConfigError("run.name", run_dir.name, f"{run_dir}: {what}")


def inspect(run_dir: Path) -> None:
    """Raise ConfigError (one line) if the run directory, or anything the project would write or remove in
    it, is a symbolic link, of the wrong kind, or cannot be written."""
    parent = run_dir.parent
    try:
        st = os.stat(parent) if os.path.lexists(parent) else None
    except OSError as e:  # a symlink loop, a path through a file
        raise ConfigError("run.output_dir", str(parent), f"cannot be used: {e.strerror}") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ConfigError("run.output_dir", str(parent), "is not a folder")
    probe = parent
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("run.output_dir", str(parent), f"cannot be written ({probe}: permission denied)")
    if not os.path.lexists(run_dir):
        return
    if run_dir.is_symlink():
        raise _refuse(run_dir, f"is a symbolic link (to {os.readlink(run_dir)}): fed_ddp does not follow links "
                      "in a run directory; set run.output_dir to the folder it points to")
    if not run_dir.is_dir():
        raise _refuse(run_dir, "exists and is not a folder")
    for name in (*RUN_FILES, LOCK):
        p = run_dir / name
        if p.is_symlink():
            raise _refuse(run_dir, f"{name} is a symbolic link (to {os.readlink(p)}): fed_ddp does not follow "
                          "links in a run directory; remove it")
        if os.path.lexists(p) and not p.is_file():
            raise _refuse(run_dir, f"{name} is not a regular file (a folder or device where the run writes a file)")
    for name in RUN_DIRS:
        top = run_dir / name
        if top.is_symlink() or (os.path.lexists(top) and not top.is_dir()):
            raise _refuse(run_dir, f"{name} is {'a symbolic link' if top.is_symlink() else 'not a folder'}: "
                          "fed_ddp does not follow links in a run directory; remove it")
        for root, dirs, files in os.walk(top):
            for entry in dirs + files:
                p = Path(root) / entry
                if p.is_symlink():
                    raise _refuse(run_dir, f"{p.relative_to(run_dir)} is a symbolic link (to {os.readlink(p)}): "
                                  "fed_ddp does not follow links in a run directory; remove it")


def project_entries(run_dir: Path) -> list[str]:
    """Names the project writes that exist in ``run_dir`` (the marker and lock aside)."""
    return [n for n in (*RUN_FILES, *RUN_DIRS) if n != MARKER and os.path.lexists(run_dir / n)]


def marked(run_dir: Path) -> bool:
    """A run directory: the marker, or (runs from before it) a fed_ddp config.yaml beside a metrics.jsonl."""
    if (run_dir / MARKER).is_file():
        return True
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()):
        return False
    try:
        stored = read_yaml(run_dir / "config.yaml")
    except OSError:
        return False
    return isinstance(stored, dict) and isinstance(stored.get("run"), dict) and "name" in stored["run"]


def has_rounds(run_dir: Path) -> bool:
    """Did a run here complete a round (a checkpoint exists)?"""
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(OWNED["checkpoints"].fullmatch(p.name) and not p.name.endswith(".tmp")
                                  for p in ckpts.iterdir())


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.parent.is_symlink():  # the whole check is inspect(); the lock never follows a link
            raise _refuse(self.path.parent, "is a symbolic link: fed_ddp does not follow links in a run directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:  # a link planted after inspect(), a folder: refuse, never follow
            raise _refuse(self.path.parent, f"{LOCK} cannot be opened as the run's lock file ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _refuse(self.path.parent, f"{LOCK} is not a regular file")
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


def check(cfg) -> bool:
    """Raise ConfigError (one line) if this run may not use its directory as configured. Returns True when
    the directory holds what an earlier run wrote and this run must clear first (run.overwrite, or an earlier
    start that completed no round)."""
    run_dir = cfg.run.dir
    inspect(run_dir)
    found = project_entries(run_dir) if run_dir.is_dir() else []
    if not found:
        return False
    if not marked(run_dir):
        shown = ", ".join(n + ("/" if n in RUN_DIRS else "") for n in found)
        raise _refuse(run_dir, f"holds {shown} that no fed_ddp run wrote (no {MARKER} marker): fed_ddp neither "
                      "overwrites nor deletes them; pick another run.name or run.output_dir")
    if not cfg.run.resume:
        if not has_rounds(run_dir):
            return True  # a start that failed before its first round: nothing of value, nothing blocks
        if not cfg.run.overwrite:
            raise ConfigError("run.name", cfg.run.name, f"{run_dir} already holds a run: run.resume=true continues "
                              "it, run.overwrite=true replaces it, or pick another run.name")
        return True
    stored_path = run_dir / "config.yaml"
    if stored_path.is_file():
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from fed_ddp.config import RunConfig, to_dict

        try:
            loaded = read_yaml(stored_path)
            if not isinstance(loaded, dict):
                raise UnsafePath(f"{stored_path}: not a mapping of config groups")
            # a key the stored config lacks came with a later version: the run used that key's default
            stored = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(to_dict(RunConfig())), loaded))
            w = stored["wireless"]  # a run from before best_channel / age were samplers: load_config maps them
            if w["enabled"] and w["scheduler"] != "random" and stored["fed"]["sampling"] == "uniform":
                stored["fed"]["sampling"] = w["scheduler"]
        except (OSError, OmegaConfBaseException) as e:
            raise ConfigError("run.resume", True, f"the stored config is damaged ({' '.join(str(e).split())[:200]}); "
                              "a resume needs the run's own config.yaml") from None
        diff = config_differences(stored, to_dict(cfg))
        if diff:
            shown = ", ".join(f"{k} ({was!r} -> {now!r})" for k, was, now in diff[:6])
            raise ConfigError("run.resume", True, f"the stored config of {run_dir} differs in {shown}"
                              f"{' ...' if len(diff) > 6 else ''}; resume with the same settings or start a new run")
    return False


def clear(run_dir: Path, only: tuple[str, ...] | None = None) -> None:
    """Remove what an earlier run wrote (run.overwrite), keeping anything else the user put there: the run
    files, and inside the run folders only the entries the project names (``OWNED``)."""
    for name in (RUN_FILES if only is None else ()):
        p = run_dir / name
        refuse_link(p)
        if name != MARKER:
            p.unlink(missing_ok=True)
    for name in (RUN_DIRS if only is None else only):
        top = run_dir / name
        refuse_link(top)
        if not top.is_dir():
            continue
        for entry in list(top.iterdir()):
            refuse_link(entry)
            if not OWNED[name].fullmatch(entry.name):
                continue
            if name == "clients" and entry.is_dir():  # a client's folder: only its state files
                for f in entry.iterdir():
                    if CLIENT_FILE.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                        f.unlink()
                _rmdir_if_empty(entry)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        _rmdir_if_empty(top)


def _rmdir_if_empty(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass  # not empty: the user's files stay


def open_run(cfg) -> tuple[RunLock, list[str]]:
    """Take the run directory for this run: lock it (held until released), check it, clear an overwritten run
    (or a start that completed no round), mark it, and mend append-only files a crash cut short. Returns the
    lock and warnings to log. Raises RunBusy or ConfigError (one line each)."""
    lock = RunLock(cfg.run.dir).acquire()
    warnings = []
    try:
        if check(cfg):
            if cfg.run.resume is False and not cfg.run.overwrite:
                warnings.append(f"{cfg.run.dir}: an earlier start completed no round; its files are replaced")
            clear(cfg.run.dir)
        with open_new(cfg.run.dir / MARKER) as f:
            f.write(json.dumps({"fed_ddp": "run directory", "run": cfg.run.name}) + "\n")
        if cfg.run.resume:
            warnings += [w for w in (repair_jsonl(cfg.run.dir / "metrics.jsonl"),
                                     repair_jsonl(cfg.run.dir / "privacy_ledger.jsonl", keep=True)) if w]
    except Exception:
        lock.release()
        raise
    return lock, warnings
