"""Run one real fed_ddp rank while recording, on each client, what crossed the wire.

Used by test_distributed.py: launched as ``python tests/spy_rank.py CONFIG key=value ...`` by torch's
elastic launcher. It wraps ``CollectiveTransport.serve`` so each client leader saves every downlink it
received and every uplink it sent (uint8 buffers, as on the wire), and ``LocalTrainer.fit`` so every client rank saves its delta,
to ``$FED_DDP_SPY_DIR``; everything else is the production path.
"""

import os
import sys

import torch

from fed_ddp import train
from fed_ddp.client import LocalTrainer
from fed_ddp.transport import CollectiveTransport

_serve = CollectiveTransport.serve


def spying_serve(self, down_nbytes, up_nbytes, handler):
    rank = int(os.environ["RANK"])
    out = os.environ["FED_DDP_SPY_DIR"]
    counter = {"n": 0}

    def wrapped(down):
        up = handler(down)
        counter["n"] += 1
        torch.save({"down": down.clone(), "up": None if up is None else up.clone()},
                   os.path.join(out, f"rank{rank}_msg{counter['n']}.pt"))
        return up

    return _serve(self, down_nbytes, up_nbytes, wrapped)


CollectiveTransport.serve = spying_serve

_fit = LocalTrainer.fit


def spying_fit(self, global_flat, plan):
    """Every client rank (leaders and followers) records the adapter delta it ended the round with."""
    delta, metrics = _fit(self, global_flat, plan)
    out = os.environ["FED_DDP_SPY_DIR"]
    torch.save(delta.clone(), os.path.join(out, f"fit_rank{os.environ['RANK']}_round{plan.round}.pt"))
    return delta, metrics


LocalTrainer.fit = spying_fit

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
