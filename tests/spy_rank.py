"""Run one real fed_ddp rank while recording, on each worker, what crossed the wire.

Used by test_distributed.py and others: launched as ``python tests/spy_rank.py CONFIG key=value ...`` by
torch's elastic launcher. It wraps ``CollectiveTransport.serve`` so each worker leader saves every
downlink (head and body) it received and every uplink it sent (uint8 buffers, as on the wire), and
``LocalTrainer.fit`` so every worker rank saves each client's delta, to ``$FED_DDP_SPY_DIR``;
everything else is the production path.

    rank{R}_msg{n}.pt                      {"head", "body", "up"} of the n-th round this leader served
    fit_rank{R}_round{t}_client{c}.pt      the delta rank R trained for client c in round t
"""

import os
import sys

import torch

from fed_ddp import train
from fed_ddp.client import LocalTrainer
from fed_ddp.transport import CollectiveTransport

_serve = CollectiveTransport.serve


def spying_serve(self, head_nbytes, body_nbytes, handler):
    rank = int(os.environ["RANK"])
    out = os.environ["FED_DDP_SPY_DIR"]
    counter = {"n": 0}

    def wrapped(head, body):
        up, sizes = handler(head, body)
        counter["n"] += 1
        torch.save({"head": head.clone(), "body": body.clone(), "up": up.clone()},
                   os.path.join(out, f"rank{rank}_msg{counter['n']}.pt"))
        return up, sizes

    return _serve(self, head_nbytes, body_nbytes, wrapped)


CollectiveTransport.serve = spying_serve

_fit = LocalTrainer.fit


def spying_fit(self, global_flat, plan):
    """Every worker rank (leaders and followers) records the adapter delta it ended each client's round with."""
    delta, metrics = _fit(self, global_flat, plan)
    out = os.environ["FED_DDP_SPY_DIR"]
    torch.save(delta.clone(), os.path.join(out, f"fit_rank{os.environ['RANK']}_round{plan.round}"
                                                f"_client{self.client_id}.pt"))
    return delta, metrics


LocalTrainer.fit = spying_fit


if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
