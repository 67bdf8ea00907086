"""Codec benchmark: the quickstart once per uplink codec chain, side by side, in one table.

    .venv/bin/python benchmarks/codecs.py [--out runs/bench_codecs] [--force] [key=value ...]

Every run is the real thing (``fed-ddp run configs/quickstart.yaml``: 1 server + 4 client ranks over
gloo, 8 rounds), differing only in ``comm.uplink``; the downlink stays dense fp32 so the table isolates
the uplink. ``comm.min_numel=0``: the tiny base's LoRA tensors are small (most under 1,024 values), and
the default rule would send them untouched. Bytes are what the collectives moved (``metrics.jsonl``);
generation accuracy is the reference classifier's share of correctly generated digits (50 images per
digit) on the client concepts 5-9; validation loss is on held-out client-concept images. Finished runs
are reused (their summary.json) unless ``--force``. Prints a markdown table and writes it to
``<out>/codecs.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAINS = {  # name -> comm.* overrides
    "fp32 (dense)": ["comm.uplink=[]"],
    "fp16": ["comm.uplink=[fp16]"],
    "int8": ["comm.uplink=[int8]"],
    "int4": ["comm.uplink=[int4]"],
    "topk 10% + EF": ["comm.uplink=[topk]", "comm.topk_fraction=0.1"],
    "topk 10% + int8 + EF": ["comm.uplink=[topk,int8]", "comm.topk_fraction=0.1"],
    "topk 3% + int8 + EF": ["comm.uplink=[topk,int8]", "comm.topk_fraction=0.03"],
    "lowrank r2 + EF": ["comm.uplink=[lowrank]", "comm.lowrank_rank=2"],
    # candidates for >= 32x
    "topk 5% + int4 + EF": ["comm.uplink=[topk,int4]", "comm.topk_fraction=0.05"],
    "randomk 10% + int8 (block 256) + EF": ["comm.uplink=[randomk,int8]", "comm.topk_fraction=0.1",
                                            "comm.block_size=256"],
    "blocktopk 15% (blocks of 8) + int4 + EF": ["comm.uplink=[blocktopk,int4]", "comm.topk_fraction=0.15"],
    "blocktopk 10% (blocks of 8) + int4 + EF": ["comm.uplink=[blocktopk,int4]", "comm.topk_fraction=0.1"],
    "segtopk 6 of 64 + int4 + EF": ["comm.uplink=[segtopk,int4]", "comm.topk_fraction=0.09", "comm.topk_block=64"],
    "segtopk 13 of 128 + int4 (block 128) + EF": ["comm.uplink=[segtopk,int4]", "comm.topk_fraction=0.1",
                                                  "comm.topk_block=128", "comm.block_size=128"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def run(name: str, overrides: list[str], out: Path, extra: list[str], force: bool) -> dict:
    summary = out / slug(name) / "summary.json"
    if force or not summary.is_file():
        cmd = [str(ROOT / ".venv" / "bin" / "fed-ddp") if (ROOT / ".venv" / "bin" / "fed-ddp").exists() else "fed-ddp",
               "run", str(ROOT / "configs" / "quickstart.yaml"), f"run.output_dir={out}", f"run.name={slug(name)}",
               "comm.min_numel=0", "tracking.progress=false", "run.overwrite=true", "fed.strategy=fedavg",  # the measured
               *overrides, *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    from fed_ddp.results import read_summary  # the installed package (pip install -e .)

    return read_summary(summary.parent).to_json()  # typed and checked (fed_ddp.results), read as its JSON


def table(results: dict[str, dict]) -> str:
    ref = results.get("fp32 (dense)")
    lines = [("| uplink chain | uplink bytes / client / round | vs fp32 LoRA | gen. accuracy, client digits "
              "| vs fp32 (points) | gen. accuracy, base digits | val loss |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in results.items():
        up = s["comm"]["air"]["up"] if "air" in s["comm"] else s["comm"]["up"]  # runs from before populations: up
        per = up.get("total", up.get("moved")) / up.get("messages", s["rounds"] * s["num_clients"])
        acc, base, loss = s["final"]["gen_acc_clients"], s["final"].get("gen_acc_base"), s["final"]["val_loss"]
        diff = f"{round(100 * (acc - ref['final']['gen_acc_clients']), 1) + 0.0:+.1f}" if ref else "n/a"
        lines.append(f"| {name} | {per:,.0f} | {up['vs_dense_lora']:.2f}x | {acc:.1%} | {diff} "
                     f"| {base:.1%} | {loss:.4f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_codecs"))
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--only", nargs="*", help="chain names to run (default: all)")
    p.add_argument("overrides", nargs="*", help="extra key=value for every run")
    a = p.parse_args()
    out = Path(a.out).resolve()
    results = {n: run(n, o, out, a.overrides, a.force) for n, o in CHAINS.items() if not a.only or n in a.only}
    text = table(results)
    first = next(iter(results.values()))
    note = (f"\nquickstart: {first['num_clients']} clients x {first['rounds']} rounds, "
            f"{first['lora_parameters']:,} LoRA parameters ({4 * first['lora_parameters']:,} B as fp32); "
            f"downlink dense fp32; {first['images_per_prompt']} images per digit for generation accuracy.")
    print(text + note)
    (out / "codecs.md").write_text(text + "\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
