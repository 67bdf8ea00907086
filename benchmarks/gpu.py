"""The GPU part of issue 14, in one command: local step, federated aggregation and DeepSpeed on one card.

1. Local step (floor 1 at SD v1.5 size): an SD v1.5-sized UNet built from the shipped config
   (``fed_ddp/diffusion/configs/sd15_unet.json``, random weights: throughput does not depend on them), LoRA r4 on
   to_q/to_k/to_v/to_out.0 (``attach_lora``: 797,184 parameters), SDPA attention, 512 px (64x64x4 latents, 77x768
   text states), bf16 autocast over the fp32 frozen base as fed_ddp's torch engine runs it. Images/s of
   ``LocalTrainer.fit`` (engine from ``build_engine``) against the plain diffusers + peft loop of
   ``benchmarks/step.py`` on the same module, interleaved, medians; peak ``torch.cuda.max_memory_allocated`` of each;
   at batch 1, 4, 8 and, at batch 8, with gradient checkpointing, ``torch.compile``, both, and a bf16 frozen base.
2. Federated aggregation: a server and ``--workers`` worker ranks on the one GPU over NCCL (NCCL may refuse two
   ranks on one device: then the same comparison runs over gloo and the reason is recorded). Per round, fed_ddp's
   path (``Wire.pack_head/pack_body``, ``CollectiveTransport.exchange``: broadcasts + ``gather_bytes``, the workers
   unpacking the body and packing a delta through the ``Wire``, the server unpacking every uplink, FedAvg) against a
   raw broadcast + broadcast + gather of the same byte counts on the same group; interleaved, medians.
3. DeepSpeed ZeRO-2 / ZeRO-3 (if ``deepspeed`` imports) against the torch engine, each built by
   ``fed_ddp.engines.build_engine`` on a fresh UNet, trained by ``LocalTrainer``: peak memory of the rank and step
   time (one rank: ZeRO cannot shard anything across one rank; its bf16 cast of the model is what changes memory).

Goals (issue 14) are printed next to the results: LocalTrainer >= 0.95x the plain loop, >= 15 images/s at batch 8
on an H100, aggregation within 1.25x of the raw collective. Results go to ``--out`` (default ``$OUT`` when set,
else benchmarks/results/) as ``gpu_<card>.md`` and ``gpu_<card>.json``, rewritten after each part.

    python benchmarks/gpu.py [--out DIR] [--batches 1,4,8] [--steps 5] [--repeats 3] [--workers 2]
                             [--no-compile] [--no-deepspeed] [--no-collectives]
    python benchmarks/gpu.py --smoke     # also the default without CUDA: tiny UNet, fp32, gloo, one step each

``--smoke`` runs the same code paths on the tiny UNet (``fed_ddp.diffusion.tiny``), one step per measure, fp32,
gloo, ``torch.compile`` skipped (recorded as skipped), in well under a minute on CPU; tests/test_gpu_benchmark_smoke.py
runs it.

On the device machine (the GPU image has torch, peft, accelerate, transformers; diffusers, omegaconf and DeepSpeed
with its pydantic and hjson travel as wheels; wandb is not imported here). Here, once, in the repository root::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 omegaconf==2.4.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

(11.6 MB in all, diffusers 6.4 MB. DeepSpeed publishes only an sdist: it is built here into a 2.2 MB pure-Python
wheel with no prebuilt ops, and this benchmark needs none). Then one ``run`` with ``carry: [".whl"]`` and
``timeout_s: 500``, one line::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi --query-gpu=name,memory.total --format=csv; PYTHONUNBUFFERED=1 timeout 470 python3 benchmarks/gpu.py --out $OUT 2>&1 | tee $OUT/gpu_log.txt

Results are saved after every variant, so a run cut short keeps what it measured. Without the DeepSpeed wheel the
script skips part 3 and says so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # fed_ddp and benchmarks.step from this checkout (no install on the device machine)
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.step import interleaved, plain_steps

SD15_UNET = ROOT / "fed_ddp" / "diffusion" / "configs" / "sd15_unet.json"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GOAL_RATIO, GOAL_IMAGES_S, GOAL_AGG = 0.95, 15.0, 1.25  # issue 14
GIB = 2 ** 30


# -- the model and its data --------------------------------------------------------------------------------
def build_denoiser(smoke: bool, device: torch.device):
    """(pipeline, UNet with LoRA r4 on the attention projections, latent shape, text-state shape)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fed_ddp.config import LoraSection
    from fed_ddp.diffusion import tiny
    from fed_ddp.diffusion.families import get_family
    from fed_ddp.diffusion.lora import attach_lora

    torch.manual_seed(0)
    if smoke:
        unet = tiny.build_unet().to(device)
        latent, text = (tiny.LATENT, tiny.RESOLUTION, tiny.RESOLUTION), (tiny.MAX_TOKENS, tiny.HIDDEN)
    else:
        config = json.loads(SD15_UNET.read_text())
        with torch.device(device):  # random init on the card: seconds instead of a minute on the CPU
            unet = UNet2DConditionModel.from_config(config)
        latent = (config["in_channels"], config["sample_size"], config["sample_size"])
        text = (77, config["cross_attention_dim"])
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA
    attach_lora(unet, LoraSection(rank=4, alpha=4.0, targets=TARGETS), seed=0)
    pipe = get_family("sd").tiny_pipeline(denoiser=unet)  # LocalTrainer reads the family and denoiser from it
    return pipe, unet, latent, text


def encoded(latent, text, device, n: int = 64):
    from fed_ddp.client import EncodedSet

    gen = torch.Generator().manual_seed(0)
    return EncodedSet(torch.randn((n, *latent), generator=gen).to(device),
                      {"embeds": torch.randn((n, *text), generator=gen).to(device)})


def run_config(smoke: bool, batch: int, **train):
    """A validated RunConfig for the benchmark (torch engine unless ``train`` says otherwise)."""
    from fed_ddp.config import load_config

    mp = "auto" if smoke else "bf16"  # auto: fp32 on the CPU
    overrides = [f"train.batch_size={batch}", f"train.mixed_precision={mp}", "train.lr=1e-4", "lora.rank=4",
                 "lora.alpha=4", f"lora.targets=[{','.join(TARGETS)}]"]
    return load_config(overrides=overrides + [f"{k}={v}" for k, v in train.items()])


class _Solo:
    """The topology ``build_engine`` needs for one rank that is a whole client (no client group)."""

    groups = None

    def deepspeed_mpu(self):
        import torch.distributed as dist

        from fed_ddp.distributed.topology import ClientMPU

        return ClientMPU(dist.group.WORLD, dist.new_group([dist.get_rank()]))


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 1. LocalTrainer vs the plain loop ---------------------------------------------------------------------
def variant_groups(batches: list[int], smoke: bool, compile_ok: bool) -> list[list[dict]]:
    """Groups of variants, each group on a fresh model: eager at every batch and, at the largest, with checkpointing;
    then ``torch.compile`` (in place) with and without checkpointing; then a bf16 frozen base (what diffusers'
    training scripts do: frozen weights in bf16, LoRA in fp32)."""
    b = max(batches)
    groups = [[(x, False, False, "fp32") for x in batches] + [(b, False, True, "fp32")]]
    if compile_ok:
        groups.append([(b, True, False, "fp32"), (b, True, True, "fp32")])
    if not smoke:
        groups.append([(b, False, False, "bf16")])
    return [[dict(zip(("batch", "compile", "ckpt", "base"), v)) for v in g] for g in groups]


def bench_local(args, device, results, save, group: list[dict], deadline: float) -> list:
    """Part 1 for one group of variants (one compile setting and base dtype) on a fresh model; returns the
    adapter's layout (for part 2). Variants past ``deadline`` (perf_counter) are skipped and noted."""
    from fed_ddp.compression import layout_of
    from fed_ddp.diffusion.lora import get_flat, lora_parameters
    from fed_ddp.diffusion.models import training_scheduler

    pipe, unet, latent, text = build_denoiser(args.smoke, device)
    scheduler = training_scheduler(pipe)
    data = encoded(latent, text, device)
    start = get_flat(unet)
    layout = [(n, list(s)) for n, s in layout_of(unet)]
    results["model"] = {"unet": "tiny (fed_ddp.diffusion.tiny)" if args.smoke else "SD v1.5 (sd15_unet.json)",
                        "unet_parameters": sum(p.numel() for p in unet.parameters()),
                        "lora_parameters": len(start), "latent": list(latent), "text_states": list(text),
                        "precision": "fp32" if args.smoke else "bf16 autocast", "attention": "SDPA (AttnProcessor2_0)"}
    if group[0]["base"] == "bf16":
        lora = {id(p) for p in lora_parameters(unet)}
        for p in unet.parameters():
            if id(p) not in lora:
                p.data = p.data.to(torch.bfloat16)
    if group[0]["compile"]:
        unet.compile()  # in place: LocalTrainer and the plain loop both call the compiled module
    print(f"model: {results['model']}, {'compiled' if group[0]['compile'] else 'eager'}, {group[0]['base']} base",
          flush=True)
    rows = results.setdefault("local_step", [])
    for v in group:
        if time.perf_counter() > deadline:
            results["notes"].append(f"skipped for time (--deadline-s): {v}")
            continue
        rows.append(measure_variant(v, pipe, unet, scheduler, data, start, args, device))
        _free(device)
        save()
    del pipe, unet, data
    _free(device)
    return layout


def measure_variant(v: dict, pipe, unet, scheduler, data, start, args, device) -> dict:
    """LocalTrainer (engine from ``build_engine``) and the plain loop on the same module, interleaved."""
    from fed_ddp.client import LocalTrainer
    from fed_ddp.diffusion.lora import set_flat
    from fed_ddp.engines import build_engine
    from fed_ddp.strategies import RoundPlan

    unet.disable_gradient_checkpointing()
    cfg = run_config(args.smoke, v["batch"], **{"train.gradient_checkpointing": str(v["ckpt"]).lower()})
    engine = build_engine(unet, cfg, _Solo(), device)  # enables checkpointing when asked
    trainer = LocalTrainer(pipe, scheduler, data, cfg.train, seed=0, engine=engine)
    plan = RoundPlan(round=1, local_steps=args.steps, lr=cfg.train.lr)
    tc, amp = cfg.train, torch.bfloat16 if device.type == "cuda" else None
    peaks = {"local": 0.0, "plain": 0.0}

    def measured(name, fn):
        def run():
            _peak_reset(device)
            fn()
            peaks[name] = max(peaks[name], _peak(device) or 0.0)
        return run

    t0 = time.perf_counter()
    times = interleaved(
        {"local": measured("local", lambda: trainer.fit(start, plan)),
         "plain": measured("plain", lambda: plain_steps(unet, scheduler, data.latents, data.embeds, args.steps,
                                                        v["batch"], tc.lr, tc.weight_decay, tc.max_grad_norm, amp))},
        args.repeats, before=lambda _: set_flat(unet, start), sync=_sync(device))
    wall = time.perf_counter() - t0
    ips = {k: args.steps * v["batch"] / statistics.median(t) for k, t in times.items()}
    row = {**v, "local_images_s": ips["local"], "plain_images_s": ips["plain"], "ratio": ips["local"] / ips["plain"],
           "ratios": [p / q for p, q in zip(times["plain"], times["local"])],
           **{f"{k}_peak_gib": peaks[k] if device.type == "cuda" else None for k in peaks},
           "wall_s_incl_warmup": wall}
    mem = f", peak {peaks['local']:.2f} / {peaks['plain']:.2f} GiB" if device.type == "cuda" else ""
    print(f"batch {v['batch']} compile={v['compile']} ckpt={v['ckpt']} base={v['base']}: LocalTrainer "
          f"{ips['local']:8.2f} img/s | plain loop {ips['plain']:8.2f} img/s | ratio {row['ratio']:.3f} "
          f"(goal >= {GOAL_RATIO}){mem} [{wall:.0f} s]", flush=True)
    return row


# -- 2. the federated aggregation vs the raw collective ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_next(lines: list[str], i: int) -> str:
    """Line ``i`` of a log, with the next line when it ends in a colon (NCCL's "Last error:" then the reason)."""
    line = lines[i].strip()
    return f"{line} {lines[i + 1].strip()}" if line.endswith(":") and i + 1 < len(lines) else line


def bench_collectives(args, device, layout, results, save, backends: list[str] | None = None) -> None:
    """Server + workers as processes of this script (``--collective-rank``); NCCL first on a GPU, else gloo."""
    backends = backends or (["nccl", "gloo"] if device.type == "cuda" else ["gloo"])
    out = results["collectives"] = {"workers": args.workers, "attempts": []}
    for backend in backends:
        spec = Path(args.out) / f".collective_{backend}.json"
        result = Path(args.out) / f".collective_{backend}_result.json"
        result.unlink(missing_ok=True)
        spec.write_text(json.dumps({"backend": backend, "layout": layout, "workers": args.workers,
                                    "repeats": args.agg_repeats, "result": str(result)}))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(1 + args.workers), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--collective-rank", str(r), str(spec)],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": "0"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(1 + args.workers)]
        end, late = time.monotonic() + args.collective_timeout, ""
        while any(p.poll() is None for p in procs):  # one rank failing (NCCL: two ranks on one device) ends all
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > end:
                late = "" if time.monotonic() <= end else f"\n(timed out after {args.collective_timeout:g} s)"
                for p in procs:
                    p.kill()
            time.sleep(0.2)
        logs = [p.communicate()[0] + late for p in procs]
        spec.unlink(missing_ok=True)
        if all(p.returncode == 0 for p in procs) and result.exists():
            out.update(json.loads(result.read_text()))
            result.unlink()
            break
        lines = [log.splitlines() for log in logs]
        why = next((_with_next(ls, i) for ls in lines for i in range(len(ls) - 1, -1, -1)
                    if any(w in ls[i] for w in ("Error", "error", "timed out"))), logs[0].strip()[-300:])
        out["attempts"].append({"backend": backend, "failed": why.strip()[:500]})
        print(f"{backend} with {1 + args.workers} ranks on one device failed: {why.strip()[:300]}", flush=True)
    if "ratio" in out:
        print(f"aggregation over {out['backend']} ({out['workers']} workers, {out['num_params']:,} parameters, "
              f"{out['bytes_down_per_worker']:,} B down / {out['bytes_up_per_worker']:,} B up per worker): fed_ddp "
              f"{out['fed_ms']:.3f} ms (exchange {out['exchange_ms']:.3f} ms) vs raw {out['raw_ms']:.3f} ms: ratio "
              f"{out['ratio']:.3f} (goal <= {GOAL_AGG})", flush=True)
    save()


def collective_rank(rank: int, spec_path: str) -> None:
    """One rank of the aggregation benchmark: 0 = server, the others workers (no training: a fixed delta)."""
    import torch.distributed as dist

    from fed_ddp.config import load_config
    from fed_ddp.protocol import HEAD_BYTES, wire_for
    from fed_ddp.strategies import RoundPlan, build_strategy
    from fed_ddp.transport import CollectiveTransport

    spec = json.loads(Path(spec_path).read_text())
    backend, workers, layout = spec["backend"], spec["workers"], [(n, tuple(s)) for n, s in spec["layout"]]
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(backend, **kw)
    cfg = load_config()
    wire = wire_for(cfg, layout, workers)
    transport = CollectiveTransport(server_rank=0, device=device if backend == "nccl" else None,
                                    method=cfg.comm.gather)
    table = [[w] for w in range(workers)]  # one client per worker
    plan = RoundPlan(round=1, local_steps=1, lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(rank)
    global_flat = torch.randn(wire.num_params, generator=gen)
    body_n = wire.body_nbytes(1)
    up_n = wire.up_sizes(table)[0]
    # the raw collective's buffers: the same byte counts, already on the device
    raw_head = torch.zeros(HEAD_BYTES, dtype=torch.uint8, device=device)
    raw_body = torch.zeros(body_n, dtype=torch.uint8, device=device)
    raw_up = torch.zeros(up_n, dtype=torch.uint8, device=device)
    slots = [torch.empty_like(raw_up) for _ in range(1 + workers)] if rank == 0 else None
    sync = _sync(device)
    fed_s, ex_s, raw_s = [], [], []

    def raw():
        dist.broadcast(raw_head, src=0)
        dist.broadcast(raw_body, src=0)
        dist.gather(raw_up, gather_list=slots, dst=0)

    if rank == 0:
        strategy = build_strategy(cfg.fed, cfg.train, layout)
        for rep in range(spec["repeats"] + 1):
            sync()
            t0 = time.perf_counter()
            head, body = wire.pack_head(plan, 1), wire.pack_body(table, strategy.downlink(global_flat))
            ups, stats = transport.exchange(head, body, wire.up_sizes(table))
            updates = [wire.unpack_uplink(m) for w, up in enumerate(ups) for m in wire.split_uplink(up, len(table[w]))]
            strategy.aggregate(1, global_flat, updates)
            t_fed = time.perf_counter() - t0
            transport.stop(wire.pack_head(plan, 0, stop=True))  # the workers leave serve()
            sync()
            t0 = time.perf_counter()
            raw()
            sync()
            t_raw = time.perf_counter() - t0
            if rep:
                fed_s.append(t_fed)
                ex_s.append(stats.seconds)
                raw_s.append(t_raw)
        fed, ex, rw = (statistics.median(x) * 1e3 for x in (fed_s, ex_s, raw_s))
        Path(spec["result"]).write_text(json.dumps({
            "backend": backend, "device": str(device), "num_params": wire.num_params, "repeats": spec["repeats"],
            "bytes_down_per_worker": HEAD_BYTES + body_n, "bytes_up_per_worker": up_n, "fed_ms": fed,
            "exchange_ms": ex, "raw_ms": rw, "ratio": fed / rw, "exchange_ratio": ex / rw,
            "what": "fed_ddp = Wire.pack_head/pack_body + CollectiveTransport.exchange (workers: Wire.unpack_body, "
                    "Wire.pack_uplink) + Wire.unpack_uplink x workers + FedAvg; raw = broadcast(head) + "
                    "broadcast(body) + gather(uplink) of the same byte counts, buffers already on the device"}))
    else:
        delta = torch.randn(wire.num_params, generator=gen) * 1e-3
        metrics = {"train_loss": 0.1, "train_seconds": 1.0, "client_seconds": 1.0}

        def handler(head, body):
            h = wire.unpack_head(head)
            tab, _flat = wire.unpack_body(body, h.slots)
            msgs = [wire.pack_uplink(c, delta, None, 100, metrics) for c in tab[rank - 1]]
            return torch.cat(msgs), wire.up_sizes(tab)

        def body_nbytes(head):
            h = wire.unpack_head(head)
            return None if h.stop else wire.body_nbytes(h.slots)

        for _ in range(spec["repeats"] + 1):
            transport.serve(HEAD_BYTES, body_nbytes, handler)
            raw()
    dist.barrier()
    dist.destroy_process_group()


# -- 3. DeepSpeed ZeRO-2/3 vs the torch engine -------------------------------------------------------------
def bench_engines(args, device, results, save) -> None:
    import torch.distributed as dist

    from fed_ddp.client import LocalTrainer
    from fed_ddp.diffusion.models import training_scheduler
    from fed_ddp.engines import build_engine
    from fed_ddp.strategies import RoundPlan

    rows = results["engines"] = []
    try:
        os.environ.setdefault("DS_ACCELERATOR", device.type)
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: skip this part, say why
        results["notes"].append(f"DeepSpeed part skipped: deepspeed does not import ({type(e).__name__}: {e})")
        print(results["notes"][-1], flush=True)
        save()
        return
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            **({"device_id": device} if device.type == "cuda" else {}))
    batch = max(args.batches)
    base = None
    for name, train in [("torch", {"train.engine": "torch"}),
                        ("zero2", {"train.engine": "deepspeed", "deepspeed.zero_stage": 2}),
                        ("zero3", {"train.engine": "deepspeed", "deepspeed.zero_stage": 3})]:
        _free(device)
        _peak_reset(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        pipe, unet, latent, text = build_denoiser(args.smoke, device)
        data = encoded(latent, text, device)
        cfg = run_config(args.smoke, batch, **train)
        engine = build_engine(unet, cfg, _Solo(), device)
        held = (torch.cuda.memory_allocated(device) - before) / GIB if device.type == "cuda" else None
        trainer = LocalTrainer(pipe, training_scheduler(pipe), data, cfg.train, seed=0, engine=engine)
        start = engine.read_adapter()  # ZeRO-3: gathered from the partitions
        trainer.fit(start, RoundPlan(round=1, local_steps=1, lr=cfg.train.lr))  # warm-up (ZeRO-3 traces here)
        _peak_reset(device)
        _sync(device)()
        t0 = time.perf_counter()
        trainer.fit(start, RoundPlan(round=1, local_steps=args.steps, lr=cfg.train.lr))
        _sync(device)()
        step = (time.perf_counter() - t0) / args.steps
        row = {"engine": name, "batch": batch, "step_s": step, "images_s": batch / step,
               "held_after_init_gib": held, "peak_gib": None if held is None else _peak(device) - before / GIB}
        base = base or row
        row["step_vs_torch"] = step / base["step_s"]
        rows.append(row)
        mem = f", held {held:.2f} GiB, peak {row['peak_gib']:.2f} GiB" if device.type == "cuda" else ""
        print(f"engine {name}: {step * 1e3:.1f} ms/step at batch {batch} ({row['step_vs_torch']:.2f}x torch){mem}",
              flush=True)
        del trainer, engine, pipe, unet, data
        save()
    results["notes"].append("engines: one rank, so ZeRO shards nothing; DeepSpeed trains the model cast to bf16 "
                            "(its bf16 config), the torch engine an fp32 base under bf16 autocast")
    dist.destroy_process_group()
    save()


# -- results ------------------------------------------------------------------------------------------------
def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write(out_dir: Path, results: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", results["card"]).strip("_")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu_{slug}.json").write_text(json.dumps(results, indent=1))
    path = out_dir / f"gpu_{slug}.md"
    path.write_text(markdown(results))
    return path


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    lines = [f"# GPU benchmark (benchmarks/gpu.py){' - CPU smoke run' if r['smoke'] else ''}", "",
             f"- card: {r['card']}", f"- command: `{r['command']}`", f"- date: {r['date']}",
             f"- software: {r['software']}", f"- model: {r.get('model')}", ""]
    if r.get("local_step"):
        lines += ["## LocalTrainer vs the plain diffusers + peft loop (images/s, median of interleaved repeats)", "",
                  ("| batch | compile | grad. ckpt | frozen base | LocalTrainer img/s | plain img/s | ratio (goal >= 0.95) "
                   "| per-repeat ratios | peak GiB LocalTrainer / plain |"), "| --- " * 9 + "|"]
        for x in r["local_step"]:
            lines.append(f"| {x['batch']} | {x['compile']} | {x['ckpt']} | {x['base']} | {x['local_images_s']:.2f} | "
                         f"{x['plain_images_s']:.2f} | {x['ratio']:.3f} | {min(x['ratios']):.3f}..{max(x['ratios']):.3f}"
                         f" | {_f(x['local_peak_gib'])} / {_f(x['plain_peak_gib'])} |")
        lines.append("")
    c = r.get("collectives") or {}
    if "ratio" in c:
        lines += ["## Aggregation vs the raw collective", "",
                  (f"{c['backend']}, 1 server + {c['workers']} workers, {c['num_params']:,} parameters, "
                   f"{c['bytes_down_per_worker']:,} B down and {c['bytes_up_per_worker']:,} B up per worker, median of "
                   f"{c['repeats']}: fed_ddp {c['fed_ms']:.3f} ms (of which the exchange {c['exchange_ms']:.3f} ms), "
                   f"raw {c['raw_ms']:.3f} ms, **ratio {c['ratio']:.3f}** (exchange alone {c['exchange_ratio']:.3f}; "
                   f"goal <= {GOAL_AGG}). {c['what']}."), ""]
    for a in c.get("attempts", []):
        lines += [f"- {a['backend']} failed: `{a['failed']}`"]
    if r.get("engines"):
        lines += ["", "## Engines: torch vs DeepSpeed ZeRO-2/3 (one rank)", "",
                  "| engine | batch | step (ms) | images/s | vs torch | held after build (GiB) | peak (GiB) |",
                  "| --- " * 7 + "|"]
        for x in r["engines"]:
            lines.append(f"| {x['engine']} | {x['batch']} | {x['step_s'] * 1e3:.1f} | {x['images_s']:.2f} | "
                         f"{x['step_vs_torch']:.2f}x | {_f(x['held_after_init_gib'])} | {_f(x['peak_gib'])} |")
        lines.append("")
    lines += ["## Goals", ""] + [f"- {g}" for g in r.get("goals", [])] + ["", "## Notes", ""]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def goals(r: dict) -> list[str]:
    out = []
    rows = r.get("local_step") or []
    if rows:
        worst = min(rows, key=lambda x: x["ratio"])
        out.append(f"LocalTrainer / plain loop >= {GOAL_RATIO}: {'met' if worst['ratio'] >= GOAL_RATIO else 'NOT met'}"
                   f" (lowest {worst['ratio']:.3f}, batch {worst['batch']}, compile={worst['compile']}, "
                   f"ckpt={worst['ckpt']}, base={worst['base']})")
        b8 = [x for x in rows if x["batch"] == 8]
        if b8 and not r["smoke"]:
            best = max(b8, key=lambda x: x["local_images_s"])
            out.append(f">= {GOAL_IMAGES_S} images/s at batch 8 ({r['card']}; the goal is for an H100): "
                       f"{'met' if best['local_images_s'] >= GOAL_IMAGES_S else 'NOT met'} (best "
                       f"{best['local_images_s']:.2f}: compile={best['compile']}, ckpt={best['ckpt']}, "
                       f"base={best['base']})")
    c = r.get("collectives") or {}
    if "ratio" in c:
        out.append(f"aggregation <= {GOAL_AGG}x the raw collective ({c['backend']}): "
                   f"{'met' if c['ratio'] <= GOAL_AGG else 'NOT met'} ({c['ratio']:.3f})")
    if r["smoke"]:  # one step of a tiny model: the code paths ran, nothing was measured
        out = [f"(smoke run, not a measurement) {g}" for g in out]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny UNet, fp32, gloo, one step (default without CUDA)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per measure (5; smoke: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats after a warm-up (3; smoke: 1)")
    ap.add_argument("--workers", type=int, default=2, help="worker ranks of the aggregation benchmark")
    ap.add_argument("--agg-repeats", type=int, default=None, help="aggregation rounds measured (20; smoke: 2)")
    ap.add_argument("--collective-timeout", type=float, default=90.0)
    ap.add_argument("--deadline-s", type=float, default=400.0, help="start no part or variant after this many seconds")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    ap.add_argument("--no-collectives", dest="collectives", action="store_false")
    ap.add_argument("--collective-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.collective_rank is not None:
        collective_rank(args.collective_rank, args.spec)
        return

    from fed_ddp.diffusion.models import quiet_libraries

    quiet_libraries()
    cuda = torch.cuda.is_available()
    args.smoke = args.smoke or not cuda
    device = torch.device("cuda", 0) if cuda and not args.smoke else torch.device("cpu")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps = args.steps or (1 if args.smoke else 5)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.agg_repeats = args.agg_repeats or (2 if args.smoke else 20)
    args.compile = args.compile and not args.smoke
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run: small ops, often a shared machine; threads only contend
    if cuda and not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import diffusers
    import peft

    results = {"card": card_name(device), "smoke": args.smoke, "command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "software": f"Python {platform.python_version()}, torch {torch.__version__}, diffusers "
                           f"{diffusers.__version__}, peft {peft.__version__}",
               "settings": {k: v for k, v in vars(args).items() if k not in ("collective_rank", "spec")},
               "notes": [], "goals": []}
    out_dir = Path(args.out)
    t_start = time.perf_counter()

    def save():
        results["goals"] = goals(results)
        results["seconds"] = time.perf_counter() - t_start
        write(out_dir, results)

    print(f"{results['card']}: {'smoke run (tiny UNet, fp32)' if args.smoke else 'SD v1.5 UNet, bf16'}", flush=True)
    parts = results["part_seconds"] = {}
    deadline = t_start + args.deadline_s
    groups = variant_groups(args.batches, args.smoke, args.compile)

    def part(name, fn):
        if time.perf_counter() > deadline:
            results["notes"].append(f"{name} skipped for time (--deadline-s {args.deadline_s:g})")
            return None
        t0 = time.perf_counter()
        out = fn()
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
        return out

    # the eager variants, the collectives and the engines first; compilation (the longest, least certain) last
    layout = part("local_step", lambda: bench_local(args, device, results, save, groups[0], deadline))
    if args.collectives and layout:
        part("collectives", lambda: bench_collectives(args, device, layout, results, save))
    if args.deepspeed:
        part("engines", lambda: bench_engines(args, device, results, save))
    for g in groups[1:]:
        part("local_step", lambda g=g: bench_local(args, device, results, save, g, deadline))
    if not args.compile:
        results["notes"].append("torch.compile skipped" + (" (CPU smoke)" if args.smoke else " (--no-compile)"))
    save()
    print("\n".join(["goals:", *results["goals"]]), flush=True)
    print(f"results: {write(out_dir, results)} ({time.perf_counter() - t_start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
