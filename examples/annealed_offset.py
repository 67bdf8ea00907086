"""A strategy that sends its clients a number every round, and the client objective that uses it: a noise offset
whose strength the server anneals, start x (R - t + 1) / R in round t of R (fed.rounds).

    fed-ddp run configs/quickstart.yaml run.plugins=[examples/annealed_offset.py] fed.strategy=annealed_offset train.objective=annealed_offset

``plan_values`` names what the strategy adds to every round's plan; ``configure_round`` fills ``plan.values``
(every name, every round: anything else stops the run naming the value). Each travels to every client as one
fp32 value after the head's own fields (4 B more per client in ``down_bytes``). On the client the objective
reads them as ``self.plan.values``, a ``ClientHook`` as ``job.plan.values``. The objective reports the strength
it trained with, so the round's record shows it per client (``"noise_offset": {"0": 0.1, "1": 0.1}``).
"""

import torch

from fed_ddp.objectives import Objective
from fed_ddp.objectives import register as register_objective
from fed_ddp.strategies import FedAvg, register


class AnnealedOffset(FedAvg):
    fed_keys = ("rounds",)  # fed.rounds, given to the constructor
    plan_values = ("noise_offset",)  # sent to every client each round

    def __init__(self, *args, rounds: int, start: float = 0.1, **kw):
        super().__init__(*args, **kw)  # local_steps, lr, server_lr, aggregator, ... (fed.*)
        self.rounds, self.start = rounds, start  # fed.strategy_args.start sets start

    def configure_round(self, rnd):
        plan = super().configure_round(rnd)
        plan.values["noise_offset"] = self.start * (self.rounds - rnd + 1) / self.rounds  # 0 after the last
        return plan


class PlannedNoiseOffset(Objective):
    families = ("sd", "sdxl")
    metrics = ("noise_offset",)  # per client in the round's record: the strength it trained with

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        # this round's strength as the server sent it (fp32); train.noise_offset under a strategy that sends none
        # (fed-ddp compare's pooled and local-only arms train with fedavg)
        strength = self.plan.values.get("noise_offset", self.cfg.noise_offset)
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(noise)
        return family.loss(model, scheduler, latents, cond, noise + strength * offset, t), {"noise_offset": strength}


register("annealed_offset", AnnealedOffset)
register_objective("annealed_offset", PlannedNoiseOffset)
