"""Client-level differential privacy for federated averaging (DP-FedAvg), as pure tensor functions.

McMahan et al. 2018 (arXiv 1710.06963): every sampled client's *delta* (local adapter minus the
global one, over the whole adapter) is clipped to L2 norm C; Gaussian noise N(0, z^2 C^2) is added to
the sum of the clipped deltas; the sum is divided by the *expected* number of clients per round
(the fixed-denominator estimator, which keeps the sensitivity of the mean at C / E[m] under Poisson
sampling). ``central``: the server adds the noise. ``distributed``: each client adds
N(0, z^2 C^2 / k) to its own clipped delta, so that any k or more contributions carry at least the
central noise; this is the form that composes with secure aggregation (the server never sees an
un-noised sum).

Adaptive clipping (Andrew et al. 2021, arXiv 1905.03871): C follows the target quantile gamma of the
update norms, C <- C * exp(-eta * (b - gamma)), where b is the noised share of clients whose norm was
at most C. The count noise sigma_b takes part of the privacy budget: the deltas' noise multiplier
becomes z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the pair (deltas, count) costs what one
Gaussian mechanism with multiplier z costs, and the accountant tracks z.

Nothing here touches processes or the network; the server and workers call these functions.
"""

from __future__ import annotations

import math
import secrets

import torch


def clip(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """(delta scaled to L2 norm at most ``clip_norm``, its norm before clipping). Computed in fp64; a
    non-finite delta raises ValueError (the caller rejects that client, it never enters a sum)."""
    norm = float(delta.double().norm())
    if not math.isfinite(norm):
        raise ValueError(f"delta norm is {norm}")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (delta.double() * scale).to(delta.dtype), norm


def noise_generator(noise_seed: int | None, *stream: int) -> torch.Generator:
    """The generator of one noise draw. ``noise_seed`` null: 63 bits from the OS's entropy (nobody,
    the operator included, can replay the noise); an integer: reproducible from (noise_seed, *stream),
    for experiments only: whoever knows the seed can subtract the noise."""
    g = torch.Generator()
    if noise_seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        import numpy as np

        g.manual_seed(int(np.random.SeedSequence([int(noise_seed), *stream]).generate_state(1, np.uint64)[0] >> 1))
    return g


def gaussian(numel: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise in fp64 (fp32 rounding of the noise would be a known weakness; fp64 is the
    common practice and costs nothing at adapter size)."""
    return torch.randn(numel, generator=gen, dtype=torch.float64) * std


def client_noise_std(noise_multiplier: float, clip_norm: float, min_clients: int) -> float:
    """Distributed mode: the std each client adds, so that any ``min_clients`` contributions sum to at
    least the central noise std z*C."""
    return noise_multiplier * clip_norm / math.sqrt(min_clients)


def noisy_mean(clipped_sum: torch.Tensor, noise_std: float, expected_clients: float, gen: torch.Generator | None
               ) -> torch.Tensor:
    """(sum of clipped deltas + N(0, noise_std^2)) / E[m]; ``noise_std`` 0 (distributed mode: the sum
    already carries the noise) adds nothing."""
    s = clipped_sum.double()
    if noise_std > 0:
        s = s + gaussian(s.numel(), noise_std, gen)
    return s / expected_clients


def delta_noise_multiplier(z: float, count_stddev: float) -> float:
    """Adaptive clipping: the deltas' multiplier when the clipped count takes noise ``count_stddev``
    (Andrew et al. 2021, Thm 1): z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2). Raises ValueError when the
    count's noise is too small for z (the count would need more than the whole budget)."""
    if z <= 0:
        return 0.0
    rest = z ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"privacy.dp.count_stddev={count_stddev:g} is too small for noise_multiplier={z:g}: "
                         f"needs > {z / 2:g} (= z/2)")
    return rest ** -0.5


def next_clip(clip_norm: float, noisy_count: float, expected_clients: float, target_quantile: float,
              clip_lr: float) -> float:
    """Geometric update of the clip towards the target quantile of the update norms."""
    b = noisy_count / expected_clients
    return clip_norm * math.exp(-clip_lr * (b - target_quantile))
