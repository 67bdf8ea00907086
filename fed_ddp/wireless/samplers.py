"""The simulated cell's schedulers as client samplers (``fed.sampling=best_channel`` / ``age``; the old spelling
``wireless.scheduler=...`` maps onto them). They use the public ``Sampler`` interface a user's sampler does: the
round's reachable ids, and ``self.context``: the cell (its simulated channel gains this round) and the round
each client was last sampled (the server keeps it and checkpoints it, so a resumed run schedules the same).

    best_channel   the m reachable clients with the strongest simulated channel this round
    age            the m sampled longest ago (never first), ties broken by the cell's seeded draw

Both need ``wireless.enabled`` and ``fed.clients_per_round`` (m), and differential privacy refuses them (its
accountant assumes Poisson sampling). The seeded stream a sampler gets is not used: their choice is the one the
cell's own streams give (``wireless.seed``), as before they were samplers.
"""

from __future__ import annotations

from fed_ddp.population.sampling import Sampler, register
from fed_ddp.wireless.sim import schedule


class _CellSampler(Sampler):
    uses = "clients_per_round"
    needs_cell = True
    mode: str

    def sample(self, rnd, rng, reachable, sizes):
        cell = self.context.cell if self.context is not None else None
        if cell is None:
            raise ValueError(f"fed.sampling={self.mode} reads the simulated cell: set wireless.enabled=true")
        return schedule(self.mode, cell, rnd, reachable, self.m, self.context.last_sampled)


class BestChannel(_CellSampler):
    mode = "best_channel"


class Age(_CellSampler):
    mode = "age"


register("best_channel", BestChannel)
register("age", Age)
