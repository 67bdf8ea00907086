"""``fed-ddp plan ... --wireless``: the simulated cell's view of a configuration at real model size, before
anything runs: per round, for full fine-tuning and for LoRA with and without codecs, the bytes each client
sends, its compute time per device class (FLOPs counted on the meta-device UNet) and, over a seeded cell,
the spread of air time, round time and energy. Everything but the bytes and FLOPs is simulated."""

from __future__ import annotations

import numpy as np

from fed_ddp.wireless.cell import Cell
from fed_ddp.wireless.sim import simulate

REFERENCE_DEVICES = 1000  # the cell the spreads are drawn over (placement, classes and fading: wireless.seed)
REFERENCE_ROUNDS = 20


def variants(cfg) -> list[tuple[str, str, list[str]]]:
    """(label, train.method, uplink codecs): the paper's comparison."""
    r = cfg.lora.rank
    return [("full UNet (fp32)", "full", []), (f"LoRA r{r} (fp32)", "lora", []),
            (f"LoRA r{r} + int8", "lora", ["int8"]), (f"LoRA r{r} + segtopk + int4", "lora", ["segtopk", "int4"])]


def wireless_rows(cfg, unet_config: dict | None, latent_shape, embed_shape) -> list[dict]:
    """One row per variant: bytes, FLOPs, and per device class the median compute time; over the reference
    cell, median and 90th percentile of upload and round time and the median energy; the share of client
    rounds past ``wireless.deadline_s``."""
    from dataclasses import replace

    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.meta import meta_unet
    from fed_ddp.protocol import UP_TAIL_BYTES, Wire, plan_nbytes
    from fed_ddp.strategies import lookup
    from fed_ddp.wireless.flops import unet_step_flops

    w, f = cfg.wireless, cfg.fed
    seed = cfg.run.seed if w.seed is None else w.seed
    cell = Cell.build(w, max(REFERENCE_DEVICES, f.num_clients), seed)
    m = max(1, round(f.expected_round_size))
    rng = np.random.default_rng([seed, 99])
    picks = [np.sort(rng.choice(len(cell.distance_m), size=min(m, len(cell.distance_m)), replace=False))
             for _ in range(REFERENCE_ROUNDS)]
    flops: dict[str, int] = {}
    lora_layout = None
    rows = []
    plan_values = lookup(cfg.fed.strategy).plan_values  # sent down with every plan (plan_nbytes)
    for label, method, uplink in variants(cfg):
        c = replace(cfg, train=replace(cfg.train, method=method))
        if method not in flops:
            flops[method] = unet_step_flops(c, unet_config, latent_shape, embed_shape)
        if method == "full":  # dense fp32: 4 bytes per weight, no codec (a chain over 10^9 values is not built)
            params = sum(p.numel() for p in meta_unet(unet_config).parameters())
            up, down = 4 * params + UP_TAIL_BYTES, 4 * params + plan_nbytes(plan_values)
        else:
            if lora_layout is None:
                from fed_ddp.compression import layout_of

                model = meta_unet(unet_config)
                prepare_trainable(model, c)
                lora_layout = layout_of(model)
            wire = Wire(replace(cfg.comm, uplink=uplink, downlink=[]), lora_layout, plan_values=plan_values)
            params, up, down = wire.num_params, wire.up_nbytes, wire.down_bytes.total
        per_round = flops[method] * f.local_steps
        sims = [simulate(cell, w, r + 1, list(ids), 8 * up, 8 * down, per_round) for r, ids in enumerate(picks)]
        cls = np.concatenate([cell.device_class[s.clients] for s in sims])
        upload = np.concatenate([s.upload_s for s in sims])
        total = np.concatenate([s.total_s for s in sims])
        energy = np.concatenate([s.energy_j for s in sims])
        row = {"variant": label, "method": method, "uplink": uplink, "parameters": int(params), "up_bytes": int(up),
               "down_bytes": int(down), "step_flops": flops[method], "round_flops": per_round,
               "download_s": float(np.median([s.download_s for s in sims])),
               "upload_s": {"median": float(np.median(upload)), "p90": float(np.percentile(upload, 90))},
               "round_s": {"median": float(np.median(total)), "p90": float(np.percentile(total, 90))},
               "energy_j": {"median": float(np.median(energy))},
               "per_class": {}}
        for k, name in enumerate(cell.classes):
            mine = cls == k
            if mine.any():
                row["per_class"][name] = {"compute_s": per_round / (w.devices[name]["tflops"] * 1e12),
                                          "round_s_median": float(np.median(total[mine])),
                                          "energy_j_median": float(np.median(energy[mine]))}
        if w.deadline_s is not None:
            row["past_deadline"] = float(np.mean(total > w.deadline_s))
        rows.append(row)
    return rows


def _t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s" if s >= 0.01 else f"{s * 1e3:.2g} ms"


def format_rows(cfg, rows: list[dict]) -> str:
    w, f = cfg.wireless, cfg.fed
    m = max(1, round(f.expected_round_size))
    classes = list(rows[0]["per_class"])
    lines = [
        "",
        (f"wireless (simulated; wireless.*): {max(f.num_clients, REFERENCE_DEVICES)}"
         f" devices in a {w.radius_m:g} m cell, {m} per round sharing B = {w.bandwidth_hz / 1e6:g} MHz, p = "
         f"{w.tx_power_dbm:g} dBm, base station {w.bs_power_dbm:g} dBm, {REFERENCE_ROUNDS} rounds of fading; "
         f"{f.local_steps} local steps per round; compute = FLOPs counted on the meta UNet / sustained FLOP/s of "
         + ", ".join(f"{k} {w.devices[k]['tflops']:g} TFLOP/s" for k in classes)),
        (f"  {'variant':28s}{'up / client':>14s}{'FLOP / round':>14s}"
         + "".join(f"{'compute ' + k:>18s}" for k in classes)
         + f"{'upload med/p90':>22s}{'round med/p90':>22s}{'energy med':>12s}"
         + (f"{'rounds > ' + format(w.deadline_s, 'g') + ' s':>18s}" if w.deadline_s is not None else "")),
    ]
    for r in rows:
        lines.append(
            f"  {r['variant']:28s}{_bytes(r['up_bytes']):>14s}{r['round_flops']:>14.3g}"
            + "".join(f"{_t(r['per_class'][k]['compute_s']):>18s}" for k in classes)
            + f"{_t(r['upload_s']['median']) + ' / ' + _t(r['upload_s']['p90']):>22s}"
            + f"{_t(r['round_s']['median']) + ' / ' + _t(r['round_s']['p90']):>22s}"
            + f"{r['energy_j']['median']:>10.3g} J"
            + (f"{r['past_deadline']:>18.0%}" if "past_deadline" in r else ""))
    full, lora = rows[0], rows[1]
    lines.append(f"  LoRA sends {full['up_bytes'] / lora['up_bytes']:,.0f}x fewer bytes than the full UNet; the "
                 f"90th-percentile client round is {full['round_s']['p90'] / lora['round_s']['p90']:,.1f}x shorter; a "
                 f"LoRA step costs {lora['step_flops'] / full['step_flops']:.0%} of a full step's FLOPs (no weight "
                 "gradients of the frozen base); 'rounds > deadline': share of client rounds past it")
    return "\n".join(lines)


def _bytes(b: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def latent_shapes(cfg, unet_config: dict | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent shape, text-state shape) of one training example: the UNet's sample size and channels; 77 CLIP
    tokens for a real model, the tiny tokenizer's length for the built-in base. With imagefolder data the
    latents are ``data.resolution`` / 8 (Stable Diffusion's VAE), else the UNet's ``sample_size``."""
    if unet_config is None:
        from fed_ddp.diffusion import tiny

        return (tiny.LATENT, tiny.RESOLUTION, tiny.RESOLUTION), (tiny.MAX_TOKENS, tiny.HIDDEN)
    size = unet_config.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if cfg.data.source == "imagefolder":  # the images' size through a Stable Diffusion VAE (8x downsampling)
        size = max(1, cfg.data.resolution // 8)
    cross = unet_config.get("cross_attention_dim", 768)
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return (unet_config.get("in_channels", 4), size, size), (77, cross)


def plan_lines(cfg, unet_config: dict | None) -> list[str]:
    latent, embed = latent_shapes(cfg, unet_config)
    return format_rows(cfg, wireless_rows(cfg, unet_config, latent, embed)).splitlines() + [
        (f"  (one example: latents {latent}, text states {embed}; a client's batch {cfg.train.batch_size} x "
        f"{cfg.fed.ranks_per_client} rank(s) x {cfg.train.gradient_accumulation_steps} accumulation; "
        f"m = {max(1, round(cfg.fed.expected_round_size))} per round; FLOPs of fp32 training without "
        "gradient checkpointing's recompute, against fp32 device figures)")]
