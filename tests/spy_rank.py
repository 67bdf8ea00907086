"""Run one real fed_ddp rank while recording, on each client, what crossed the wire.

Used by test_distributed.py: launched as ``python tests/spy_rank.py CONFIG key=value ...`` by torch's
elastic launcher. It wraps ``CollectiveTransport.serve`` so each client saves every downlink it
received and every uplink it sent to ``$FED_DDP_SPY_DIR``; everything else is the production path.
"""

import os
import sys

import torch

from fed_ddp import train
from fed_ddp.transport import CollectiveTransport

_serve = CollectiveTransport.serve


def spying_serve(self, downlink_numel, handler):
    rank = int(os.environ["RANK"])
    out = os.environ["FED_DDP_SPY_DIR"]
    counter = {"n": 0}

    def wrapped(down):
        up = handler(down)
        counter["n"] += 1
        torch.save({"down": down.clone(), "up": None if up is None else up.clone()},
                   os.path.join(out, f"rank{rank}_msg{counter['n']}.pt"))
        return up

    return _serve(self, downlink_numel, wrapped)


CollectiveTransport.serve = spying_serve

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
