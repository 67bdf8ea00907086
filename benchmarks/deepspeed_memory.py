"""Memory per client rank under each local-training engine: torch vs DeepSpeed ZeRO-2/3 (+ CPU offload).

    .venv/bin/python benchmarks/deepspeed_memory.py [--work runs/bench_deepspeed_memory]
        [--out benchmarks/results/deepspeed_memory.md] [--blocks 128,256,512] [--rounds 2] [--steps 2]
        [--only NAME,...] [key=value ...]

About 15-20 minutes on 2 CPU cores (8 launches; most of it start-up, the server's evaluations and
ZeRO-3's first, tracing step).

A random-weight Stable-Diffusion-layout pipeline with a *larger* UNet than the tiny base (block_out_channels
128/256/512, 2 layers per block, cross-attention 32 wide like the tiny CLIP text encoder: about 70 M
parameters, 268 MiB frozen in fp32) is written once under --work. Then, one after the other, each
variant runs a real 1-client federation (1 server + R client ranks, gloo, ``DS_ACCELERATOR=cpu``)
of configs/tiny_test.yaml + the configs/deepspeed/ preset, through torchrun and
benchmarks/memory_rank.py (``fed_ddp.train.main`` plus observers, see there):

    torch R=2 | ZeRO-2 | ZeRO-3 | ZeRO-2 + optimizer offload | ZeRO-3 + param & optimizer offload (R=2)
    ZeRO-3 with R=1 and R=4 ranks per client (the 1/R trend)
    ZeRO-3 R=2 releasing every parameter right after use (stage3_max_reuse_distance=0, no prefetch):
    DeepSpeed's default reuse distance (1e9 values) keeps a model under 1e9 parameters gathered from
    its forward to its backward

Per variant the table reports, over the client ranks: the peak RSS while training (max over ranks),
the whole-process peak RSS (loading included), the frozen-base parameter bytes a rank holds after a
step and at most at the end of a forward, and the local step time (the last round's
``LocalTrainer.fit`` seconds / optimizer steps; round 1 carries warm-up). The markdown table is printed
and written to --out with the command, date and machine. Extra ``key=value`` go to every run.
Ranks run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): large buffers are then mmap'd and given
back when freed, so RSS follows live memory instead of glibc's retained heap.
On a CUDA machine drop ``train.device=cpu`` from BASE_ARGS and DS_ACCELERATOR; memory_rank.py also records
``torch.cuda.max_memory_allocated`` there (not exercised on the CPU machine this was written on).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = ROOT / "benchmarks" / "memory_rank.py"
# name -> (preset under configs/deepspeed or None for the torch engine, ranks per client, extra overrides)
RELEASE = ["deepspeed.config.zero_optimization.stage3_max_reuse_distance=0",
           "deepspeed.config.zero_optimization.stage3_prefetch_bucket_size=0"]
VARIANTS = {
    "torch": (None, 2, []),
    "zero2": ("zero2.yaml", 2, []),
    "zero3": ("zero3.yaml", 2, []),
    "zero2_offload": ("zero2_offload.yaml", 2, []),
    "zero3_offload": ("zero3_offload.yaml", 2, []),
    "zero3_r1": ("zero3.yaml", 1, []),
    "zero3_r4": ("zero3.yaml", 4, []),
    "zero3_release": ("zero3.yaml", 2, RELEASE),
}
LABELS = {
    "torch": "torch (AdamW, all-reduce)",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "zero2_offload": "ZeRO-2 + optimizer offload",
    "zero3_offload": "ZeRO-3 + param & optimizer offload",
    "zero3_r1": "ZeRO-3",
    "zero3_r4": "ZeRO-3",
    "zero3_release": "ZeRO-3, release after use (max_reuse_distance=0, no prefetch)",
}
BASE_ARGS = ["fed.num_clients=1", "train.batch_size=4", "train.num_threads=1", "train.device=cpu",
             "train.lr=0.001", "eval.every=1000", "eval.images_per_prompt=1", "eval.inference_steps=1",
             "eval.sample_seeds=[0]", "data.val_fraction=0.02", "tracking.progress=false"]
MIB = 2 ** 20


def build_base(path: Path, blocks: tuple[int, ...], layers: int) -> dict:
    """A StableDiffusionPipeline directory: the tiny VAE/text encoder/tokenizer and a larger random UNet."""
    info_file = path / "bench_base.json"
    want = {"block_out_channels": list(blocks), "layers_per_block": layers}
    if info_file.exists() and json.loads(info_file.read_text())["arch"] == want:
        return json.loads(info_file.read_text())
    import torch
    from diffusers import UNet2DConditionModel

    from fed_ddp.diffusion import tiny
    from fed_ddp.diffusion.models import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    n = len(blocks)
    unet = UNet2DConditionModel(
        sample_size=tiny.RESOLUTION, in_channels=tiny.LATENT, out_channels=tiny.LATENT, layers_per_block=layers,
        block_out_channels=tuple(blocks), down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=tiny.HIDDEN, attention_head_dim=8, norm_num_groups=32)
    tiny.build_pipeline(unet=unet).save_pretrained(path)
    numel = sum(p.numel() for p in unet.parameters())
    info = {"arch": want, "unet_parameters": numel, "unet_fp32_bytes": 4 * numel,
            "share_in_tensors_over_1e5": sum(p.numel() for p in unet.parameters() if p.numel() > 1e5) / numel}
    info_file.write_text(json.dumps(info, indent=1))
    return info


def run_variant(name: str, base: Path, work: Path, rounds: int, steps: int, extra: list[str]) -> dict:
    preset, ranks, own = VARIANTS[name]
    out = work / name
    mem = out / "mem"
    for f in mem.glob("rank*.json") if mem.exists() else []:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    files = [str(ROOT / "configs" / "tiny_test.yaml")] + ([str(ROOT / "configs" / "deepspeed" / preset)] if preset else [])
    args = files + [f"model.pretrained={base}", f"run.output_dir={work}", f"run.name={name}",
                    f"fed.ranks_per_client={ranks}", f"fed.rounds={rounds}", f"fed.local_steps={steps}",
                    "run.overwrite=true", *BASE_ARGS, *own, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(1 + ranks),
           str(RANK_SCRIPT), *args]
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "FED_DDP_MEM_DIR": str(mem), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    with open(out / "launch.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    ranks_json = [json.loads((mem / f"rank{r}.json").read_text()) for r in range(1, 1 + ranks)
                  if (mem / f"rank{r}.json").exists()]
    res = {"name": name, "ranks": ranks, "rc": rc, "wall_s": wall, "clients": ranks_json,
           "command": shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(1 + ranks),
                                  str(RANK_SCRIPT.relative_to(ROOT)), *args])}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def summarize(res: dict) -> dict | None:
    cl = res["clients"]
    if res["rc"] != 0 or len(cl) != res["ranks"]:
        return None
    last = [c["rounds"][-1] for c in cl]

    def held(d):
        return sum(d.values())

    return {
        "train_peak_mib": max(c["vm_hwm_train_kib"] for c in cl) / 1024,
        "process_peak_mib": max(c["ru_maxrss_kib"] for c in cl) / 1024,
        "before_train_mib": max(c["rss_before_train_kib"] for c in cl) / 1024,
        "base_full_mib": cl[0]["rounds"][-1]["params_after_round"]["base_full"] / MIB,
        "base_after_step_mib": max(held(r["params_after_round"]["base_held"]) for r in last) / MIB,
        "base_fwd_max_mib": max(held(c["fwd_max"]) for c in cl) / MIB,
        "base_after_build_mib": max(held(c["engine"]["params_after_build"]["base_held"]) for c in cl) / MIB,
        "step_s": max(r["seconds"] / r["steps"] for r in last),
        "first_round_step_s": max(c["rounds"][0]["seconds"] / c["rounds"][0]["steps"] for c in cl),
        "optimizer": f"{cl[0]['engine']['optimizer']} / {cl[0]['engine']['inner_optimizer']}",
        "partitioned": cl[0]["engine"]["params_after_build"]["partitioned"],
        "persistent": cl[0]["rounds"][-1]["params_after_round"]["persistent"],
        "hwm_reset": all(c.get("hwm_reset") for c in cl),
    }


def table(results: list[dict]) -> str:
    rows = {r["name"]: summarize(r) for r in results}
    ref = rows.get("torch")
    head = ("| engine | ranks/client | peak RSS per client rank, training (MiB) | peak RSS, whole process (MiB) "
            "| frozen base held per rank after a step (MiB) | ... at most, end of forward (MiB) | step time (s) "
            "| RSS vs torch | step time vs torch | optimizer (outer / inner) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        s = rows[r["name"]]
        label = LABELS[r["name"]]
        if s is None:
            lines.append(f"| {label} | {r['ranks']} | failed (exit {r['rc']}, see {r['name']}/launch.log) "
                         "| | | | | | | |")
            continue
        full = s["base_full_mib"]
        ratio = f"{s['train_peak_mib'] / ref['train_peak_mib']:.2f}x" if ref else "-"
        tratio = f"{s['step_s'] / ref['step_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {label} | {r['ranks']} | {s['train_peak_mib']:.0f} | {s['process_peak_mib']:.0f} "
            f"| {s['base_after_step_mib']:.1f} ({s['base_after_step_mib'] / full:.0%}) "
            f"| {s['base_fwd_max_mib']:.1f} ({s['base_fwd_max_mib'] / full:.0%}) | {s['step_s']:.2f} "
            f"| {ratio} | {tratio} | {s['optimizer']} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) / 2 ** 20
    except (OSError, StopIteration):
        mem = float("nan")
    import deepspeed
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_deepspeed_memory"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deepspeed_memory.md"))
    ap.add_argument("--blocks", default="128,256,512", help="UNet block_out_channels")
    ap.add_argument("--layers", type=int, default=2, help="UNet layers_per_block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="local optimizer steps per round")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all): " + ",".join(VARIANTS))
    args, extra = ap.parse_known_args(argv)
    if any("=" not in e for e in extra):
        ap.error(f"unrecognized arguments: {[e for e in extra if '=' not in e]}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(args.work).resolve()
    blocks = tuple(int(b) for b in args.blocks.split(","))
    info = build_base(work / "base", blocks, args.layers)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    results = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        res = run_variant(name, work / "base", work, args.rounds, args.steps, extra)
        print(f"[bench] {name}: exit {res['rc']} in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
        results.append(res)
    tab = table(results)
    cmd = shlex.join(["python", "benchmarks/deepspeed_memory.py", *(argv if argv is not None else sys.argv[1:])])
    model = (f"random-weight SD-layout pipeline, UNet block_out_channels {list(blocks)}, {args.layers} layers per "
             f"block: {info['unet_parameters'] / 1e6:.1f} M parameters = {info['unet_fp32_bytes'] / MIB:.0f} MiB fp32 "
             "frozen base; LoRA rank 4 on to_q/to_k/to_v/to_out.0")
    run = (f"configs/tiny_test.yaml + configs/deepspeed/<preset>.yaml, 1 client x R ranks + 1 server, gloo, fp32, "
           f"micro-batch 4 per rank, {args.rounds} rounds x {args.steps} local steps; step time = last round")
    notes = ("Peak RSS while training: the kernel's peak counter is reset just before the first local step "
             "(after `malloc_trim`), so loading the pipeline does not count; it includes the process's own "
             "Python/torch/diffusers/DeepSpeed (~0.5 GiB) and, for the torch engine and ZeRO-2, the frozen "
             "weights, which the first forward pages in from the safetensors file. Frozen base held: the UNet's "
             "non-LoRA parameter bytes present on the rank (ZeRO-3: its own shard plus any full tensor still "
             "gathered), in MiB and as a share of the full base. Timings: shared CPU cores, several ranks per "
             "core; compare them loosely.")
    doc = "\n".join(["# DeepSpeed memory per client rank (CPU)", "", f"- command: `{cmd}`",
                     f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
                     f"- machine: {machine()}", f"- model: {model}", f"- run: {run}", "", tab, "", notes, ""])
    print(doc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(doc)
    return 0 if all(summarize(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
