"""``fed-ddp new KIND PATH``: a commented plug-in that runs as written, named after its file.

Each KIND.py.tmpl beside this module is a working plug-in of that kind; ``__NAME__`` becomes the file's stem
(the registered name), ``__CLASS__`` its CamelCase, ``__PATH__`` the path as given (in the usage line).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from fed_ddp.errors import ConfigError

KINDS = ("callback", "objective", "sampler", "strategy")


def write(kind: str, where: str) -> str:
    """Write the KIND template to ``where`` (never over an existing file); the line to print."""
    if kind not in KINDS:
        raise ConfigError("kind", kind, f"must be one of {list(KINDS)}")
    path = Path(where).expanduser()
    name = path.stem
    if path.suffix != ".py" or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ConfigError("path", where, "must be a .py file named in lower-case letters, digits and _ (the "
                                         "plug-in's name)")
    cls = "".join(part.capitalize() for part in name.split("_")) or "Plugin"
    text = (files("fed_ddp.templates") / f"{kind}.py.tmpl").read_text()
    text = text.replace("__NAME__", name).replace("__CLASS__", cls).replace("__PATH__", where)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as f:  # an existing file is the user's: FileExistsError, one line from the CLI
        f.write(text)
    return f"wrote {path}: a {kind} named {name!r} (class {cls}); the command that runs it is at its top"
