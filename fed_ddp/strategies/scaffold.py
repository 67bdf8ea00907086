"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning", arXiv 1910.06378).

Control variates against client drift. The server keeps c, client i keeps c_i (in the client state store,
zero before it first plays); a round sends [x, c] down and [Δx_i, Δc_i] up, as one flat vector each over the
adapter's layout followed by the same tensors again under names prefixed ``scaffold_c|`` (``protocol.ControlWire``),
so the configured codecs and the byte accounting cover the control variates too (twice the values). Client:

    every local step's gradient g is replaced by g + (c - c_i)           (``corrected_gradients``: hooks)
    c_i+ = the mean raw gradient g over its K local steps                 (what option II computes under SGD)
    sends Δx_i = y_i - x and Δc_i = c_i+ - c_i, keeps c_i+

Server (|S| clients reported, N = fed.num_clients; c starts at zero and is saved with checkpoints):

    x = x + server_lr * mean_S(Δx_i)         (sample-weighted, as FedAvg)
    c = c + |S|/N * mean_S(Δc_i)             (uniform: c stays the mean of all N c_i)

Under plain SGD the paper's option II, c_i+ = c_i - c + (x - y_i)/(K·lr), is exactly the mean raw gradient along
the client's trajectory (its steps are lr x (g + c - c_i)). The clients here step with AdamW, whose steps are not
lr x gradient, so that formula would not be in gradient units: the hooks read the mean raw gradient directly.
"""

from __future__ import annotations

import contextlib

import torch

from fed_ddp.hooks import ClientHook, ClientJob
from fed_ddp.strategies.base import ClientUpdate
from fed_ddp.strategies.fedavg import FedAvg

CONTROL_PREFIX = "scaffold_c|"  # the control variates' tensor names on the wire
CLIENT_CONTROL = "scaffold|c_i"  # the client's control variate in its state file


def control_layout(layout) -> list[tuple[str, tuple[int, ...]]]:
    """The adapter's layout followed by the control variates' (same shapes, prefixed names)."""
    layout = list(layout)
    return layout + [(CONTROL_PREFIX + name, tuple(shape)) for name, shape in layout]


class Scaffold(FedAvg):
    controls = True  # clients receive c with the global adapter and send Δc_i with their delta
    fed_keys = ("num_clients",)

    def __init__(self, *args, num_clients: int, **kw):
        super().__init__(*args, **kw)
        if self.aggregator != "mean":
            raise ValueError(f"fed.aggregator={self.aggregator!r}: fed.strategy=scaffold needs fed.aggregator=mean")
        self.num_clients = int(num_clients)
        self.c: torch.Tensor | None = None

    @classmethod
    def client_hook(cls, cfg) -> ClientHook:
        return ScaffoldClient(cfg.train.gradient_accumulation_steps)

    def control(self, global_state: torch.Tensor) -> torch.Tensor:
        """The server's control variate c (zeros before the first round)."""
        if self.c is None:
            self.c = torch.zeros_like(global_state)
        return self.c

    def downlink(self, global_state: torch.Tensor) -> torch.Tensor:
        return torch.cat([global_state, self.control(global_state)])

    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]):
        bad = [u.client_id for u in updates if u.control is None or u.control.shape != global_state.shape]
        if bad:
            raise ValueError(f"scaffold: clients {bad} sent no control variate of the adapter's size")
        d = self.combine(updates)
        dc = torch.stack([u.control.double() for u in updates]).mean(dim=0)
        c = self.control(global_state)
        self.c = (c.double() + len(updates) / self.num_clients * dc).to(c.dtype)
        step = self.server_lr * d
        return global_state + step, {"update_norm": float(step.norm()), "control_norm": float(self.c.norm())}

    def state_dict(self) -> dict:
        return {"c": self.c}

    def load_state_dict(self, state: dict) -> None:
        self.c = state.get("c")


class ScaffoldClient(ClientHook):
    """SCAFFOLD on the client: the downlink's control c, the client's c_i from its state file, every gradient
    corrected by c - c_i, and the message [Δx_i, Δc_i] with c_i+ = the mean raw gradient over the K local steps
    kept in the client's state file (the server points at the file its older c_i came from until Δc_i counts)."""

    prefix, saves = CLIENT_CONTROL, True

    def __init__(self, accumulation: int):
        self.accumulation = accumulation
        self.control: torch.Tensor | None = None

    def downlink(self, wire, body, slots, start):
        start, self.control = wire.split(start)  # [global, c]
        return start

    def before_fit(self, worker, job: ClientJob) -> None:
        self.c_i = self.client_control(worker, job.client, job.state_round)

    def client_control(self, worker, client: int, state_round: int) -> torch.Tensor:
        """The client's control variate c_i as of its round ``state_round`` (-1: zero, it never played)."""
        if state_round < 0:
            return torch.zeros_like(self.control)
        c_i = worker.saved_state(client, state_round)[0].get(CLIENT_CONTROL)
        if c_i is None or c_i.shape != self.control.shape:
            raise RuntimeError(f"client {client}: its state of round {state_round} holds no control variate of "
                               f"{self.control.numel()} values (a run started with another fed.strategy?)")
        return c_i

    @contextlib.contextmanager
    def fitting(self, worker, job: ClientJob):
        params = worker.trainer(job.client).engine.params
        with corrected_gradients(params, self.control - self.c_i, self.accumulation) as raw:
            self.raw = raw
            yield

    def after_fit(self, worker, job: ClientJob, delta: torch.Tensor) -> torch.Tensor:
        c_new = (self.raw.cpu() / job.plan.local_steps).to(self.control.dtype)
        job.saved[CLIENT_CONTROL], job.keep = c_new, job.state_round
        return torch.cat([delta, c_new - self.c_i])


@contextlib.contextmanager
def corrected_gradients(params: list[torch.Tensor], correction: torch.Tensor, accumulation: int = 1):
    """Inside the block, every backward pass adds ``correction`` (= c - c_i, flat in ``params`` order) /
    ``accumulation`` to the gradients of ``params``, so each optimizer step of ``accumulation`` micro-batches
    sees the gradient + (c - c_i) before clipping and AdamW; yields the flat sum (fp64) of the raw gradients the
    hooks saw: divided by the number of optimizer steps, the client's mean raw gradient (c_i+).

    Hooks rather than a linear term <params, c - c_i> in the loss: the same hook reads the raw gradient that
    c_i+ needs (no second backward, no subtraction of the correction afterwards) and adds the correction exactly.
    """
    device = params[0].device if params else torch.device("cpu")
    raw = torch.zeros(correction.numel(), dtype=torch.float64, device=device)  # on the device: no copies per step
    handles, offset = [], 0
    for p in params:
        part = slice(offset, offset + p.numel())
        v = (correction[part] / accumulation).view_as(p).to(device=p.device, dtype=p.dtype)

        def hook(g, part=part, v=v):
            raw[part] += g.detach().reshape(-1).double()
            return g + v.to(dtype=g.dtype)

        handles.append(p.register_hook(hook))
        offset += p.numel()
    if offset != correction.numel():
        for h in handles:
            h.remove()
        raise ValueError(f"control variate has {correction.numel()} values, the trained parameters {offset}")
    try:
        yield raw
    finally:
        for h in handles:
            h.remove()
