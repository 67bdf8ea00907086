"""LoRA-aware aggregation: averaging A and B separately is not averaging the update B·A they stand for.

For a LoRA layer with factors B (out x r) and A (r x in) (convolutions: B (out, r, 1, 1), A (r, in, k, k),
the product taken over the flattened kernels), client i holds B_i = B + dB_i, A_i = A + dA_i. FedAvg of the
factors gives mean(B)·mean(A), while the clients' updates average to mean(B_i·A_i); the difference is
the aggregation error (Sun et al. 2024, FFA-LoRA; Bai et al. 2024, FlexLoRA):

    error = ||mean(B)·mean(A) − mean(B_i·A_i)||_F / ||mean(B_i·A_i) − B·A||_F     (relative to the round's update)

``FlexLora`` aggregates the products exactly and re-factorises their weighted mean by truncated SVD back to
rank r (exact whenever that mean has rank <= r), reporting the truncation error; FFA-LoRA (A frozen at the
shared initialisation, only B trained and sent) is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fed_ddp.strategies.base import ClientUpdate
from fed_ddp.strategies.fedavg import FedAvg


@dataclass
class Pair:
    name: str  # the layer (the A tensor's name up to ".lora_A")
    a: slice  # A's values in the flat vector
    a_shape: tuple[int, ...]
    b: slice
    b_shape: tuple[int, ...]


def lora_pairs(layout) -> list[Pair]:
    """The (A, B) pairs of a flat vector's layout, by peft's names (``...lora_A.<adapter>.weight`` and
    ``...lora_B.<adapter>.weight``); empty when the layout holds no A (FFA-LoRA) or no LoRA (full)."""
    where, offset = {}, 0
    for name, shape in layout:
        n = 1
        for s in shape:
            n *= s
        where[name] = (slice(offset, offset + n), tuple(shape))
        offset += n
    out = []
    for name, (sa, shape_a) in where.items():
        if ".lora_A." in name and name.replace(".lora_A.", ".lora_B.") in where:
            sb, shape_b = where[name.replace(".lora_A.", ".lora_B.")]
            out.append(Pair(name.split(".lora_A.")[0], sa, shape_a, sb, shape_b))
    return out


def product(flat: torch.Tensor, p: Pair) -> torch.Tensor:
    """B·A of one layer as an (out, in·k·k) matrix, in fp64."""
    b = flat[p.b].double().reshape(p.b_shape[0], -1)
    a = flat[p.a].double().reshape(p.a_shape[0], -1)
    return b @ a


def _weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("clients reported no examples: nothing to average")
    return [u.num_examples / total for u in updates]


def product_error(pairs: list[Pair], global_flat: torch.Tensor, updates: list[ClientUpdate]) -> dict[str, float]:
    """The aggregation error of sample-weighted FedAvg on the factors, per layer: its mean and maximum over
    the layers (layers whose mean product did not move are left out)."""
    w = _weights(updates)
    local = [global_flat.double() + u.delta.double() for u in updates]
    mean_flat = sum(wi * x for wi, x in zip(w, local))
    errors = []
    for p in pairs:
        exact = sum(wi * product(x, p) for wi, x in zip(w, local))
        moved = torch.linalg.matrix_norm(exact - product(global_flat, p))
        if moved > 0:
            errors.append(float(torch.linalg.matrix_norm(product(mean_flat, p) - exact) / moved))
    return {"mean": sum(errors) / len(errors), "max": max(errors)} if errors else {"mean": 0.0, "max": 0.0}


def refactor(matrix: torch.Tensor, p: Pair) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of an (out, in) matrix to rank r = A's rows, split evenly: B = U·sqrt(S), A = sqrt(S)·V^T
    (reshaped to the layer's shapes); returns (A values, B values, relative truncation error)."""
    r = p.a_shape[0]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    total = float(s.square().sum())
    lost = float(s[r:].square().sum())
    return a.reshape(-1), b.reshape(-1), (lost / total) ** 0.5 if total > 0 else 0.0


class FfaLora(FedAvg):
    """FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): every client keeps A frozen at the shared initialisation
    (``prepare_trainable`` freezes it, so the flat vector and every message hold B only: half the bytes for
    square layers, 3.3x fewer on the quickstart, whose conv layers' A is the larger factor)
    and FedAvg on B is exact: mean(B_i)·A = mean(B_i·A)."""


class FlexLora(FedAvg):
    """FlexLoRA-style exact aggregation (Bai et al. 2024, arXiv 2402.11505): every LoRA layer's new factors are
    the rank-r truncated SVD of  B·A + server_lr·(mean_i(B_i·A_i) − B·A)  (sample-weighted); tensors outside
    (A, B) pairs move by FedAvg. Needs ``fed.aggregator=mean`` and the adapter's layout."""

    def __init__(self, *args, layout=None, **kw):
        super().__init__(*args, **kw)
        if layout is None:
            raise ValueError("flexlora needs the adapter's layout (named A and B tensors)")
        self.pairs = lora_pairs(layout)
        if not self.pairs:
            raise ValueError("fed.strategy=flexlora: the trained vector has no LoRA (A, B) pairs "
                             "(train.method=full, or A frozen)")

    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]):
        mean = self.combine(updates)
        new = (global_state.double() + self.server_lr * mean.double()).clone()  # everything outside the pairs
        w = _weights(updates)
        local = [global_state.double() + u.delta.double() for u in updates]
        truncation = []
        for p in self.pairs:
            before = product(global_state, p)
            target = before + self.server_lr * (sum(wi * product(x, p) for wi, x in zip(w, local)) - before)
            a, b, err = refactor(target, p)
            new[p.a], new[p.b] = a, b
            truncation.append(err)
        out = new.to(global_state.dtype)
        return out, {"update_norm": float((out - global_state).norm()),
                     "truncation_error_mean": sum(truncation) / len(truncation),
                     "truncation_error_max": max(truncation)}
