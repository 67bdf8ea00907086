"""PowerSGD-style low-rank approximation (Vogels et al. 2019), with a warm start across rounds.

The tensor is viewed as a matrix M (n = shape[0] rows, m = the rest: a conv weight (o, i, kh, kw)
becomes o x (i*kh*kw)). With Q (m x r) from the previous round (random the first time):

    P = M Q;  P = orthonormalize(P);  Q = M^T P;  send P (n x r) and Q (m x r);  M_hat = P Q^T

and Q is kept as the next round's start: one step of subspace iteration per round (P orthonormalized by Gram-Schmidt), so for a slowly
changing M the basis converges to M's top-r singular subspace. A tensor where r (n + m) >= n m (1-D,
thin, or tiny) is not worth factoring: it goes on dense (the next codec of a chain still encodes it).
Note that LoRA factors are themselves thin (e.g. 4 x 320): ``lowrank_rank`` must be below their small
side to do anything there.
"""

from __future__ import annotations

import math

import torch

from fed_ddp.compression.base import TRANSFORM, Codec, PieceState
from fed_ddp.compression.payload import Payload
from fed_ddp.compression.registry import register
from fed_ddp.errors import ConfigError

WARM = "lowrank_q"  # PieceState.slot key of the warm-start Q


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p's (classical Gram-Schmidt, each column projected twice).

    For the few columns of a PowerSGD factor this is a handful of small kernels; ``torch.linalg.qr``
    measured ~7 ms per call on a 16 x 2 matrix with 2 CPU threads (0.01 ms with 1), hundreds of calls
    per message. A column dependent on the previous ones becomes zero: P P^T is still an orthogonal
    projection (onto a smaller space), so the error bound holds.
    """
    out = torch.zeros_like(p)
    for i in range(p.shape[1]):
        v, basis = p[:, i], out[:, :i]
        for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
            v = v - basis @ (basis.T @ v)
        norm = v.norm()
        if norm > 1e-6 * p[:, i].norm():
            out[:, i] = v / norm
    return out


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    n = shape[0] if shape else 1
    return n, (math.prod(shape) // n if n else 0)


@register("lowrank")
class LowRank(Codec):
    """Rank-r factors P, Q of the tensor viewed as a matrix M.

    Error bound: M_hat = P P^T M with P orthonormal, an orthogonal projection, so
    ||M - M_hat||_F^2 = ||M||_F^2 - ||P^T M||_F^2 <= ||M||_F^2; exact (to fp32 rounding) when rank M <= r;
    for a fixed M, repeated rounds converge to the best rank-r error (sum of sigma_i^2, i > r)^(1/2).
    Tensors it does not factor travel exactly.
    """

    kind = TRANSFORM

    def __init__(self, rank: int = 4):
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError("comm.lowrank_rank", rank, "must be an integer >= 1")
        self.rank = rank

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.lowrank_rank)

    def factors(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of this shape is sent as factors (they must be smaller than the tensor)."""
        n, m = matrix_shape(shape)
        return len(shape) >= 2 and self.rank * (n + m) < n * m

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        shape = tuple(x.shape)
        if not self.factors(shape):
            return Payload(self.name, shape, {"dense": x.float().reshape(-1)})
        st = state or PieceState()
        M = x.float().reshape(matrix_shape(shape))
        q = st.slot.get(WARM)
        fresh = torch.randn(M.shape[1], self.rank, generator=st.generator(M.device, stream=1), device=M.device)
        if q is None or q.shape != fresh.shape:
            q = fresh
        else:  # a zero column would stay zero forever: restart it
            q = q.to(M.device)
            q = torch.where(q.abs().sum(dim=0, keepdim=True) > 0, q, fresh)
        p = orthonormalize(M @ q)
        q = M.T @ p
        st.slot[WARM] = q.detach().clone()
        return Payload(self.name, shape, {"p": p, "q": q})

    def decode(self, p: Payload) -> torch.Tensor:
        if "dense" in p.fields:
            return p.fields["dense"].float().reshape(p.shape)
        return (p.fields["p"].float() @ p.fields["q"].float().T).reshape(p.shape)
