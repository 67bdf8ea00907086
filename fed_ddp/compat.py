"""What composes with what: every rule across config groups, in one table, checked once before any rank starts.

Each ``Rule`` says: when a feature is on (``when``), it needs something of another group (``needs``), and
why; ``check(cfg)`` raises the first broken rule as one ``ConfigError`` line naming the key and the value.
``RunConfig.__post_init__`` calls it, so ``load_config`` (and with it every launcher, ``plan``, ``compare`` and
the ranks) refuses a combination before anything runs. ``table()`` is the docs' table
(docs/compatibility.md, kept in step by a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fed_ddp.errors import ConfigError

STATEFUL = ("topk", "randomk", "blocktopk", "segtopk", "lowrank")  # codecs that keep an error-feedback residual


@dataclass(frozen=True)
class Rule:
    when: str  # the feature, as the docs print it
    needs: str  # what it needs, as the docs print it
    key: str  # the key the error names
    applies: Callable[[Any], bool]  # the feature is on
    ok: Callable[[Any], bool]  # what it needs holds
    value: Callable[[Any], Any]  # the value the error shows
    why: Callable[[Any], str]  # the rest of the error line

    def broken(self, cfg) -> bool:
        return self.applies(cfg) and not self.ok(cfg)


def _dp(c):
    return c.privacy.dp.enabled


SECAGG_LINEAR = ("fp16", "bf16", "int8", "int4")  # the uplinks secure aggregation re-encodes as masked fixed point


def _nonlinear(c) -> list[str]:
    """The uplink's codecs that secure aggregation cannot stand in for (transforms, and a plug-in's encoder)."""
    return [n for n in c.comm.uplink if n not in SECAGG_LINEAR]


def _cell_sampler(c):
    from fed_ddp.population.sampling import lookup

    return lookup(c.fed.sampling).needs_cell


def _ranks(c):
    return bool(c.lora.client_ranks)


def _scaffold(c):
    return c.fed.strategy == "scaffold"


def _personal(c):
    return c.personal.mode != "none"


def _split(c):
    return c.personal.mode == "split"


def _stateful(c) -> list[str]:
    return sorted(set(c.comm.uplink) & set(STATEFUL))


def _objective(c):
    from fed_ddp.objectives import lookup

    return lookup(c.train.objective)


def _taken(names) -> list[str]:
    from fed_ddp.protocol import UP_FIELDS
    from fed_ddp.results import RoundRecord

    reported = {*UP_FIELDS, *RoundRecord.__dataclass_fields__, "val_loss", "val_loss_base", "gen_acc",
                "gen_acc_clients", "gen_acc_base", "update_norm", "privacy", "empty_round", "round_rejected"}
    return [n for n in names if n in reported]


RULES: list[Rule] = [
    # the client's objective
    Rule("train.objective", "a model.family it is defined for", "train.objective",
         lambda c: _objective(c).families is not None, lambda c: c.model.family in _objective(c).families,
         lambda c: c.train.objective,
         lambda c: f"is defined for model.family {list(_objective(c).families)}, not {c.model.family!r}"),
    Rule("an objective that reports metrics", "names the round does not already report", "train.objective",
         lambda c: bool(_objective(c).metrics), lambda c: not _taken(_objective(c).metrics), lambda c: c.train.objective,
         lambda c: f"reports {_taken(_objective(c).metrics)[0]!r}, a name the round already reports: rename it"),
    Rule("an objective that reports metrics", "privacy.secagg=false", "train.objective",
         lambda c: bool(_objective(c).metrics), lambda c: not c.privacy.secagg, lambda c: c.train.objective,
         lambda c: "reports per-client metrics, which secure aggregation's masked messages do not carry"),
    Rule("train.objective=prior", "not deepspeed.zero_stage=3", "train.objective",
         lambda c: c.train.objective == "prior", lambda c: c.train.engine != "deepspeed" or c.deepspeed.zero_stage < 3,
         lambda c: c.train.objective,
         lambda c: "generates each client's class images with the frozen base on the client's ranks, whose weights "
                   "ZeRO-3 partitions: use deepspeed.zero_stage=2"),
    # differential privacy and secure aggregation
    Rule("differential privacy", "fed.sampling poisson or all", "fed.sampling", _dp,
         lambda c: c.fed.sampling in ("poisson", "all"), lambda c: c.fed.sampling,
         lambda c: "differential privacy needs poisson (each client joins independently with fed.sample_rate) or "
                   "all: the accountant's amplification by sampling assumes it"),
    Rule("differential privacy", "fed.aggregator=mean", "fed.aggregator", _dp,
         lambda c: c.fed.aggregator == "mean", lambda c: c.fed.aggregator,
         lambda c: "must be mean with differential privacy: clipping bounds each client, a robust aggregator would "
                   "select updates by their data"),
    Rule("privacy.dp.min_clients", "at most fed.num_clients", "privacy.dp.min_clients",
         lambda c: _dp(c) and c.privacy.dp.min_clients is not None,
         lambda c: c.privacy.dp.min_clients <= c.fed.num_clients, lambda c: c.privacy.dp.min_clients,
         lambda c: f"must be <= fed.num_clients={c.fed.num_clients}"),
    Rule("privacy.dp.adaptive_clip", "differential privacy", "privacy.dp.adaptive_clip",
         lambda c: c.privacy.dp.adaptive_clip, _dp, lambda c: True,
         lambda c: "needs differential privacy (noise_multiplier or target_epsilon): the clip is learnt from a "
                   "noised count"),
    Rule("privacy.dp.adaptive_clip", "privacy.secagg=false", "privacy.dp.adaptive_clip",
         lambda c: c.privacy.dp.adaptive_clip, lambda c: not c.privacy.secagg, lambda c: True,
         lambda c: "is not supported with privacy.secagg yet: the count of unclipped clients would have to travel "
                   "masked too"),
    Rule("privacy.dp.adaptive_clip", "privacy.dp.mode=central", "privacy.dp.adaptive_clip",
         lambda c: c.privacy.dp.adaptive_clip, lambda c: c.privacy.dp.mode == "central", lambda c: True,
         lambda c: "needs privacy.dp.mode=central"),
    Rule("privacy.secagg", "a linear uplink: [], fp16, bf16, int8 or int4", "comm.uplink",
         lambda c: c.privacy.secagg, lambda c: not _nonlinear(c), lambda c: list(c.comm.uplink),
         lambda c: f"{_nonlinear(c)[0]} is not linear: secure aggregation sums masked fixed-point vectors, so only "
                   "[], fp16, bf16, int8 or int4 compose with privacy.secagg"),
    Rule("privacy.secagg", "privacy.dp.clip_norm > 0", "privacy.dp.clip_norm",
         lambda c: c.privacy.secagg, lambda c: c.privacy.clip > 0, lambda c: c.privacy.dp.clip_norm,
         lambda c: "must be > 0 with privacy.secagg: clients clip before masking (the server cannot check a masked "
                   "update)"),
    Rule("privacy.secagg", "fed.aggregator=mean", "fed.aggregator",
         lambda c: c.privacy.secagg, lambda c: c.fed.aggregator == "mean", lambda c: c.fed.aggregator,
         lambda c: "must be mean with privacy.secagg: the server sees only the sum"),
    Rule("privacy.secagg_threshold", "at most the clients expected per round", "privacy.secagg_threshold",
         lambda c: c.privacy.secagg and c.privacy.secagg_threshold is not None,
         lambda c: c.privacy.secagg_threshold <= c.fed.expected_round_size, lambda c: c.privacy.secagg_threshold,
         lambda c: f"is larger than the round ({c.fed.expected_round_size:g} clients expected per round): no round "
                   "could be unmasked"),
    # the simulated cell
    Rule("a sampler of the simulated cell (best_channel, age)", "wireless.enabled", "fed.sampling", _cell_sampler,
         lambda c: c.wireless.enabled, lambda c: c.fed.sampling,
         lambda c: "reads the simulated cell's channels: set wireless.enabled=true"),
    Rule("a sampler of the simulated cell (best_channel, age)", "fed.clients_per_round", "fed.sampling",
         _cell_sampler, lambda c: c.fed.clients_per_round is not None, lambda c: c.fed.sampling,
         lambda c: "schedules fed.clients_per_round clients of the cell: set fed.clients_per_round (now null)"),
    Rule("wireless.enabled", "privacy.secagg=false", "wireless.enabled",
         lambda c: c.wireless.enabled, lambda c: not c.privacy.secagg, lambda c: True,
         lambda c: "the wireless simulation does not model secure aggregation's four exchanges yet; set "
                   "privacy.secagg=false or wireless.enabled=false"),
    # per-client LoRA ranks
    Rule("lora.client_ranks", "train.method=lora", "lora.client_ranks", _ranks,
         lambda c: c.train.method == "lora", lambda c: list(c.lora.client_ranks),
         lambda c: f"per-client LoRA ranks need train.method=lora (not {c.train.method})"),
    Rule("lora.client_ranks", "fed.strategy other than ffa_lora", "lora.client_ranks", _ranks,
         lambda c: c.fed.strategy != "ffa_lora", lambda c: list(c.lora.client_ranks),
         lambda c: "fed.strategy=ffa_lora freezes A and sends B whole: use fedavg (zero-padding) or flexlora (SVD "
                   "redistribution) with per-client ranks"),
    Rule("lora.client_ranks", "fed.strategy other than scaffold", "lora.client_ranks", _ranks,
         lambda c: not _scaffold(c), lambda c: list(c.lora.client_ranks),
         lambda c: "fed.strategy=scaffold's control variates cover the whole rank-r adapter: use fedavg "
                   "(zero-padding) or flexlora (SVD redistribution)"),
    Rule("lora.client_ranks", "no privacy (no clipping)", "lora.client_ranks", _ranks,
         lambda c: not c.privacy.clips, lambda c: list(c.lora.client_ranks),
         lambda c: "privacy (privacy.dp, privacy.secagg or clipping) clips, noises and masks one message size for "
                   "every client: set lora.client_ranks=[] or turn privacy off"),
    Rule("lora.client_ranks", "wireless.enabled=false", "lora.client_ranks", _ranks,
         lambda c: not c.wireless.enabled, lambda c: list(c.lora.client_ranks),
         lambda c: "the simulated cell (wireless.enabled) times one message size for every client: set "
                   "lora.client_ranks=[] or wireless.enabled=false"),
    Rule("lora.client_ranks", "fed.aggregator=mean", "lora.client_ranks", _ranks,
         lambda c: c.fed.aggregator == "mean", lambda c: list(c.lora.client_ranks),
         lambda c: f"fed.aggregator={c.fed.aggregator} would vote the components a low-rank client lacks down to "
                   "zero (its zero-padded adapter): needs fed.aggregator=mean"),
    Rule("lora.client_ranks", "personal.mode=none", "lora.client_ranks", _ranks,
         lambda c: not _personal(c), lambda c: list(c.lora.client_ranks),
         lambda c: "per-client ranks with a personal adapter "
                   f"(personal.mode={c.personal.mode}) are not supported yet: set personal.mode=none"),
    # LoRA-aware strategies
    Rule("fed.strategy=ffa_lora or flexlora", "train.method=lora", "fed.strategy",
         lambda c: c.fed.strategy in ("ffa_lora", "flexlora"), lambda c: c.train.method == "lora",
         lambda c: c.fed.strategy, lambda c: "aggregates LoRA factors: needs train.method=lora"),
    Rule("fed.strategy=flexlora", "a stateless uplink (no error feedback)", "fed.strategy",
         lambda c: c.fed.strategy == "flexlora", lambda c: not _stateful(c), lambda c: c.fed.strategy,
         lambda c: f"re-factorises A and B every round, so the clients' error-feedback residuals of {_stateful(c)} "
                   "would land in another basis: use a stateless uplink (fp16, int8, int4) or fed.strategy=fedavg"),
    Rule("fed.strategy=flexlora", "no privacy (no clipping)", "fed.strategy",
         lambda c: c.fed.strategy == "flexlora", lambda c: not c.privacy.clips, lambda c: c.fed.strategy,
         lambda c: "re-factorises the clients' own products: it cannot work on a clipped, noised or masked mean "
                   "(privacy); use fedavg or ffa_lora"),
    # personal adapters
    Rule("personal.mode", "train.method=lora", "personal.mode", _personal,
         lambda c: c.train.method == "lora", lambda c: c.personal.mode,
         lambda c: f"personal adapters are LoRA adapters: needs train.method=lora (not {c.train.method})"),
    Rule("personal.mode", "train.engine=torch", "personal.mode", _personal,
         lambda c: c.train.engine == "torch", lambda c: c.personal.mode,
         lambda c: "needs train.engine=torch (the personal adapter has an optimizer of its own, outside DeepSpeed's)"),
    Rule("personal.mode=split", "fed.ranks_per_client=1", "personal.mode", _split,
         lambda c: c.fed.ranks_per_client == 1, lambda c: c.personal.mode,
         lambda c: "split needs fed.ranks_per_client=1 (the personal adapter is trained and stored by one rank per "
                   "client)"),
    Rule("personal.mode=split", "privacy.secagg=false", "personal.mode", _split,
         lambda c: not c.privacy.secagg, lambda c: c.personal.mode,
         lambda c: "split does not run with privacy.secagg (its rounds carry no client state); use differential "
                   "privacy without secure aggregation, or personal.mode=finetune"),
    # SCAFFOLD
    Rule("fed.strategy=scaffold", "no privacy (no clipping)", "fed.strategy", _scaffold,
         lambda c: not c.privacy.clips, lambda c: "scaffold",
         lambda c: "control variates travel unclipped, unnoised and unmasked: privacy (privacy.dp, privacy.secagg or "
                   "clipping) does not compose with it; turn privacy off"),
    Rule("fed.strategy=scaffold", "train.engine=torch", "fed.strategy", _scaffold,
         lambda c: c.train.engine == "torch", lambda c: "scaffold",
         lambda c: "corrects gradients by hooks on the torch engine's parameters: needs train.engine=torch "
                   f"(not {c.train.engine})"),
    Rule("fed.strategy=scaffold", "fed.ranks_per_client=1", "fed.strategy", _scaffold,
         lambda c: c.fed.ranks_per_client == 1, lambda c: "scaffold",
         lambda c: "a client's control variate is the mean gradient it saw, one rank's: needs "
                   f"fed.ranks_per_client=1 (not {c.fed.ranks_per_client})"),
]


def check(cfg) -> None:
    """Raise the first broken rule (one ConfigError line)."""
    for rule in RULES:
        if rule.broken(cfg):
            raise ConfigError(rule.key, rule.value(cfg), rule.why(cfg))


def table() -> str:
    """The rules as the docs print them (docs/compatibility.md)."""
    rows = ["| when | it needs | the error names |", "| --- | --- | --- |"]
    rows += [f"| {r.when} | {r.needs} | `{r.key}` |" for r in RULES]
    return "\n".join(rows)
