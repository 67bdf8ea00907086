"""A sender's codec state: error-feedback residuals, low-rank warm starts and the round counter.

One ``ChainState`` per sending endpoint and direction (each client owns its uplink state; the server
owns its downlink state). It is plain tensors and integers, so it checkpoints with ``state_dict()``::

    state = ChainState(seed=run_seed * 1_000_003 + client_id)   # distinct random streams per client
    tensors, meta = state.to_tensors()   # safetensors-ready (see population.ClientStateStore)

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the chain compresses x + e and keeps
e' = (x + e) - decode(encode(x + e)). Summed over rounds, what was sent equals the sum of the true
inputs minus the current residual, so nothing is lost, only delayed.
"""

from __future__ import annotations

import torch

from fed_ddp.compression.base import PieceState, mix_seed


class ChainState:
    def __init__(self, seed: int = 0):
        self.seed = int(seed)  # base of every random stream of this sender
        self.step = 0  # messages encoded so far (advances the random streams)
        self.residual: dict[str, torch.Tensor] = {}  # error feedback, per adapter tensor name
        self.slots: dict[str, dict[str, torch.Tensor]] = {}  # per-tensor codec state (lowrank warm start)

    def piece(self, index: int, name: str) -> PieceState:
        """The state codecs see for tensor ``index`` (``name``) of the current message."""
        return PieceState(mix_seed(self.seed, self.step, index), self.slots.setdefault(name, {}))

    def residual_norm(self) -> float:
        return float(sum(r.double().pow(2).sum() for r in self.residual.values()) ** 0.5) if self.residual else 0.0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step,
                "residual": {k: v.detach().cpu().clone() for k, v in self.residual.items()},
                "slots": {k: {s: v.detach().cpu().clone() for s, v in d.items()} for k, d in self.slots.items()}}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat named tensors + string metadata (for safetensors: nothing to unpickle)."""
        tensors = {f"residual|{k}": v.detach().cpu() for k, v in self.residual.items()}
        tensors.update({f"slot|{k}|{s}": v.detach().cpu() for k, d in self.slots.items() for s, v in d.items()})
        return tensors, {"seed": str(self.seed), "step": str(self.step)}

    def load_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.seed, self.step = int(meta["seed"]), int(meta["step"])
        self.residual, self.slots = {}, {}
        for key, v in tensors.items():
            kind, _, rest = key.partition("|")
            if kind == "residual":
                self.residual[rest] = v.clone()
            elif kind == "slot":
                name, _, slot = rest.rpartition("|")
                self.slots.setdefault(name, {})[slot] = v.clone()
            else:
                raise ValueError(f"codec state: unknown tensor {key!r}")

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.residual = {k: v.clone() for k, v in state["residual"].items()}
        self.slots = {k: {s: v.clone() for s, v in d.items()} for k, d in state["slots"].items()}
