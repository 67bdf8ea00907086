"""LoRA-aware aggregation: averaging A and B separately is not averaging the update B·A they stand for.

For a LoRA layer with factors B (out x r) and A (r x in) (convolutions: B (out, r, 1, 1), A (r, in, k, k),
the product taken over the flattened kernels), client i holds B_i = B + dB_i, A_i = A + dA_i. FedAvg of the
factors gives mean(B)·mean(A), while the clients' updates average to mean(B_i·A_i); the difference is
the aggregation error (Sun et al. 2024, FFA-LoRA; Bai et al. 2024, FlexLoRA):

    error = ||mean(B)·mean(A) − mean(B_i·A_i)||_F / ||mean(B_i·A_i) − B·A||_F     (relative to the round's update)

``FlexLora`` aggregates the products exactly and re-factorises their weighted mean by truncated SVD back to
rank r (exact whenever that mean has rank <= r), reporting the truncation error (what the SVD dropped, relative
to the round's update, like the error above); FFA-LoRA (A frozen at the shared initialisation, only B trained
and sent) is exact by construction. Both errors and the SVD work on the factors (QR of the stacked factors, then
an SVD of a (clients·r) x (clients·r) matrix), never on the (out x in) products, so they cost little at SD size.
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


def factors(flat: torch.Tensor, p: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one layer as (out x r) and (r x in·k·k) matrices, in fp64."""
    return flat[p.b].double().reshape(p.b_shape[0], -1), flat[p.a].double().reshape(p.a_shape[0], -1)


def product(flat: torch.Tensor, p: Pair) -> torch.Tensor:
    """B·A of one layer as an (out, in·k·k) matrix, in fp64 (dense: for tests and small layers)."""
    b, a = factors(flat, p)
    return b @ a


def _low_rank(terms: list[tuple[float, torch.Tensor, torch.Tensor]]):
    """Σ c·B·A over ``terms`` as Q_left · M · Q_right^T with orthonormal Q's and a small (k x k) M, k = Σ ranks:
    norms and SVDs of sums of LoRA products at the cost of the factors, never the (out x in) matrix."""
    left = torch.cat([c * b for c, b, _ in terms], dim=1)  # out x k
    right = torch.cat([a for _, _, a in terms], dim=0)  # k x in
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.T)
    return q_l, r_l @ r_r.T, q_r


def _norm(terms) -> float:
    """||Σ c·B·A||_F (orthogonal factors do not change the Frobenius norm)."""
    return float(torch.linalg.matrix_norm(_low_rank(terms)[1]))


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
        clients = [(wi, *factors(x, p)) for wi, x in zip(w, local)]
        moved = _norm([*clients, (-1.0, *factors(global_flat, p))])
        if moved > 0:
            naive = _norm([(1.0, *factors(mean_flat, p)), *[(-wi, b, a) for wi, b, a in clients]])
            errors.append(naive / moved)
    return {"mean": sum(errors) / len(errors), "max": max(errors)} if errors else {"mean": 0.0, "max": 0.0}


def refactor(terms, p: Pair, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-r truncated SVD U·S·V^T of Σ c·B·A (r = A's rows) as new factors A = scale·V^T (rows of norm
    ``scale``, like a fresh LoRA init, so B's gradients keep their size) and B = U·S/scale, reshaped to the
    layer's shapes; returns (A values, B values, ||what the truncation dropped||_F)."""
    r = p.a_shape[0]
    q_l, m, q_r = _low_rank(terms)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, vh = q_l @ u, vh @ q_r.T  # out x k', k' x in: the singular vectors of the full sum
    lost = float(s[r:].square().sum().sqrt())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if len(s) < r:  # fewer directions than the rank: the spare components start like peft's (B = 0, A random)
        g = torch.Generator().manual_seed(len(s))
        extra = torch.randn(r - len(s), vh.shape[1], generator=g, dtype=vh.dtype)
        if vh.shape[1] >= r:  # orthogonal to the kept directions where there is room
            extra = extra - (extra @ vh.T) @ vh
        extra = extra / extra.norm(dim=1, keepdim=True)
        vh = torch.cat([vh, extra])
        u = torch.cat([u, torch.zeros(u.shape[0], r - len(s), dtype=u.dtype)], dim=1)
        s = torch.cat([s, torch.zeros(r - len(s), dtype=s.dtype)])
    return (scale * vh).reshape(-1), (u * (s / scale)).reshape(-1), lost


class FfaLora(FedAvg):
    """FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): every client keeps A frozen at the shared initialisation
    (``prepare_trainable`` freezes it, so the flat vector and every message hold B only: half the bytes for
    square layers, 3.3x fewer on the quickstart, whose conv layers' A is the larger factor)
    and FedAvg on B is exact: mean(B_i)·A = mean(B_i·A)."""

    frozen_factors = ("lora_A",)

    def __init__(self, *args, layout=None, **kw):
        super().__init__(*args, **kw)
        if layout is not None and lora_pairs(layout):
            raise ValueError("fed.strategy=ffa_lora: the trained vector holds A factors (the UNet was not prepared "
                             "with diffusion.lora.prepare_trainable): FedAvg of A and B would not be exact")


class FlexLora(FedAvg):
    """FlexLoRA-style exact aggregation (Bai et al. 2024, arXiv 2402.11505): every LoRA layer's new factors are
    the rank-r truncated SVD U·S·V^T of  B·A + server_lr·(mean_i(B_i·A_i) − B·A)  (sample-weighted), split as
    A = c·V^T, B = U·S/c with c the current A's row norm: A keeps the scale of peft's init round after round
    (an even split sqrt(S) would shrink A, and B's gradients with it, while the update is small), and directions
    with no energy yet keep a non-zero A so that they can still learn. Tensors outside (A, B) pairs move by
    FedAvg. Needs ``fed.aggregator=mean`` and the adapter's layout."""

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
            b0, a0 = factors(global_state, p)
            # the new product: B·A + server_lr·(mean_i B_i·A_i − B·A), as a sum of low-rank terms
            terms = [(1.0 - self.server_lr, b0, a0), *[(self.server_lr * wi, *factors(x, p)) for wi, x in zip(w, local)]]
            scale = float(a0.norm(dim=1).square().mean().sqrt()) or 3 ** -0.5  # keep A's row norm (peft init: ~0.58)
            a, b, lost = refactor(terms, p, scale)
            new[p.a], new[p.b] = a, b
            moved = _norm(terms[1:] + [(-self.server_lr, b0, a0)])  # the round's change of B·A
            truncation.append(lost / moved if moved > 0 else 0.0)
        out = new.to(global_state.dtype)
        return out, {"update_norm": float((out - global_state).norm()),
                     "truncation_error_mean": sum(truncation) / len(truncation),
                     "truncation_error_max": max(truncation)}
