"""The admission stage: which decoded updates the strategy aggregates.

Without privacy, ``screen`` rejects non-finite, misshapen, over-claimed or outsized updates (against the
round's median norm, or the last such median when a lone update is left). Under ``privacy`` clipping
replaces screening (a screen by the round's median norm would select by others' data): the updates, or
secure aggregation's unmasked sum, become one update holding the round's private mean delta.
"""

from __future__ import annotations

import logging

import torch

from fed_ddp.checkpoint import latest_checkpoint
from fed_ddp.strategies import ClientUpdate, screen
from fed_ddp.strategies.robust import lower_median

log = logging.getLogger("fed_ddp.server")


class BadRounds:
    """Rounds in a row that produced no usable adapter; ``fed.max_bad_rounds`` of them stop the run."""

    def __init__(self, limit: int, run_dir):
        self.limit, self.run_dir, self.count = limit, run_dir, 0

    def good(self) -> None:
        self.count = 0

    def bad(self, what: str, advice: str = "") -> None:
        self.count += 1
        if self.count >= self.limit:
            raise RuntimeError(f"{self.count} rounds in a row {what} (fed.max_bad_rounds={self.limit}); the last good "
                               f"adapter is in {latest_checkpoint(self.run_dir)}{advice}")


class Admission:
    def __init__(self, fed, num_params: int, sizes, setup, privacy, bad_rounds: BadRounds):
        self.fed, self.num_params, self.sizes = fed, num_params, sizes
        self.setup, self.privacy, self.bad_rounds = setup, privacy, bad_rounds
        self.norm_ref: float | None = None  # median update norm of the last round with two or more kept updates

    def __call__(self, rnd: int, chosen, got) -> tuple[list[ClientUpdate], list[ClientUpdate], dict]:
        """(what the strategy aggregates, the clients whose contribution is in it, the round's privacy metrics);
        rejections are added to ``got.rejected``."""
        if self.privacy is None:
            kept, why = screen(got.updates, self.num_params, self.sizes, self.fed.max_update_norm,
                               self.fed.norm_factor, self.norm_ref)
            if len(kept) >= 2:  # the yardstick for rounds with a single update left
                self.norm_ref = lower_median([float(u.delta.double().norm()) for u in kept])
            got.rejected.update(why)
            return kept, kept, {}
        return self._private(rnd, chosen, got)

    def _private(self, rnd: int, chosen, got) -> tuple[list[ClientUpdate], list[ClientUpdate], dict]:
        setup, privacy, outcome = self.setup, self.privacy, got.outcome
        expected = setup.q * chosen.reachable if setup.dp else None
        if outcome is None:  # the server sees each decoded update (non-finite ones are rejected there)
            mean, why, metrics = privacy.combine_updates({u.client_id: u.delta for u in got.updates}, expected, rnd)
            got.rejected.update(why)
            kept = [u for u in got.updates if u.client_id not in why]
        else:
            kept, mean, metrics = self._unmasked(rnd, outcome, expected)
        if "epsilon" in metrics:
            log.info("round %d: epsilon = %.4g (delta = %g) after %d noised rounds", rnd, metrics["epsilon"],
                     setup.delta, len(privacy.accountant.steps))
        inputs = [ClientUpdate(-1, mean, 1)] if mean is not None else []
        return inputs, kept, metrics

    def _unmasked(self, rnd: int, outcome, expected) -> tuple[list[ClientUpdate], torch.Tensor | None, dict]:
        """Secure aggregation's sum, if it can be used: bounded by what its clipped updates allow."""
        kept, mean, metrics = [], None, {"clip": self.privacy.clip, "contributions": 0}
        if outcome.failure:
            log.warning("round %d: secure aggregation: %s: round not applied", rnd, outcome.failure)
            metrics["not_applied"] = outcome.failure
            if outcome.failure.startswith("unmasking failed"):  # a lying client, not a shortage of clients
                metrics["bad_round"] = True
                self.bad_rounds.bad("whose secure aggregation could not be unmasked")
        else:
            norm, bound = float(outcome.total.norm()), self.privacy.sum_bound(outcome.used, outcome.step)
            if norm > bound:  # a client masked something it should not have: the sum is all the server has
                if self.setup.dp and self.setup.mode == "distributed":  # the server saw a noised sum: spent
                    self.privacy.record(rnd)
                metrics["not_applied"] = f"unmasked sum's norm {norm:.4g} > {bound:.4g} ({outcome.used} clipped updates)"
                log.warning("round %d: secure aggregation: %s: round not applied", rnd, metrics["not_applied"])
                metrics["bad_round"] = True
                self.bad_rounds.bad("whose unmasked sum was out of bounds")
            else:
                mean, metrics = self.privacy.combine_sum(outcome.total, outcome.used, expected, rnd)
                kept = [ClientUpdate(c, torch.empty(0), 0) for c in outcome.survivors]
        metrics["secagg"] = {"roster": len(outcome.roster), "survivors": len(outcome.survivors),
                             "recovered_dropouts": len(outcome.roster) - len(outcome.survivors),
                             "steps": outcome.steps}
        return kept, mean, metrics
