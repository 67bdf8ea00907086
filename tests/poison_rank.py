"""A real fed_ddp rank whose worker plays some clients as attackers (and records the wire like spy_rank).

``FED_DDP_ATTACKS="0:nan,1:count,2:index,3:huge,4:negative"``: client 0 trains and then sends NaN, client 1
claims 10 million examples, client 2 sends a top-k index outside its tensor, client 3 sends its delta
times 1e6, client 4 claims -5 examples. Everything else is the production path (``spy_rank`` records
what honest and attacking clients really trained, before the attack).
"""

import os
import sys

import spy_rank  # noqa: F401  (records the wire and every fit)
import torch

from fed_ddp import train
from fed_ddp.client import LocalTrainer
from fed_ddp.protocol import UP_TAIL_BYTES
from fed_ddp.worker import Worker

ATTACKS = {int(c): kind for c, kind in (x.split(":") for x in os.environ.get("FED_DDP_ATTACKS", "").split(",") if x)}

_fit = LocalTrainer.fit


def attacking_fit(self, global_flat, plan):
    delta, metrics = _fit(self, global_flat, plan)
    kind = ATTACKS.get(self.client_id)
    if kind == "nan":
        delta = delta.clone()
        delta[::7] = float("nan")
    elif kind == "huge":
        delta = delta * 1e6
    return delta, metrics


_play = Worker.play


def attacking_play(self, client, plan, global_flat, state_round=-1):
    msg = _play(self, client, plan, global_flat, state_round)
    kind = ATTACKS.get(client)
    if not msg.numel() or kind not in ("count", "negative", "index"):
        return msg
    msg = msg.clone()
    if kind in ("count", "negative"):  # the fp32 example count right after the int32 client id
        n = torch.tensor([1e7 if kind == "count" else -5.0], dtype=torch.float32).view(torch.uint8)
        msg[-UP_TAIL_BYTES + 4:-UP_TAIL_BYTES + 8] = n
        return msg
    body = msg[:-UP_TAIL_BYTES]
    m = self.wire.up.from_bytes(body)
    for p in m.pieces:  # the first tensor sent with explicit indices: point one past the end of the dtype
        idx = p.fields.get("indices")
        if isinstance(idx, torch.Tensor) and idx.dtype != torch.uint8 or (isinstance(idx, torch.Tensor)
                                                                          and p.fields.get("values") is not None
                                                                          and idx.numel() == p.fields["values"].numel()):
            idx[-1] = torch.iinfo(idx.dtype).max
            break
    else:
        raise RuntimeError("no explicit indices in this message: use a smaller comm.topk_fraction")
    return torch.cat([m.to_bytes(), msg[-UP_TAIL_BYTES:]])


LocalTrainer.fit = attacking_fit
Worker.play = attacking_play

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
