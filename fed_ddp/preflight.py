"""What the launcher checks before any rank starts, each failure one line (a ConfigError naming the key).

``preflight(cfg)`` runs them all, cheapest first: the launch fits this machine, the base model and the
LoRA targets exist (the denoiser is built on the ``meta`` device: shapes, no weights), the data can be
partitioned (images decoded once here, bombs refused), the privacy target is reachable, and the
``eval.metrics`` networks load. The run
directory's own checks (``fed_ddp.rundir.check``) come last, in ``fed-ddp run``.
"""

from __future__ import annotations

from pathlib import Path

from fed_ddp.errors import ConfigError

LAYERS = ("Linear", "Conv2d", "Conv1d", "Embedding")  # what peft's LoRA wraps in a diffusers denoiser


def check_launch(cfg, cores: int) -> None:
    """A one-node launch by ``fed-ddp run`` on CPU: at most 4 ranks per core (and 16 whatever the core count);
    more would thrash. torchrun or SLURM, which give the world size themselves, are not bounded here."""
    limit = max(16, 4 * cores)
    if cfg.world_size > limit:
        raise ConfigError("fed.ranks_per_client" if cfg.fed.ranks_per_client > 1 else "fed.workers",
                          cfg.fed.ranks_per_client if cfg.fed.ranks_per_client > 1 else cfg.fed.num_workers,
                          f"would launch {cfg.world_size} ranks on this machine's {cores} CPU core(s) (at most "
                          f"{limit} here); launch larger worlds with torchrun or SLURM (docs/cluster.md)")


def check_model(cfg) -> list[str]:
    """``model.pretrained`` resolves, ``lora.targets`` names layers of its denoiser (as peft matches them: by
    full name or name suffix; entries that match nothing are returned as warnings, since a config's target
    list may cover several families, but a list matching nothing is refused), and the LoRA ranks are no
    larger than the targeted layers can hold."""
    from fed_ddp.diffusion.meta import denoiser_config, meta_denoiser

    pretrained = cfg.model.pretrained
    try:
        config, source, family = denoiser_config(cfg)
    except ConfigError as e:  # not a local folder, and a hub id that cannot be read (offline, unknown, malformed)
        if pretrained and not Path(pretrained).exists():
            raise ConfigError("model.pretrained", pretrained, f"no such folder ({Path(pretrained).absolute()}), "
                              f"and as a Hugging Face hub id: {e.allowed}") from None
        raise
    model = meta_denoiser(config, family)
    if cfg.train.method != "lora":
        return []
    from fed_ddp.diffusion.families import lookup

    targets = list(cfg.lora.targets) or list(lookup(family).default_targets)
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ in LAYERS}
    caps = {t: [_rank_cap(m) for n, m in layers.items() if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, hits in caps.items() if not hits]
    if len(missing) == len(targets):
        names = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ConfigError("lora.targets", targets, f"matches no layer of the {family} denoiser ({source}); its layer "
                          f"names include {', '.join(names[:12])}")
    cap = max(c for hits in caps.values() for c in hits)
    for key, rank in (("lora.rank", cfg.lora.rank), ("personal.rank", cfg.personal.rank)):
        if rank is not None and rank > cap:
            raise ConfigError(key, rank, f"exceeds the largest rank any targeted layer can hold ({cap}: the smaller "
                              "side of its weight): a higher rank adds parameters, not capacity")
    return [(f"lora.targets: {', '.join(map(repr, missing))} match no layer of the {family} denoiser ({source}); "
            "the other targets get adapters")] if missing else []


def _rank_cap(m) -> int:
    for a, b in (("in_features", "out_features"), ("in_channels", "out_channels"),
                 ("num_embeddings", "embedding_dim")):
        if hasattr(m, a):
            return min(getattr(m, a), getattr(m, b))
    return 0


def check_privacy(cfg) -> None:
    """Resolve the privacy settings (calibrating z to a target epsilon) in the launcher."""
    from fed_ddp.privacy.engine import resolve

    try:
        resolve(cfg)
    except ValueError as e:
        raise ConfigError("privacy", None, " ".join(str(e).split())) from None


def check_data(cfg) -> None:
    """Build the federated split in the launcher, so data errors are one line before any rank starts."""
    from fed_ddp.data.federated import build_federated_data

    if isinstance(cfg.fed.availability, str):
        from fed_ddp.population import read_trace

        try:
            read_trace(cfg.fed.availability, cfg.fed.num_clients)
        except (ValueError, OSError) as e:
            raise ConfigError("fed.availability", cfg.fed.availability, " ".join(str(e).split())) from None
    try:
        build_federated_data(cfg)
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError("data", None, f"cannot give {cfg.fed.num_clients} clients their data: "
                          f"{' '.join(str(e).split())}") from None


def check_metrics(cfg) -> None:
    """``eval.metrics``: the feature network loads and gives (N, D) features; the CLIP directory loads."""
    if cfg.eval.metrics:
        from fed_ddp.quality import check

        check(cfg)


def preflight(cfg, cores: int | None = None) -> list[str]:
    """Every launcher check of ``fed-ddp run``, before any rank starts; returns warnings to show."""
    if cores is not None:
        check_launch(cfg, cores)
    warnings = check_model(cfg)
    check_data(cfg)
    check_privacy(cfg)
    check_metrics(cfg)
    return warnings
