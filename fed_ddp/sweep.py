"""Scaling studies from one sweep file, run by a W&B agent or by a SLURM job array.

A sweep file (``configs/sweeps/*.yaml``) is a W&B sweep config whose ``command`` runs this module::

    command:    ${env} python -m fed_ddp.sweep run CONFIG [key=value ...] ${args_no_hyphens}   (a YAML list)
    parameters: fed.num_clients: {values: [2, 4, 8]}, lora.rank: {values: [4, 8, 16]},
                comm.uplink: {values: [[], [int8], [topk, int8]]}

    wandb sweep configs/sweeps/scaling.yaml; wandb agent ENTITY/PROJECT/SWEEP_ID     (W&B drives)
    python -m fed_ddp.sweep count configs/sweeps/scaling.yaml                         (-> 27)
    sbatch --array=0-26 slurm/sweep.sbatch configs/sweeps/scaling.yaml [key=value ...] (SLURM drives)

``run CONFIG key=value ...`` is ``fed-ddp run`` with a run name made from the command's overrides (so
sweep runs never share a run directory): ``<group>-<key><value>-...[-<sweep id>]``, e.g.
``scaling-num_clients4-rank8-uplinktopk+int8-1234`` (a list joins with '+', ``[]`` reads ``fp32``);
tracking.* and run.* overrides are left out of the name; the id
is $WANDB_SWEEP_ID or $SLURM_ARRAY_JOB_ID when set. ``point FILE I [key=value ...]`` prints, one per
line, the ``fed-ddp run`` arguments of grid point I: the file's command with W&B's
``${args_no_hyphens}`` filled in the way the agent fills it (``key=value``), then the extra overrides
(which apply to every point and stay out of the name), then the same run name. A list value is
written the way the agent writes it (``comm.uplink=['topk', 'int8']``), which OmegaConf reads back as
the list. A new axis is one more entry under ``parameters``.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

import yaml

from fed_ddp.config import ConfigError, load_config, split_args

ARGS_MACRO = "${args_no_hyphens}"


def load_sweep(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("sweep", str(path), "file does not exist")
    try:
        sweep = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("sweep", str(path), f"invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise ConfigError(f"{path}: parameters", None, "must map config keys to {values: [...]}")
    return sweep


def grid(sweep: dict) -> list[dict]:
    """All grid points, in file order (first key slowest), as {key: value}."""
    axes = []
    for key, spec in sweep["parameters"].items():
        if isinstance(spec, dict) and isinstance(spec.get("values"), list) and spec["values"]:
            axes.append([(key, v) for v in spec["values"]])
        elif isinstance(spec, dict) and "value" in spec:
            axes.append([(key, spec["value"])])
        else:
            raise ConfigError(f"parameters.{key}", spec, "needs {values: [...]} or {value: x} (a grid; "
                                                         "distributions only work with W&B's random/bayes)")
    return [dict(p) for p in itertools.product(*axes)]


def base_args(sweep: dict) -> list[str]:
    """CONFIG and fixed overrides: what follows ``fed_ddp.sweep run`` in the file's command."""
    cmd = [str(c) for c in sweep.get("command") or []]
    try:
        i = cmd.index("fed_ddp.sweep")
    except ValueError:
        raise ConfigError("command", cmd, "must run `python -m fed_ddp.sweep run CONFIG ... ${args_no_hyphens}`") from None
    rest = cmd[i + 1:]
    if not rest or rest[0] != "run" or len(rest) < 2 or ARGS_MACRO not in rest:
        raise ConfigError("command", cmd, "must run `python -m fed_ddp.sweep run CONFIG ... ${args_no_hyphens}`")
    return [c for c in rest[1:] if c != ARGS_MACRO]


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value)).strip("_") or "x"


def _value_slug(value: str) -> str:
    """A value as it reads in a run name; a list (a codec chain) joins with '+', [] is dense fp32:
    ``['topk', 'int8']`` (how W&B writes it) and ``[topk,int8]`` -> ``topk+int8``, ``[]`` -> ``fp32``."""
    if value.strip().startswith("["):
        try:
            items = yaml.safe_load(value)
        except yaml.YAMLError:
            items = None
        if isinstance(items, list):
            return "+".join(_slug(i) for i in items) or "fp32"
    return _slug(value)


def run_name(config, overrides: list[str], named: list[str] | None = None, env=os.environ, cfg=None) -> str:
    """``<group>-<key><value>-...[-<id>]`` from the ``named`` overrides (default: all; tracking.*, run.* left out).
    ``cfg``: the loaded config of ``config`` + ``overrides``, when the caller has it already."""
    cfg = load_config(config, overrides) if cfg is None else cfg
    group = cfg.tracking.wandb.group or "sweep"
    parts = [_slug(group)]
    for item in overrides if named is None else named:
        key, _, value = item.partition("=")
        if "=" in item and not key.startswith(("tracking.", "run.")):
            parts.append(_slug(key.rsplit(".", 1)[-1]) + _value_slug(value))
    sweep_id = env.get("WANDB_SWEEP_ID") or env.get("SLURM_ARRAY_JOB_ID")
    if sweep_id:
        parts.append(_slug(sweep_id))
    return "-".join(parts)


def with_run_name(args: list[str], named: list[str] | None = None, env=os.environ, cfg=None) -> list[str]:
    """``args`` (YAML file(s), then key=value overrides) plus ``run.name=...`` unless one is given."""
    files, overrides = split_args(list(args))
    if any(o.startswith("run.name=") for o in overrides):
        return list(args)
    return [*args, f"run.name={run_name(files, overrides, named, env, cfg)}"]


def point_args(sweep: dict, index: int, extra: list[str] = (), env=os.environ) -> list[str]:
    points = grid(sweep)
    if not 0 <= index < len(points):
        raise ConfigError("index", index, f"the sweep has {len(points)} grid points: use 0..{len(points) - 1} "
                                          f"(sbatch --array=0-{len(points) - 1})")
    swept = base_args(sweep) + [f"{k}={v}" for k, v in points[index].items()]
    cfg = load_config(*split_args(swept + list(extra)))  # an unknown key or a bad value fails here, not in the job
    return with_run_name(swept + list(extra), named=swept[1:], env=env, cfg=cfg)  # extra overrides: not in the name


USAGE = ("usage: python -m fed_ddp.sweep run CONFIG [key=value ...] | count SWEEP.yaml | "
         "point SWEEP.yaml INDEX [key=value ...] | check SWEEP.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) < 2 or argv[0] not in ("run", "count", "point", "check"):
            print(USAGE, file=sys.stderr)
            return 2
        cmd, rest = argv[0], argv[1:]
        if cmd == "run":
            from fed_ddp.cli import main as cli_main

            return cli_main(["run", *with_run_name(rest)])
        sweep = load_sweep(rest[0])
        if cmd == "count":
            print(len(grid(sweep)))
        elif cmd == "check":  # every grid point is a valid config
            for i in range(len(grid(sweep))):
                point_args(sweep, i)
            print(f"{rest[0]}: {len(grid(sweep))} grid points, all valid")
        else:
            if len(rest) < 2 or not rest[1].lstrip("-").isdigit():
                raise ConfigError("index", rest[1] if len(rest) > 1 else None, "must be an integer grid point")
            print("\n".join(point_args(sweep, int(rest[1]), rest[2:])))
        return 0
    except ConfigError as e:
        print(f"fed-ddp: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
