"""A strategy in a file of your own: server momentum as a bias-corrected moving average of the mean delta.

    fed-ddp run configs/quickstart.yaml run.plugins=[examples/fedema.py] fed.strategy=fedema fed.strategy_args.beta=0.5

``run.plugins`` imports this file in the launcher and on every rank, so ``register`` below reaches them all.
The constructor's keyword parameters (``beta``) are the strategy's settings: ``fed.strategy_args.beta`` sets
them, checked against this signature (a name it does not take, or a value of another type, is one line).
What ``state_dict`` returns is saved in every checkpoint and given back to ``load_state_dict`` on resume.
"""

import torch

from fed_ddp.strategies import FedAvg, register


class FedEma(FedAvg):
    def __init__(self, *args, beta: float = 0.9, **kw):
        super().__init__(*args, **kw)  # local_steps, lr, server_lr, aggregator, ... (fed.*)
        self.beta, self.m, self.t = beta, None, 0

    def aggregate(self, rnd, global_state, updates):
        d = self.combine(updates)  # the sample-weighted mean delta (or fed.aggregator's robust one)
        self.m = (1 - self.beta) * d if self.m is None else self.beta * self.m + (1 - self.beta) * d
        self.t += 1
        step = self.server_lr * self.m / (1 - self.beta ** self.t)
        return global_state + step, {"update_norm": float(step.norm())}

    def state_dict(self):
        return {"m": self.m, "t": torch.tensor(self.t)}

    def load_state_dict(self, state):
        self.m, self.t = state.get("m"), int(state["t"]) if "t" in state else 0


register("fedema", FedEma)
