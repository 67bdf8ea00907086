"""User code on every rank: ``run.plugins`` and ``package.module:Name`` references.

``run.plugins`` lists modules (``my_lab.fedlion``, importable from the working directory or the environment)
or files (``my_lab/fedlion.py``). ``load_config`` imports them before it validates anything, so whatever they
register (a strategy with ``fed_ddp.strategies.register``, a callback class) is known to the launcher and to
every rank, each of which loads the same config (``fed-ddp run``, ``torchrun``, SLURM, ``plan``, ``compare``,
``sweep``). A plugin that does not import is one line naming it and the error's first line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fed_ddp.errors import ConfigError

_files: dict[Path, object] = {}  # a plugin file is imported once per process


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def import_plugin(name: str, key: str = "run.plugins"):
    """Import one plugin (a module name or a ``.py`` file); its module."""
    try:
        if name.endswith(".py") or "/" in name:
            path = Path(name).expanduser().resolve()
            if path in _files:
                return _files[path]
            if not path.is_file():
                raise ConfigError(key, name, "no such file")
            spec = importlib.util.spec_from_file_location(f"fed_ddp_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling-free introspection look modules up by name
            spec.loader.exec_module(module)
            _files[path] = module
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` does: the working directory
            sys.path.insert(0, str(Path.cwd()))
        return importlib.import_module(name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (any error of user code: one line, not a traceback)
        sys.modules.pop(f"fed_ddp_plugin_{Path(name).stem}", None)
        raise ConfigError(key, name, f"does not import: {_first_line(e)}") from None


def load(names) -> None:
    for name in names or ():
        import_plugin(str(name))


def lookup(registry: dict, name: str, key: str, base: type, hint: str = ""):
    """``name`` in ``registry``, or the ``package.module:Name`` it spells (a ``base`` subclass, registered under
    that spelling on first use); one line otherwise (``hint`` follows the registered names)."""
    if name in registry:
        return registry[name]
    if ":" not in str(name):
        raise ConfigError(key, name, f"must be one of {sorted(registry)}{hint}")
    cls = resolve(name, key)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(key, name, f"is not a {base.__module__}.{base.__name__} subclass")
    registry[name] = cls
    return cls


def resolve(spec: str, key: str):
    """``package.module:Name`` (or ``path/to/file.py:Name``) -> the object it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, spec, "must be a registered name or package.module:Name")
    module = import_plugin(module_name, key)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, spec, f"{module_name} has no {attr!r}")
        obj = getattr(obj, part)
    return obj
