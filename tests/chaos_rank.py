"""A real fed_ddp rank that SIGKILLs (or, with ``FED_DDP_CHAOS_SIGNAL=STOP``, SIGSTOPs; with ``RAISE``, raises
a RuntimeError) itself at chosen points, one per launcher attempt.

``FED_DDP_CHAOS="2:2,0:3,1:4"``: in attempt 0 (``TORCHELASTIC_RESTART_COUNT``), rank 2 dies in round 2; after
the launcher restarts every rank, rank 0 dies in round 3; after the next restart, rank 1 dies in round 4. A
server dies at the start of the round; a worker dies right after its first client of the round has trained
and saved its state (the nastiest point: a state file of a round that never completes).
"""

import faulthandler
import os
import signal
import sys

from fed_ddp import train

faulthandler.register(signal.SIGUSR1)  # a hung rank: kill -USR1 PID prints its stack
from fed_ddp.server import Server
from fed_ddp.worker import Worker

KILLS = [tuple(map(int, x.split(":"))) for x in os.environ.get("FED_DDP_CHAOS", "").split(",") if x]
MODE = os.environ.get("FED_DDP_CHAOS_SIGNAL", "KILL")
SIG = signal.SIGSTOP if MODE == "STOP" else signal.SIGKILL  # hang, or die
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
WHO, WHEN = KILLS[ATTEMPT] if ATTEMPT < len(KILLS) else (-1, -1)


def _die(rnd: int) -> None:
    if RANK == WHO and rnd == WHEN:
        if MODE == "RAISE":
            raise RuntimeError(f"chaos: rank {RANK} gives up in round {rnd}")
        os.kill(os.getpid(), SIG)


_round = Server.round


def chaos_round(self, rnd, global_flat):
    _die(rnd)
    return _round(self, rnd, global_flat)


_play = Worker.play


def chaos_play(self, client, plan, *args, **kw):
    msg = _play(self, client, plan, *args, **kw)
    _die(plan.round)
    return msg


Server.round = chaos_round
Worker.play = chaos_play

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
