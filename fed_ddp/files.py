"""Reading and writing the files a run owns, so that no file can be turned against its user.

- ``open_new(path, append=False)``: a text file opened for writing without following a symbolic link
  (``O_NOFOLLOW``): a link planted where a run file belongs fails the write instead of redirecting it.
- ``refuse_link(path)``: one check before a folder is written into or removed (checkpoints, client states).
- ``read_text(path)`` / ``read_yaml(path)`` / ``read_json(path)``: bounded, UTF-8, the file named in the
  error; YAML through OmegaConf's loader (its alias-expansion limit) and never a Python object.
- ``repair_jsonl(path, keep)``: an append-only file whose last line a crash cut short, mended before the
  next append (the fragment dropped, or for the privacy ledger kept as a line of its own).

A leaf module: imports nothing from fed_ddp but ``errors``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

MAX_TEXT = 64 * 2 ** 20  # metrics.jsonl of a long run is a few MB; anything larger is not ours
MAX_YAML = 2 ** 20  # a config file is a few KB


class UnsafePath(OSError):
    """A path the project refuses to follow or read (one line: the path and why)."""


def refuse_link(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_symlink():
        raise UnsafePath(f"{p} is a symbolic link (to {os.readlink(p)}): fed_ddp does not follow links in a run "
                         "directory; remove it")


def open_new(path: str | os.PathLike, append: bool = False, binary: bool = False):
    """Open ``path`` for writing (truncate, or append), refusing a symbolic link or anything but a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise
    try:
        if not _is_regular(fd):
            raise UnsafePath(f"{path} is not a regular file: fed_ddp writes only regular files in a run directory")
        if not append:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab" if binary and append else "wb" if binary else "a" if append else "w",
                         **({} if binary else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with open_new(path) as f:
        f.write(text)


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def read_bytes(path: str | os.PathLike, limit: int = MAX_TEXT, follow: bool = False) -> bytes:
    """The bytes of a regular file, at most ``limit``; not through a link in its last component unless
    ``follow`` (a user's own input file may be a link; a run directory's may not)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise
    with os.fdopen(fd, "rb") as f:
        if not _is_regular(fd):
            raise UnsafePath(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{path}: larger than {limit:,} bytes, which no file of this kind is")
    return data


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT, follow: bool = False) -> str:
    data = read_bytes(path, limit, follow)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UnsafePath(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: str | os.PathLike, limit: int = MAX_TEXT, follow: bool = False):
    text = read_text(path, limit, follow)
    try:
        return json.loads(text)
    except ValueError as e:
        raise UnsafePath(f"{path}: not valid JSON ({getattr(e, 'msg', e)}, line {getattr(e, 'lineno', '?')})") from None


def read_yaml(path: str | os.PathLike, limit: int = MAX_YAML):
    """A YAML file as plain containers, through OmegaConf's loader (duplicate keys, tags and alias bombs
    refused); raises UnsafePath naming the file."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    read_text(path, limit)  # size, UTF-8, not a link: named errors before the parser sees it
    try:
        loaded = OmegaConf.load(str(path))
    except (yaml.YAMLError, OmegaConfBaseException, OSError) as e:
        raise UnsafePath(f"{path}: invalid YAML: {' '.join(str(e).split())[:300]}") from None
    return OmegaConf.to_container(loaded)


def repair_jsonl(path: str | os.PathLike, keep: bool = False) -> str | None:
    """If ``path``'s last line has no newline (a write cut short by a crash), mend it before appending:
    drop the fragment (``keep=False``) or end it as a line of its own (``keep=True``: the privacy ledger
    counts a cut line as a spent round). Returns a warning naming the file and line, or None."""
    p = Path(path)
    if not p.is_file() or p.is_symlink():
        return None
    data = read_bytes(p)
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    line = data[:cut].count(b"\n") + 1
    if keep:
        with open_new(p, append=True) as f:
            f.write("\n")
        return f"{p}: line {line} was cut short by a crash ({len(data) - cut} bytes): ended it, kept as it is"
    fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, cut)
    finally:
        os.close(fd)
    return f"{p}: line {line} was cut short by a crash ({len(data) - cut} bytes, not JSON): removed it before appending"


def jsonl_rows(path: str | os.PathLike) -> tuple[list[tuple[int, object]], str | None]:
    """((line number, parsed value) for every complete JSON line, a warning for a cut last line or None).
    A line that is not JSON anywhere but last raises UnsafePath naming the file and line."""
    text = read_text(path)
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    rows, warning = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError:
            raise UnsafePath(f"{path}:{n}: not a JSON line") from None
    if tail.strip():
        try:
            rows.append((len(lines) + 1, json.loads(tail)))
        except ValueError:
            warning = f"{path}: line {len(lines) + 1} was cut short by a crash ({len(tail)} bytes): skipped"
    return rows, warning
