"""The layout of the two flat buffers of a round (fp32), shared by server and clients.

downlink = [stop, round, local_steps, lr, proximal_mu] + global adapter (P values)
uplink   = delta (P values) + [num_examples, train_loss, train_seconds, client_seconds]

Counts travel as fp32, exact up to 2**24 (16.7 M examples per client).
"""

from __future__ import annotations

import torch

from fed_ddp.strategies import ClientUpdate, RoundPlan

DOWN_HEADER = 5
UP_FIELDS = ("num_examples", "train_loss", "train_seconds", "client_seconds")


def downlink_numel(num_params: int) -> int:
    return DOWN_HEADER + num_params


def uplink_numel(num_params: int) -> int:
    return num_params + len(UP_FIELDS)


def pack_downlink(plan: RoundPlan, global_flat: torch.Tensor, stop: bool = False) -> torch.Tensor:
    head = torch.tensor([float(stop), plan.round, plan.local_steps, plan.lr, plan.proximal_mu], dtype=torch.float32)
    return torch.cat([head, global_flat.float().cpu()])


def unpack_downlink(buf: torch.Tensor) -> tuple[bool, RoundPlan, torch.Tensor]:
    stop, rnd, steps, lr, mu = buf[:DOWN_HEADER].tolist()
    return bool(stop), RoundPlan(int(rnd), int(steps), float(lr), float(mu)), buf[DOWN_HEADER:]


def pack_uplink(delta: torch.Tensor, num_examples: int, metrics: dict[str, float]) -> torch.Tensor:
    tail = torch.tensor([num_examples] + [metrics[k] for k in UP_FIELDS[1:]], dtype=torch.float32)
    return torch.cat([delta.float().cpu(), tail])


def unpack_uplink(buf: torch.Tensor, client_id: int) -> ClientUpdate:
    n = len(UP_FIELDS)
    fields = dict(zip(UP_FIELDS, buf[-n:].tolist()))
    return ClientUpdate(client_id, buf[:-n], round(fields.pop("num_examples")), fields)
