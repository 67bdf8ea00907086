"""A client sampler from a user's file: round robin over the population, fed.clients_per_round clients a round
in id order, so every client plays once every N/m rounds (those unreachable this round miss their turn).

    fed-ddp run CONFIG run.plugins=[examples/round_robin.py] fed.sampling=round_robin fed.clients_per_round=2

It gets the round, the round's seeded random stream (unused here: the turn is fixed), the reachable ids and
the examples per client, and returns ids; fed_ddp checks them (unique, among the reachable). Differential
privacy refuses it in one line: its accountant assumes Poisson sampling.
"""

import numpy as np

from fed_ddp.population.sampling import Sampler, register


class RoundRobin(Sampler):
    uses = "clients_per_round"  # reads fed.clients_per_round (m); fed.sample_rate must stay null

    def sample(self, rnd, rng, reachable, sizes):
        m = self.m or self.num_clients
        turn = ((rnd - 1) * m + np.arange(m)) % self.num_clients
        return np.intersect1d(turn, reachable)


register("round_robin", RoundRobin)
