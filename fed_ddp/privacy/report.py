"""Privacy in words and numbers: ``fed-ddp plan``'s lines before a run, the closing lines after it."""

from __future__ import annotations

import math

from fed_ddp.privacy import accountant as acc
from fed_ddp.privacy import secagg as sa


def secagg_client_bytes(numel: int, bits: int, clients: int) -> dict[str, int]:
    """Over-the-air bytes one client sends (up) and receives (down, without the global adapter and plan)
    in a secure-aggregation round of ``clients`` clients where every one survives."""
    from fed_ddp.privacy.masked import KEYS, MASKED, SHARES, UNMASK, up_each

    ring = sa.ring_bits(bits, clients)
    return {"ring_bits": ring,
            "keys_up": up_each(KEYS, clients), "shares_up": up_each(SHARES, clients),
            "masked_up": up_each(MASKED, clients, numel, ring), "unmask_up": up_each(UNMASK, clients),
            "keys_down": clients * sa.ADVERT_BYTES, "shares_down": (clients - 1) * sa.CIPHER_BYTES,
            "unmask_down": clients,
            "plain_fixed_point_up": 8 + sa.packed_bytes(numel, bits)}  # the same values, unmasked, with id + flag


def plan_lines(cfg, numel: int) -> list[str]:
    from fed_ddp.privacy.engine import resolve

    setup = resolve(cfg)
    if setup is None:
        return ["", "privacy   none (no clipping, no noise, no secure aggregation): the server sees every update"]
    lines = ["", f"privacy   {setup.describe()}"]
    f = cfg.fed
    if setup.dp:
        rounds = f.rounds
        shown = sorted({1, rounds, *[math.ceil(rounds * k / 8) for k in range(1, 8)]})
        eps = [(r, acc.epsilon(setup.kind, [(setup.q, setup.z)] * r, setup.delta)) for r in shown]
        lines.append(f"  epsilon at delta={setup.delta:g} after round: " + ", ".join(f"{r}: {e:.3g}" for r, e in eps))
        if cfg.privacy.dp.max_epsilon is not None:
            over = [r for r, e in eps if e > cfg.privacy.dp.max_epsilon]
            if over:
                lines.append(f"  privacy.dp.max_epsilon={cfg.privacy.dp.max_epsilon:g} stops training before round "
                             f"{over[0]} or earlier")
        em = f.expected_round_size
        lines.append(f"  noise on the mean delta: std z*C/E[m] = {setup.z_delta * setup.clip / em:.3g} per value "
                     f"(E[m] = {em:g} clients per round)")
    if setup.secagg:
        m = max(2, round(f.expected_round_size))
        b = secagg_client_bytes(numel, setup.bits, m)
        up = b["keys_up"] + b["shares_up"] + b["masked_up"] + b["unmask_up"]
        lines.append(f"  secure aggregation at {m} clients per round: ring of {b['ring_bits']} bits ({setup.bits}-bit "
                     f"values + {b['ring_bits'] - setup.bits} bits of headroom); per client up {up:,} B = keys "
                     f"{b['keys_up']:,} + shares {b['shares_up']:,} + masked input {b['masked_up']:,} + unmask "
                     f"{b['unmask_up']:,}; {up / b['plain_fixed_point_up']:.2f}x the same {setup.bits}-bit values sent "
                     "without it")
    return lines


def closing_lines(summary) -> list[str]:
    """The privacy lines under ``fed-ddp run`` (``summary``: a ``results.RunSummary``)."""
    p = summary.privacy or {}
    lines = [f"Privacy: {p.get('guarantee', 'no differential privacy')}"]
    if p.get("epsilon_rdp") is not None:
        lines[0] += f" (RDP bound: epsilon = {p['epsilon_rdp']:.3g})"
    per = p.get("secagg_per_round_mean")
    if per:
        extra_s = sum(v["seconds"] for k, v in per.items() if k != "masked")
        air = sum(v["air_up"] for k, v in per.items() if k != "masked")
        lines.append(f"Secure aggregation, per round (mean): {extra_s:.2f} s in the key, share and unmask steps, "
                     f"{air:,.0f} B of keys and shares sent over the air on top of the masked inputs "
                     f"({per.get('masked', {}).get('air_up', 0):,.0f} B)")
    return lines
