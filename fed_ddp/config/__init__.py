"""Typed run configuration: dataclasses <- YAML <- ``key=value`` overrides, merged with OmegaConf.

Every field has a one-line comment; every group validates itself in ``__post_init__``, so a bad
value fails before any process starts with one line that names the key, the value and what is
allowed::

    cfg = load_config("configs/quickstart.yaml", ["fed.rounds=3", "lora.rank=8"])
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fed_ddp import plugins
from fed_ddp.compat import check as check_compat
from fed_ddp.compression.config import CommSection
from fed_ddp.config.sections import (
    PARTITIONS,
    PERSONAL_MODES,
    DataSection,
    DeepSpeedSection,
    EvalSection,
    FedSection,
    LoraSection,
    ModelSection,
    PersonalSection,
    PretrainSection,
    RunSection,
    TrackingSection,
    TrainSection,
    WandbSection,
)
from fed_ddp.errors import ConfigError, check
from fed_ddp.files import MAX_YAML, read_text
from fed_ddp.privacy.config import PrivacySection
from fed_ddp.wireless.config import WirelessSection

_check = check


@dataclass(kw_only=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    fed: FedSection = field(default_factory=FedSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    comm: CommSection = field(default_factory=CommSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    wireless: WirelessSection = field(default_factory=WirelessSection)
    personal: PersonalSection = field(default_factory=PersonalSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self):
        if not self.lora.targets:  # the family's defaults, written out so every rank, checkpoint and plan sees them
            from fed_ddp.diffusion.families import lookup

            self.lora.targets = list(lookup(self.model.family).default_targets)
        if self.data.source == "imagefolder" and self.data.client_dirs:
            _check(len(self.data.client_dirs) == self.fed.num_clients, "data.client_dirs",
                   self.data.client_dirs, f"needs one folder per client (fed.num_clients={self.fed.num_clients})")
        w = self.wireless
        if w.enabled and w.scheduler != "random":  # the older spelling of fed.sampling=best_channel / age
            _check(self.fed.sampling in ("uniform", w.scheduler), "wireless.scheduler", w.scheduler,
                   f"is the older spelling of fed.sampling={w.scheduler}, which contradicts "
                   f"fed.sampling={self.fed.sampling}: set only fed.sampling")
            self.fed.sampling = w.scheduler
        check_compat(self)  # every rule across groups: fed_ddp/compat.py, docs/compatibility.md

    @property
    def world_size(self) -> int:
        return 1 + self.fed.num_workers * self.fed.ranks_per_client


def _format_omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    if not key:  # a plain value where a group belongs, e.g. ``fed=3``: OmegaConf names the class only
        m = re.search(r"not a subclass of (\w+)Section", msg)
        key = m.group(1).lower() if m else "config"
        if m:
            return ConfigError(key, None, "is a config group; set its keys, e.g. fed.rounds=3")
    if "not in" in msg and "Key" in msg:
        return ConfigError(key, None, "unknown key")
    return ConfigError(key, getattr(e, "value", None), msg)


def load_config(path: str | os.PathLike | list | tuple | None = None,
                overrides: list[str] | tuple[str, ...] = (), base: RunConfig | None = None) -> RunConfig:
    """Merge defaults (or ``base``, a config) <- YAML file(s), in order <- ``key=value`` overrides, and validate.

    Raises ConfigError (one line: key, value, what is allowed).
    """
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    try:
        cfg = OmegaConf.structured(RunConfig if base is None else base)
        for p in map(Path, paths):
            if not p.is_file():
                raise ConfigError("config", str(p), "file does not exist")
            try:
                text = read_text(p, MAX_YAML, follow=True)
            except OSError as e:  # too large, not UTF-8: file:line named
                raise ConfigError("config", str(p), str(e)) from None
            try:
                loaded = OmegaConf.load(p) if text.strip() else None
            except OSError:  # OmegaConf: a scalar document
                loaded = "scalar"
            except yaml.YAMLError as e:
                raise ConfigError("config", str(p), f"invalid YAML: {' '.join(str(e).split())}") from None
            if not isinstance(loaded, DictConfig) or not loaded:
                raise ConfigError("config", str(p), "is empty" if loaded is None or isinstance(loaded, DictConfig)
                                  else "must be a YAML mapping of config groups (run:, fed:, ...)")
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError("override", item, "must look like key=value")
            key, _ = item.split("=", 1)
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not key.startswith(
                    ("deepspeed.config.", "fed.strategy_args.")):
                raise ConfigError(key, item.split("=", 1)[1], "unknown key")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        plugins.load(OmegaConf.select(cfg, "run.plugins"))  # before any name is checked against a registry
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _format_omegaconf_error(e) from None


_OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words -> (YAML files, key=value overrides): files first, in order. A word is an override
    when it starts with a dotted key and ``=`` (``fed.rounds=3``); anything else (``runs/a=b.yaml``) is a file."""
    files = [a for a in args if not _OVERRIDE.match(a)]
    return files, [a for a in args if _OVERRIDE.match(a)]


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML, W&B and JSON)."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    from fed_ddp.files import open_new

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open_new(path) as f:  # never through a planted link
        f.write(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


def reference_table() -> str:
    """The README's config reference, built from the dataclasses and their field comments."""
    import inspect

    def walk(cls, prefix):
        notes = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): [^=]+=\s*(.+?)\s+#\s*(.*)$", line)
            if m:
                notes[m.group(1)] = m.group(3)
        inst = cls()
        for f in fields(cls):
            v = getattr(inst, f.name)
            if is_dataclass(v):
                yield from walk(type(v), f"{prefix}{f.name}.")
            else:  # the default as written (``~`` unexpanded), not as this machine resolves it
                yield f"{prefix}{f.name}", f.default if isinstance(f.default, str) else v, notes.get(f.name, "")

    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{k}` | `{v}` | {note} |" for k, v, note in walk(RunConfig, "")]
    return "\n".join(rows)


__all__ = ["PARTITIONS", "PERSONAL_MODES", "CommSection", "ConfigError", "DataSection", "DeepSpeedSection", "EvalSection",
           "FedSection", "LoraSection", "ModelSection", "PersonalSection", "PretrainSection", "PrivacySection", "RunConfig",
           "RunSection", "TrackingSection", "TrainSection", "WandbSection", "WirelessSection", "load_config",
           "reference_table", "save_config", "split_args", "to_dict"]
