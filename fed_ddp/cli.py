"""The ``fed-ddp`` command.

    fed-ddp run configs/quickstart.yaml [key=value ...]     launch 1 server + W worker ranks and train N clients
    fed-ddp pretrain configs/quickstart.yaml                 build (and cache) the tiny base model
    fed-ddp generate RUN/checkpoints/final --prompt "..." --out x.png
    fed-ddp compare configs/quickstart.yaml [key=value ...]  federated vs centralized vs local-only
    fed-ddp plan configs/quickstart.yaml [key=value ...] [--unet sd15]   bytes per round, before running
    fed-ddp report RUN_DIR ... [--out DIR]                   plots and a table from finished runs

Inside ``torchrun`` or SLURM (``RANK``/``WORLD_SIZE`` set), ``fed-ddp run`` does not launch: it joins.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from fed_ddp.config import ConfigError, load_config, split_args
from fed_ddp.diffusion.families import denoiser
from fed_ddp.results import RunSummary, read_summary
from fed_ddp.templates import KINDS


def _fail(msg: str, code: int = 2) -> int:
    print(f"fed-ddp: {msg}", file=sys.stderr)
    return code


def _load(args):
    files, overrides = split_args([args.config, *args.overrides])
    return load_config(files, overrides)


def cmd_run(args) -> int:
    cfg = _load(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # already launched: join
        from fed_ddp.train import main as rank_main

        return rank_main([args.config, *args.overrides])
    from fed_ddp.distributed.nodes import auto_workers, cpu_cores, plan_cfg

    capped = None
    if (w := auto_workers(cfg)) is not None:  # fed.workers=null on CPU: one single-thread worker rank per core
        capped = (f"fed-ddp: fed.workers=null -> {w} worker rank(s) on {cpu_cores()} CPU core(s) at "
                  f"train.num_threads={cfg.train.num_threads} (not {cfg.fed.num_workers}: more would share cores); "
                  f"the workers play the clients in turn (set fed.workers to choose)")
        cfg.fed.workers = w
        args.overrides = [*args.overrides, f"fed.workers={w}"]
    plan_cfg(cfg, nnodes=1)  # more ranks than GPUs here (train.device=auto): one config-error line, nothing started
    from fed_ddp.preflight import preflight

    for warning in preflight(cfg, cores=cpu_cores()):  # launch size, model and LoRA targets, data, privacy
        print(f"fed-ddp: warning: {warning}", file=sys.stderr)
    from fed_ddp.rundir import RunBusy, RunLock, check

    check(cfg)  # an earlier run in the directory, or a resume with other settings: one line, nothing started
    try:
        RunLock(cfg.run.dir).acquire().release()  # another run holds it now: say so before launching
    except RunBusy as e:
        return _fail(str(e))
    if warning := cfg.fed.idle_workers_warning():
        print(f"fed-ddp: warning: {warning}", file=sys.stderr)
    from fed_ddp.diffusion.models import base_path, quiet_libraries

    quiet_libraries()
    base_path(cfg.model)  # pretrain the tiny base here, once, before any rank starts
    if capped:
        print(capped, file=sys.stderr)
    return _launch(cfg, args)


def _launch(cfg, args) -> int:
    """Start 1 + workers ranks of ``fed_ddp.train`` under torch elastic; a failed rank's exception in one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from fed_ddp.distributed.nodes import describe

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size, run_id=uuid.uuid4().hex[:8],
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=cfg.run.max_restarts,
                          monitor_interval=0.5)
    print(f"fed-ddp: launching {describe(cfg)} -> {cfg.run.dir}", file=sys.stderr)
    before = os.environ.get("FED_DDP_LAUNCHER_PID")
    os.environ["FED_DDP_LAUNCHER_PID"] = str(os.getpid())  # ranks die with this process (fed_ddp.train)
    try:
        elastic_launch(launch, sys.executable)("-u", "-m", "fed_ddp.train", args.config, *args.overrides)
    except ChildFailedError as e:
        from fed_ddp.failures import first_failure

        return _fail(first_failure(e, cfg.run.dir), 1)
    except (KeyboardInterrupt, SignalException) as e:
        import signal

        sig = getattr(e, "sigval", signal.SIGINT)
        return _fail(f"stopped by {signal.Signals(sig).name}; every complete round is checkpointed in "
                     f"{cfg.run.dir / 'checkpoints'} (continue with run.resume=true)", 128 + int(sig))
    finally:  # a caller that goes on (fed_ddp.run, tests) must not hand this pid to the ranks of a later launch
        if before is None:
            os.environ.pop("FED_DDP_LAUNCHER_PID", None)
        else:
            os.environ["FED_DDP_LAUNCHER_PID"] = before
    print_closing(cfg)
    return 0


def print_closing(cfg) -> None:
    """What ``fed-ddp run`` prints after its ranks finish: accuracy table, time split, bytes, the simulated cell,
    privacy, where the adapter is."""
    s = read_summary(cfg.run.dir)
    if s is not None:
        print_table(s, list(cfg.data.digits), [d for d in cfg.model.tiny.digits if d not in cfg.data.digits])
        if (s.personal or {}).get("clients"):  # personal.mode: each client's digits, global vs personal
            from fed_ddp.personal import table

            print("\n" + table(s.personal))
        t = s.seconds_total
        print(f"\nTime over {s.rounds} rounds: {t['round']:.1f} s = local training {t['local_training']:.1f}"
              f" + client overhead {t['client_overhead']:.1f}"
              f" + communication {t['communication']:.1f} + aggregation {t['aggregation']:.2f}"
              f" + evaluation {t['evaluation']:.1f} + other {t['other']:.1f}")
        print_bytes(s)
        if sim := s.sim:
            print(f"Simulated wireless cell (not measured): {sim['time_s']:,.1f} s of synchronous rounds, "
                  f"{sim['energy_j']:,.1f} J on the devices ({sim['energy_wasted_j']:,.1f} J by "
                  f"{sim['stragglers']} straggler(s) past the deadline); median client round by device: "
                  + ", ".join(f"{k} {v:.3g} s" for k, v in sim["client_round_s_median"].items()))
        from fed_ddp.privacy.report import closing_lines

        print("\n".join(closing_lines(s)))
        print(f"Run directory: {cfg.run.dir}  (adapter: {cfg.run.dir / 'checkpoints' / 'final'})")


def print_table(summary: RunSummary, client_digits: list[int], base_digits: list[int], file=None) -> None:
    """The quickstart's closing table: generation accuracy of the base vs the federated adapter."""
    file = file or sys.stdout
    b, f = summary.base, summary.final
    if "gen_acc" not in f:
        return
    n = summary.images_per_prompt or "?"
    print(f"\nGeneration accuracy: share of {n} images per prompt that a reference classifier "
          f"({summary.classifier_test_accuracy:.1%} on real digits) assigns to the prompted digit", file=file)
    print(f"  {'':26s}{'base':>8s}{'federated':>11s}", file=file)
    rows = [(f"digit {d} ({'client' if d in client_digits else 'base'} concept)",
             b.get("gen_acc", {}).get(str(d), float("nan")), f["gen_acc"][str(d)])
            for d in sorted(int(k) for k in f["gen_acc"])]
    rows.append(("mean, client concepts", b.get("gen_acc_clients", float("nan")), f["gen_acc_clients"]))
    if base_digits:
        rows.append(("mean, base concepts", b.get("gen_acc_base", float("nan")), f.get("gen_acc_base", float("nan"))))
    for name, bv, fv in rows:
        print(f"  {name:26s}{bv:8.1%}{fv:11.1%}", file=file)


def _times(ratio: float) -> str:
    """'3.2x fewer than' for a ratio above 1, '2.00x more than' below (scaffold sends twice the values)."""
    if ratio >= 1 or ratio <= 0:
        return f"{ratio:.2f}x fewer than" if ratio < 10 else f"{ratio:.1f}x fewer than"
    return f"{1 / ratio:.2f}x more than"


def print_bytes(s: RunSummary, file=None) -> None:
    """The closing byte lines: over the air (per client) and in the cluster (collectives), never mixed."""
    c = s.comm
    up, down = c["air"]["up"], c["air"]["down"]
    print(f"Bytes over the air: up {up['total']:,} in {up['messages']:,} client messages ({c['uplink']}), down "
          f"{down['total']:,} to {down['messages']:,} clients ({c['downlink']}), for {s.lora_parameters:,} "
          f"{'UNet (train.method=full)' if s.method == 'full' else 'LoRA'} parameters; uplink "
          f"{_times(up.get('vs_dense_lora', 0))} dense fp32 {'weights' if s.method == 'full' else 'LoRA'}, "
          f"{_times(up.get('vs_full_unet', 0))} the full denoiser ({c['unet_parameters']:,} parameters)", file=file)
    print(f"Bytes in the cluster (collectives): up {s.bytes_up_total:,} / down {s.bytes_down_total:,} "
          f"over {s.workers} worker(s)", file=file)


def cmd_pretrain(args) -> int:
    cfg = _load(args)
    if cfg.model.pretrained:
        return _fail(f"model.pretrained={cfg.model.pretrained!r}: pretrain builds the tiny base only; set it to null")
    from fed_ddp.diffusion.models import base_path, quiet_libraries

    quiet_libraries()
    print(base_path(cfg.model))
    return 0


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, ids = [], sorted(ids)
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def cmd_generate(args) -> int:
    import torch

    from fed_ddp.checkpoint import read_info
    from fed_ddp.config import LoraSection
    from fed_ddp.diffusion.models import load_pipeline, quiet_libraries
    from fed_ddp.evaluation import generate
    from fed_ddp.images import save_grid

    quiet_libraries()
    _check_generate_options(args)
    try:
        info = read_info(args.checkpoint)
    except FileNotFoundError as e:
        return _fail(str(e))
    try:
        lora = LoraSection(**info["lora"]) if info.get("method", "lora") == "lora" else None
    except (TypeError, ConfigError) as e:  # unknown or bad LoRA settings in a tampered fed_ddp.json
        return _fail(f"{args.checkpoint}/fed_ddp.json: 'lora' is not a run's LoRA settings ({e})")
    personal = None
    if args.client is not None:  # the run's personal adapter of that client (fed_ddp.personal)
        from fed_ddp.personal import client_dir, read_index

        index = read_index(args.checkpoint)
        if index is None or args.client not in index["clients"]:
            return _fail(f"--client={args.client}: {args.checkpoint} has no personal adapter for client {args.client} "
                         + ("(the run had personal.mode=none)" if index is None else
                            f"(personal.mode={index['mode']}; clients with one: {_ranges(index['clients'])})"))
        personal = (index["mode"], client_dir(args.checkpoint, args.client), index.get("rank"))
    base = args.base or info["base_model"]
    try:
        pipe = load_pipeline(base, torch.device(args.device), family=info.get("family"))
    except (OSError, ValueError) as e:  # not a folder, no safetensors weights, not a pipeline
        return _fail(f"base model {base!r} (--base, or the checkpoint's base_model) cannot be loaded: "
                     f"{' '.join(str(e).split())[:300]}")
    from safetensors import SafetensorError

    try:
        _load_checkpoint(pipe, info, lora, personal, args.checkpoint)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # missing, extra, misshapen, damaged
        return _fail(f"{args.checkpoint}: the adapter does not load into the base model "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:300]})")
    imgs = generate(pipe, [args.prompt] * args.num_images, args.seed, args.steps, args.guidance_scale)
    save_grid(imgs[None], [args.prompt], args.out, cell=args.cell)
    print(f"wrote {args.out}")
    return 0


def _check_generate_options(args) -> None:
    """Every option of ``generate``, one line each, before a model is loaded."""
    import torch

    for key, value, lo, hi in (("--num-images", args.num_images, 1, 256), ("--steps", args.steps, 1, 1000),
                               ("--cell", args.cell, 8, 1024)):
        if not lo <= value <= hi:
            raise ConfigError(key, value, f"must be in [{lo}, {hi}]")
    if not 0 <= args.seed < 2 ** 32:
        raise ConfigError("--seed", args.seed, f"must be in [0, {2 ** 32 - 1}]")
    if not (args.guidance_scale > 0 and args.guidance_scale < 100):
        raise ConfigError("--guidance-scale", args.guidance_scale, "must be in (0, 100)")
    if not args.prompt.strip() or len(args.prompt) > 500:
        raise ConfigError("--prompt", args.prompt[:40], "must be 1 to 500 characters")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError("--device", args.device, "must be cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ConfigError("--device", args.device, "must be cpu, or cuda[:N] on a machine with a CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("--device", args.device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise ConfigError("--out", args.out, "must be a .png file")
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise ConfigError("--out", args.out, "is a folder, not a file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError("--out", args.out, f"cannot be written ({parent} is not a writable folder)")
    args.out = str(out)


def _load_checkpoint(pipe, info: dict, lora, personal, ckpt) -> None:
    from fed_ddp.diffusion.lora import attach_lora, attach_personal, load_adapter, load_unet
    from fed_ddp.lora_names import PERSONAL

    if info.get("method", "lora") == "full":  # the whole fine-tuned UNet replaces the base's
        load_unet(denoiser(pipe), ckpt)
    elif personal is not None and personal[0] == "finetune":  # the client's fine-tuned adapter replaces the global
        attach_lora(denoiser(pipe), lora)
        load_adapter(denoiser(pipe), personal[1])
    else:
        attach_lora(denoiser(pipe), lora)
        load_adapter(denoiser(pipe), ckpt)
        if personal is not None:  # split: global + personal, both active with weight 1
            attach_personal(denoiser(pipe), lora, personal[2])
            load_adapter(denoiser(pipe), personal[1], adapter_name=PERSONAL)


def cmd_compare(args) -> int:
    from fed_ddp.compare import compare

    cfg = _load(args)
    if not 0 <= args.client < cfg.fed.num_clients:
        return _fail(f"--client={args.client}: must be in [0, {cfg.fed.num_clients - 1}] (fed.num_clients)")
    from fed_ddp.compare import arm_config

    strategies = [s for s in (args.strategies or "").split(",") if s]
    for s in strategies:  # each arm's config is validated as a whole (e.g. flexlora needs fed.aggregator=mean)
        arm_config(cfg, s)
    if len(set(strategies)) < len(strategies):
        return _fail(f"--strategies={args.strategies}: names an arm twice")
    compare(cfg, client=args.client, strategies=strategies or None)
    return 0


def cmd_report(args) -> int:
    from fed_ddp.report import report

    done = report(args.run_dirs, args.out)
    print(f"wrote {done['table_md']}, {done['table_csv']}, " + ", ".join(str(p) for p in done["plots"]))
    return 0


def cmd_plan(args) -> int:
    from fed_ddp.plan import main as plan_main

    return plan_main(args)


def cmd_new(args) -> int:
    from fed_ddp.templates import write

    print(write(args.kind, args.path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fed-ddp", description="Federated LoRA fine-tuning of diffusion models")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in [("run", cmd_run, "launch a federated run"),
                            ("pretrain", cmd_pretrain, "build and cache the tiny base model"),
                            ("compare", cmd_compare, "federated vs centralized vs local-only"),
                            ("plan", cmd_plan, "bytes each round will move (comm.* codecs), before running")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config")
        s.add_argument("overrides", nargs="*", help="more YAML files (merged in order), then key=value overrides")
        s.set_defaults(fn=fn)
    sub.choices["compare"].add_argument("--client", type=int, default=0, help="the local-only client")
    sub.choices["compare"].add_argument("--strategies", default=None,
                                        help="one federated arm per strategy, e.g. fedavg,flexlora,fedyogi:server_lr=0.01 "
                                             "(name:key=value sets fed.key for that arm)")
    sub.choices["plan"].add_argument("--denoiser", "--unet", dest="denoiser", default=None,
                                     help="denoiser config (sets model.family): sd15, sdxl, sd3-medium, flux1-dev, "
                                          "flux1-schnell, a config.json or a model dir")
    sub.choices["plan"].add_argument("--wireless", action="store_true",
                                     help="simulated cell: air time, compute time and energy per round, full vs LoRA")
    g = sub.add_parser("generate", help="sample images from a checkpoint (adapter or full denoiser)")
    g.add_argument("checkpoint", help="a checkpoints/round_NNNN or checkpoints/final folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="generated.png")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance-scale", type=float, default=1.0)
    g.add_argument("--base", default=None, help="base pipeline directory (default: the one the run used)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--cell", type=int, default=64, help="pixels per image in the PNG")
    g.add_argument("--client", type=int, default=None,
                   help="also load this client's personal adapter (a run with personal.mode=split or finetune)")
    g.set_defaults(fn=cmd_generate)
    n = sub.add_parser("new", help="write a commented plug-in template (strategy, callback, objective, sampler)")
    n.add_argument("kind", choices=KINDS)
    n.add_argument("path", help="the .py file to write (never overwritten); its name is the plug-in's")
    n.set_defaults(fn=cmd_new)
    r = sub.add_parser("report", help="plots and a table (md + csv) from finished run directories")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (config.yaml, metrics.jsonl)")
    r.add_argument("--out", default="runs/report", help="output folder (default: runs/report)")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # options anywhere on the line: `plan CFG --unet sd15 lora.rank=4` leaves the overrides after --unet
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    from fed_ddp.rundir import RunBusy

    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    except RunBusy as e:
        return _fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # a path that cannot be read or written: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or ' '.join(str(e).split())}")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``fed-ddp: --steps: invalid int value: 'x'``), no usage block."""

    def error(self, message: str):
        sub = self.prog.removeprefix("fed-ddp").strip()
        print(f"fed-ddp: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
