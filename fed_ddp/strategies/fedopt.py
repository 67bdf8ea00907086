"""FedAdagrad and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv 2003.00295, Algorithm 2).

FedAdam's server (``fedadam.py``) with another second moment; d is the round's combined client delta
(sample-weighted mean, or ``fed.aggregator``'s robust combination), and the moments are saved with checkpoints:
    m = b1*m + (1-b1)*d
    FedAdagrad: v = v + d^2
    FedYogi:    v = v - (1-b2) * d^2 * sign(v - d^2)
    w = w + eta * m / (sqrt(v) + tau)
No bias correction, as in the paper. Initialisation, as FedAdam here: m_{-1} = v_{-1} = 0. The paper's
Algorithm 2 asks for v_{-1} >= tau^2; starting at zero keeps the three strategies one family (FedYogi's first
v is then Adam's, (1-b2)*d^2, since sign(0 - d^2) = -1), and tau in the denominator alone bounds the step
(|step| <= eta*|m|/tau). A v_{-1} = tau^2 would differ only where the accumulated d^2 is still ~tau^2.
"""

from __future__ import annotations

import torch

from fed_ddp.strategies.fedadam import FedAdam


class FedAdagrad(FedAdam):
    """Server Adagrad with server momentum b1; ``beta2`` is accepted and unused."""

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return v + d * d


class FedYogi(FedAdam):
    """Server Yogi: v steps by (1-b2)*d^2 towards d^2, whatever their gap (Adam steps by (1-b2)*(d^2 - v)).

    v stays >= 0: it only shrinks when v > d^2, and then by (1-b2)*d^2 < v.
    """

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d2 = d * d
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
