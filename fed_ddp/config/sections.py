"""The config groups, one dataclass each: every field has a one-line comment, every group validates itself in
``__post_init__`` (rules across groups: ``fed_ddp.compat``). ``fed_ddp.config`` assembles them into ``RunConfig``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_ddp.errors import check, integer, one_of, positive, seed

_check, _one_of, _positive = check, one_of, positive


@dataclass(kw_only=True)
class RunSection:
    name: str = "quickstart"  # run directory is <output_dir>/<name>
    output_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # seeds data partitioning, model init, local training and sampling
    resume: bool = False  # continue from the run directory's latest checkpoint (the stored config must match)
    overwrite: bool = False  # replace an earlier run in the same directory (only what a run wrote; otherwise refused)
    max_restarts: int = 0  # fed-ddp run: restart every rank from the last complete round when one dies, up to N times
    log_level: str = "INFO"  # python logging level for all ranks
    plugins: list[str] = field(default_factory=list)  # modules or .py files imported first, by the launcher and every rank (docs/extending.md)
    callbacks: list[str] = field(default_factory=list)  # package.module:Name classes whose on_round_start/on_aggregate/on_round_end/on_checkpoint/on_finish run on the server (docs/extending.md)

    def __post_init__(self):
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", str(self.name))), "run.name", self.name,
               "must be a plain folder name: letters, digits and . _ = + -, not starting with '.' or '-'")
        _check(len(self.name) <= 128, "run.name", self.name[:40] + "...", f"is {len(self.name)} characters long: "
               "at most 128")
        _check(bool(str(self.output_dir).strip()), "run.output_dir", self.output_dir, "must name a folder")
        self.output_dir = os.path.expanduser(self.output_dir)  # the one path rule: ~ expands, relative to the cwd
        seed("run.seed", self.seed)
        _positive("run.max_restarts", self.max_restarts, zero_ok=True)
        _one_of("run.log_level", self.log_level, {"DEBUG", "INFO", "WARNING", "ERROR"})
        from fed_ddp.callbacks import lookup

        for spec in self.callbacks:  # each names a class with an event (run.plugins are imported by now)
            lookup(str(spec))

    @property
    def dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name


@dataclass(kw_only=True)
class PretrainSection:
    """How the built-in tiny base is made (used when ``model.pretrained`` is null)."""

    digits: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # concepts the base knows
    vae_steps: int = 300  # autoencoder training steps
    unet_steps: int = 1200  # denoiser + text encoder training steps
    batch_size: int = 64  # pretraining batch size
    lr: float = 2e-3  # AdamW learning rate
    empty_caption_fraction: float = 0.1  # share of captions dropped (classifier-free guidance)
    seed: int = 0  # pretraining seed (part of the cache key)

    def __post_init__(self):
        _check(bool(self.digits) and all(0 <= d <= 9 for d in self.digits), "model.tiny.digits",
               self.digits, "must be a non-empty list of digits 0..9")
        for k in ("vae_steps", "unet_steps", "batch_size"):
            _positive(f"model.tiny.{k}", getattr(self, k))
        _positive("model.tiny.lr", self.lr)
        _check(0 <= self.empty_caption_fraction < 1, "model.tiny.empty_caption_fraction",
               self.empty_caption_fraction, "must be in [0, 1)")
        seed("model.tiny.seed", self.seed)


@dataclass(kw_only=True)
class ModelSection:
    family: str = "sd"  # sd (SD 1.x/2.x), sdxl, sd3, flux / package.module:Name: pipeline class, LoRA module, prompt encoding, loss (docs/models.md)
    pretrained: str | None = None  # local diffusers pipeline directory or hub id; null = tiny base
    revision: str | None = None  # hub revision for `pretrained`
    cache_dir: str = "~/.cache/fed_ddp"  # where the built-in tiny base is cached
    tiny: PretrainSection = field(default_factory=PretrainSection)  # built-in base recipe

    def __post_init__(self):
        from fed_ddp.diffusion.families import REGISTRY, detect_family, lookup, pipeline_class_at, pipeline_classes

        fam = lookup(self.family)
        self.cache_dir = os.path.expanduser(self.cache_dir)
        if not self.pretrained:
            return
        if self.pretrained.startswith("~"):
            self.pretrained = os.path.expanduser(self.pretrained)
        p = Path(self.pretrained).expanduser()
        if p.exists() or self.pretrained.startswith((".", "/", "~")):  # a local path, not a hub id
            _check(p.is_dir() and (p / "model_index.json").exists(), "model.pretrained", self.pretrained,
                   "must be a diffusers pipeline directory (with model_index.json) or a hub id")
            found = detect_family(p)
            _check(pipeline_class_at(p) == fam.pipeline_class_name, "model.pretrained", self.pretrained,
                   f"holds a {found} pipeline ({REGISTRY[found].pipeline_class_name}): set model.family={found}"
                   if found else f"holds no pipeline fed_ddp trains (model_index.json names none of {pipeline_classes()})")


@dataclass(kw_only=True)
class LoraSection:
    rank: int = 4  # LoRA rank r
    alpha: float = 4.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # LoRA dropout
    targets: list[str] = field(default_factory=list)  # denoiser module names; empty = model.family's default targets (docs/models.md)
    client_ranks: list[int] = field(default_factory=list)  # heterogeneous ranks: client c trains and sends rank client_ranks[c % len] <= rank (device classes in turn); empty = every client at rank

    def __post_init__(self):
        integer("lora.rank", self.rank, 1, 4096)
        _positive("lora.alpha", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.rank for k in self.client_ranks),
               "lora.client_ranks", list(self.client_ranks),
               f"every client rank must be an integer in [1, lora.rank={self.rank}] (the global adapter's rank)")


PARTITIONS = ("iid", "dirichlet", "shards", "natural")


@dataclass(kw_only=True)
class DataSection:
    source: str = "digits"  # digits (built-in, scikit-learn) / imagefolder
    path: str | None = None  # imagefolder: one folder with metadata.jsonl, partitioned across clients
    client_dirs: list[str] = field(default_factory=list)  # imagefolder: one folder per client instead
    image_column: str = "file_name"  # imagefolder: the metadata field holding each image's path (relative to the folder)
    caption_column: str = "text"  # imagefolder: the metadata field holding each image's caption
    label_field: str = "text"  # metadata field that dirichlet/shards partition over ("text": the caption)
    client_column: str | None = None  # natural: the metadata field whose distinct values are the clients (one client per value, in sorted order)
    digits: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])  # digits: concepts the clients hold
    partition: str = "shards"  # iid / dirichlet / shards / natural (data.path: one client per distinct data.client_column value)
    dirichlet_alpha: float = 0.5  # dirichlet concentration (smaller = more skewed)
    shards_per_client: int = 2  # shards: label-sorted shards per client
    replay_fraction: float = 0.2  # share of each batch drawn from the base's concepts (anti-forgetting)
    val_fraction: float = 0.1  # held out for the server's validation loss
    resolution: int = 8  # imagefolder: images are resized to this square size

    def __post_init__(self):
        _one_of("data.source", self.source, {"digits", "imagefolder"})
        _one_of("data.partition", self.partition, set(PARTITIONS))
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _positive("data.shards_per_client", self.shards_per_client)
        _check(0 <= self.replay_fraction < 1, "data.replay_fraction", self.replay_fraction, "must be in [0, 1)")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(bool(self.digits) and all(0 <= d <= 9 for d in self.digits), "data.digits", self.digits,
               "must be a non-empty list of digits 0..9")
        integer("data.resolution", self.resolution, 8, 4096)
        if self.partition == "natural":
            _check(self.source == "imagefolder" and bool(self.path), "data.partition", self.partition,
                   "natural needs data.source=imagefolder with data.path (one folder whose metadata names the clients)")
            _check(bool(self.client_column), "data.client_column", self.client_column,
                   "data.partition=natural needs the metadata field whose values are the clients, e.g. owner")
        if self.path:
            self.path = os.path.expanduser(self.path)
        self.client_dirs = [os.path.expanduser(d) for d in self.client_dirs]
        if self.source == "imagefolder":
            _check(bool(self.path) != bool(self.client_dirs), "data.path", self.path,
                   "imagefolder needs exactly one of data.path or data.client_dirs")
            for key, folder in [("data.path", self.path)] + [("data.client_dirs", d) for d in self.client_dirs]:
                if folder:
                    _check(Path(folder).expanduser().is_dir(), key, folder, "folder does not exist")
                    _check((Path(folder).expanduser() / "metadata.jsonl").exists(), key, folder,
                           "folder has no metadata.jsonl (imagefolder layout: file_name, text)")


@dataclass(kw_only=True)
class FedSection:
    num_clients: int = 4  # population N: the data is partitioned over N clients (records, not processes)
    workers: int | None = None  # training ranks (or rank groups) W that play the sampled clients; null = min(N, clients_per_round, 8), and `fed-ddp run` on CPU launches at most one single-thread worker rank per core
    ranks_per_client: int = 1  # ranks per worker, training one client together (data parallel); world = 1 + workers * ranks_per_client
    clients_per_round: int | None = None  # uniform/weighted: m clients per round; null = all N
    sampling: str = "uniform"  # all / uniform (m without replacement) / poisson (each joins with sample_rate) / weighted (by data size) / best_channel, age (the simulated cell's: docs/wireless.md), or package.module:Name (a population.sampling.Sampler)
    sample_rate: float | None = None  # poisson: probability q that a client joins a round, in (0, 1]
    availability: Any = 1.0  # probability a client is reachable in a round, or a trace file (one 0/1 line per client)
    dropout_rate: float = 0.0  # simulated: probability a sampled client fails to report (seeded)
    client_cache: int = 32  # per worker: clients whose encoded data and state stay in memory (LRU)
    rounds: int = 5  # federated rounds
    local_steps: int = 50  # optimizer steps per client per round
    strategy: str = "fedavg"  # fedavg / fedprox / fedavgm (server momentum) / fedadam / fedadagrad / fedyogi (adaptive server optimizers) / ffa_lora (A frozen, B averaged: exact) / flexlora (products averaged, SVD to rank r) / scaffold (control variates against client drift)
    strategy_args: dict = field(default_factory=dict)  # the strategy's own settings (a plug-in's: its constructor's keyword parameters), e.g. fed.strategy_args.beta=0.9
    server_lr: float = 1.0  # fedavg/fedprox: step along the mean delta; fedavgm: step along the velocity; fedadam/fedadagrad/fedyogi: eta
    server_momentum: float = 0.9  # fedavgm: momentum beta of the server's velocity
    beta1: float = 0.9  # fedadam/fedadagrad/fedyogi: first moment decay
    beta2: float = 0.99  # fedadam/fedyogi: second moment decay (fedadagrad sums d² instead)
    tau: float = 1e-3  # fedadam/fedadagrad/fedyogi: adaptivity (epsilon in eta*m/(sqrt(v)+tau))
    proximal_mu: float = 0.01  # fedprox: weight of (mu/2)*‖w - w_global‖² in the client loss
    aggregator: str = "mean"  # mean (sample-weighted) / median / trimmed_mean (coordinate-wise) / clipped_mean (to the median norm)
    trim_fraction: float = 0.2  # trimmed_mean: share of the largest and of the smallest values dropped per coordinate
    max_update_norm: float = 0.0  # reject an update whose L2 norm exceeds this (0 = off)
    norm_factor: float = 10.0  # reject an update whose norm exceeds this x the round's median norm (0 = off)
    max_bad_rounds: int = 3  # stop the run after this many rounds in a row whose new global adapter is not finite
    round_timeout_s: float | None = None  # seconds every worker has to answer a round (names the silent ranks); null = 10x the first exchange per client slot, at least 60; 0 = off
    timeout_s: float = 1800.0  # collective timeout

    def __post_init__(self):
        from fed_ddp.population.sampling import REGISTRY as SAMPLERS
        from fed_ddp.population.sampling import lookup as sampler

        for k, hi in (("num_clients", 10 ** 7), ("ranks_per_client", 1024), ("rounds", 10 ** 6),
                      ("local_steps", 10 ** 7)):
            integer(f"fed.{k}", getattr(self, k), 1, hi)
        n = self.num_clients
        uses = sampler(str(self.sampling)).uses  # a registered name, or package.module:Name (registered by it)
        m = self.clients_per_round
        if m is not None:
            _check(isinstance(m, int) and 1 <= m <= n, "fed.clients_per_round", m,
                   f"must be an integer in [1, fed.num_clients={n}] (or null for all)")
            takers = " or ".join(k for k, c in SAMPLERS.items() if c.uses == "clients_per_round")
            _check(uses == "clients_per_round" or (self.sampling == "all" and m == n),
                   "fed.clients_per_round", m, f"applies to fed.sampling={takers}, not {self.sampling} "
                   "(set it to null)")
        if uses == "sample_rate":
            q = self.sample_rate
            _check(q is not None and 0 < q <= 1, "fed.sample_rate", q,
                   f"must be in (0, 1] with fed.sampling={self.sampling}")
        else:
            takers = " or ".join(k for k, c in SAMPLERS.items() if c.uses == "sample_rate")
            _check(self.sample_rate is None, "fed.sample_rate", self.sample_rate,
                   f"applies to fed.sampling={takers} only (sampling is {self.sampling}); set it to null")
        a = self.availability
        if isinstance(a, str):
            self.availability = a = os.path.expanduser(a)
            _check(Path(a).is_file(), "fed.availability", a, "trace file does not exist")
        else:
            _check(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1, "fed.availability", a,
                   "must be a probability in (0, 1] or a trace file (one line of 0/1 per client)")
        _check(0 <= self.dropout_rate < 1, "fed.dropout_rate", self.dropout_rate, "must be in [0, 1)")
        _check(self.workers is None or (isinstance(self.workers, int) and 1 <= self.workers <= n), "fed.workers",
               self.workers, f"must be an integer in [1, fed.num_clients={n}] (or null: min(N, clients_per_round, 8))")
        _positive("fed.client_cache", self.client_cache, zero_ok=True)
        from fed_ddp.strategies import lookup

        # the registry itself (no second list); package.module:Name imports and registers it
        lookup(self.strategy).check_plan_values(self.strategy)
        lookup(self.strategy).check_args(self.strategy, dict(self.strategy_args))
        _positive("fed.server_lr", self.server_lr)
        for k in ("beta1", "beta2", "server_momentum"):
            _check(0 <= getattr(self, k) < 1, f"fed.{k}", getattr(self, k), "must be in [0, 1)")
        _positive("fed.tau", self.tau)
        _positive("fed.proximal_mu", self.proximal_mu, zero_ok=True)
        from fed_ddp.strategies.robust import AGGREGATORS

        _one_of("fed.aggregator", self.aggregator, set(AGGREGATORS))
        _check(self.strategy != "scaffold" or self.aggregator == "mean", "fed.aggregator", self.aggregator,
               "fed.strategy=scaffold keeps the server's control variate the mean of the clients': needs "
               "fed.aggregator=mean")
        _check(self.strategy != "flexlora" or self.aggregator == "mean", "fed.aggregator", self.aggregator,
               "fed.strategy=flexlora averages the clients' LoRA products by weight: needs fed.aggregator=mean")
        _check(0 <= self.trim_fraction < 0.5, "fed.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        _positive("fed.max_update_norm", self.max_update_norm, zero_ok=True)
        _positive("fed.norm_factor", self.norm_factor, zero_ok=True)
        _positive("fed.max_bad_rounds", self.max_bad_rounds)
        if self.round_timeout_s is not None:
            _positive("fed.round_timeout_s", self.round_timeout_s, zero_ok=True)
        _positive("fed.timeout_s", self.timeout_s)

    @property
    def num_workers(self) -> int:
        """W: ``workers``, or min(N, clients per round, 8) when null."""
        if self.workers is not None:
            return self.workers
        return min(self.num_clients, self.clients_per_round or self.num_clients, 8)

    @property
    def expected_round_size(self) -> float:
        """Clients sampled per round on average (before availability and dropouts)."""
        from fed_ddp.population.sampling import sampler_of

        return sampler_of(self).expected_size()

    def idle_workers_warning(self) -> str | None:
        if self.num_workers > self.expected_round_size:
            return (f"fed.workers={self.num_workers} > {self.expected_round_size:g} clients per round: "
                    f"some workers will sit idle")
        return None


@dataclass(kw_only=True)
class TrainSection:
    method: str = "lora"  # lora (peft adapters on lora.targets) / full (every UNet weight trained and exchanged: FedAvg of the whole denoiser)
    engine: str = "torch"  # local training engine: torch / deepspeed
    batch_size: int = 32  # micro-batch per rank (a client's batch per step = batch_size * ranks_per_client * accumulation)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, more time)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) / no / bf16 / fp16
    num_threads: int = 1  # torch CPU threads per rank
    device: str = "auto"  # auto (cuda:<local_rank> when available) / cpu
    objective: str = "mse"  # the client's loss: mse (the family's own) / min_snr / noise_offset / prior / package.module:Name (fed_ddp/objectives.py)
    snr_gamma: float = 5.0  # min_snr: gamma in min(SNR(t), gamma) / SNR(t)
    noise_offset: float = 0.1  # noise_offset: scale of the per-example, per-channel offset added to the noise
    prior_prompts: list[str] = field(default_factory=list)  # prior: the class prompts each client draws its class images from
    prior_images: int = 8  # prior: class images per prompt, generated by each client with the frozen base
    prior_steps: int = 20  # prior: inference steps of those images
    prior_loss_weight: float = 1.0  # prior: weight of the class images' loss

    def __post_init__(self):
        from fed_ddp.objectives import lookup

        lookup(self.objective)  # a registered name, or package.module:Name (run.plugins are imported by now)
        _positive("train.snr_gamma", self.snr_gamma)
        _positive("train.noise_offset", self.noise_offset, zero_ok=True)
        _check(self.objective != "prior" or bool(self.prior_prompts), "train.prior_prompts", list(self.prior_prompts),
               "train.objective=prior needs the class prompts its class images are drawn from, "
               "e.g. train.prior_prompts=['a handwritten digit zero']")
        integer("train.prior_images", self.prior_images, 1, 100000)
        integer("train.prior_steps", self.prior_steps, 1, 10000)
        _positive("train.prior_loss_weight", self.prior_loss_weight, zero_ok=True)
        _one_of("train.method", self.method, {"lora", "full"})
        _one_of("train.engine", self.engine, {"torch", "deepspeed"})
        integer("train.batch_size", self.batch_size, 1, 65536)
        integer("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 65536)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, zero_ok=True)
        _positive("train.max_grad_norm", self.max_grad_norm, zero_ok=True)
        _one_of("train.mixed_precision", self.mixed_precision, {"auto", "no", "bf16", "fp16"})
        integer("train.num_threads", self.num_threads, 1, 1024)
        _one_of("train.device", self.device, {"auto", "cpu"})


@dataclass(kw_only=True)
class DeepSpeedSection:
    """Used when ``train.engine=deepspeed``; presets in configs/deepspeed/."""

    zero_stage: int = 2  # ZeRO stage 0 / 1 / 2 / 3
    offload_optimizer: bool = False  # optimizer states (and fp32 master) in CPU memory
    offload_params: bool = False  # ZeRO-3 only: parameters in CPU memory
    config: dict = field(default_factory=dict)  # raw DeepSpeed config keys, merged last (advanced)

    def __post_init__(self):
        _one_of("deepspeed.zero_stage", self.zero_stage, {0, 1, 2, 3})
        _check(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params", self.offload_params,
               "needs deepspeed.zero_stage=3")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
               self.offload_optimizer, "needs deepspeed.zero_stage >= 1")


QUALITY_METRICS = ("fid", "kid", "clip_score")


@dataclass(kw_only=True)
class FidSection:
    weights: str | None = None  # fid/kid: a local TorchScript file of the feature network, e.g. NVIDIA's inception-2015-12-05.pt (docs/evaluation.md)
    image_size: int = 0  # fid/kid: resize images bilinearly to this square size before the network (0: as they are; NVIDIA's Inception resizes to 299 itself)

    def __post_init__(self):
        if self.weights:
            self.weights = os.path.expanduser(self.weights)
            _check(Path(self.weights).is_file(), "eval.fid.weights", self.weights, "no such file: expected a "
                   "TorchScript feature network, e.g. NVIDIA's inception-2015-12-05.pt (docs/evaluation.md)")
        integer("eval.fid.image_size", self.image_size, 0, 4096)


@dataclass(kw_only=True)
class ClipSection:
    model: str | None = None  # clip_score: a local transformers CLIP directory (CLIPModel + CLIPProcessor files), e.g. a saved openai/clip-vit-base-patch32

    def __post_init__(self):
        if self.model:
            self.model = os.path.expanduser(self.model)
            _check((Path(self.model) / "config.json").is_file(), "eval.clip.model", self.model,
                   "must be a local CLIP directory (config.json, model weights, tokenizer and preprocessor files: "
                   "what CLIPModel/CLIPProcessor.save_pretrained write)")


@dataclass(kw_only=True)
class EvalSection:
    every: int = 1  # validation loss and sample grid every N rounds (and always after the last)
    accuracy_every: int = 0  # generation accuracy every N rounds (0 = only base and final)
    images_per_prompt: int = 50  # generated images per digit for generation accuracy
    inference_steps: int = 25  # DDIM steps when sampling
    guidance_scale: float = 1.0  # classifier-free guidance (1.0 = off)
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # fixed seeds of sample grids
    prompts: list[str] = field(default_factory=list)  # sample grid prompts (empty: one per digit)
    num_threads: int = 0  # CPU threads of the server's evaluation (the workers wait meanwhile); 0 = every core
    merge_lora: bool = True  # evaluate with the LoRA adapter merged into the base weights (one matmul per layer: 1.5x faster sampling; the base weights are restored bit for bit)
    cache_base: bool = True  # reuse the base model's evaluation (round 0) from model.cache_dir when the same base was evaluated with the same settings (deterministic: same numbers)
    metrics: list[str] = field(default_factory=list)  # image quality at the final evaluation: fid / kid (eval.fid.weights) / clip_score (eval.clip.model), pooled and per client (docs/evaluation.md)
    metrics_every: int = 0  # eval.metrics also every N rounds (0 = final only)
    metrics_images: int = 32  # eval.metrics: real images per set (pooled validation, each client), and as many generated from their captions
    metrics_clients: int = 16  # eval.metrics: per-client figures for clients 0..K-1 (0 = pooled only)
    fid: FidSection = field(default_factory=FidSection)  # the FID/KID feature network
    clip: ClipSection = field(default_factory=ClipSection)  # the CLIP score model

    def __post_init__(self):
        _positive("eval.every", self.every)
        _positive("eval.accuracy_every", self.accuracy_every, zero_ok=True)
        integer("eval.images_per_prompt", self.images_per_prompt, 1, 10_000)
        integer("eval.inference_steps", self.inference_steps, 1, 1000)
        _check(1 <= len(self.sample_seeds) <= 64, "eval.sample_seeds", list(self.sample_seeds),
               "must list 1 to 64 seeds (one sample grid column each)")
        for s in self.sample_seeds:
            seed("eval.sample_seeds", s)
        _check(len(self.prompts) <= 64, "eval.prompts", f"{len(self.prompts)} prompts", "at most 64 (grid rows)")
        for p in self.prompts:
            _check(isinstance(p, str) and 0 < len(p) <= 500, "eval.prompts", p[:40] + ("..." if len(p) > 40 else ""),
                   "each prompt must be 1 to 500 characters (a grid row's label)")
        _positive("eval.guidance_scale", self.guidance_scale)
        integer("eval.num_threads", self.num_threads, 0, 1024)
        for m in self.metrics:
            _one_of("eval.metrics", m, set(QUALITY_METRICS))
        _check(len(set(self.metrics)) == len(self.metrics), "eval.metrics", list(self.metrics), "lists a metric twice")
        _check(not {"fid", "kid"} & set(self.metrics) or bool(self.fid.weights), "eval.fid.weights", None,
               f"eval.metrics={list(self.metrics)} needs the feature network: a local TorchScript file, e.g. NVIDIA's "
               "inception-2015-12-05.pt (docs/evaluation.md)")
        _check("clip_score" not in self.metrics or bool(self.clip.model), "eval.clip.model", None,
               "eval.metrics=[clip_score] needs a local CLIP directory (CLIPModel/CLIPProcessor.save_pretrained)")
        integer("eval.metrics_every", self.metrics_every, 0, 10 ** 6)
        integer("eval.metrics_images", self.metrics_images, 2, 100_000, " (FID and KID need 2 images per set)")
        integer("eval.metrics_clients", self.metrics_clients, 0, 10 ** 7)


PERSONAL_MODES = ("none", "split", "finetune")


@dataclass(kw_only=True)
class PersonalSection:
    mode: str = "none"  # none / split (each client also trains a personal LoRA adapter, kept on the client, never sent) / finetune (local steps per client from the final global adapter)
    rank: int | None = None  # split: the personal adapter's rank (on lora.targets, same scale alpha/r as the shared one); null = lora.rank
    steps: int | None = None  # finetune: local steps per client after the last round; null = fed.local_steps
    lr: float | None = None  # the personal adapter's AdamW learning rate; null = train.lr

    def __post_init__(self):
        _one_of("personal.mode", self.mode, set(PERSONAL_MODES))
        if self.rank is not None:
            _positive("personal.rank", self.rank)
        if self.steps is not None:
            _positive("personal.steps", self.steps)
        if self.lr is not None:
            _positive("personal.lr", self.lr, zero_ok=True)


@dataclass(kw_only=True)
class WandbSection:
    mode: str = "disabled"  # online / offline / disabled
    project: str = "fed_ddp"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    group: str | None = None  # W&B group (scaling studies)
    tags: list[str] = field(default_factory=list)  # W&B tags

    def __post_init__(self):
        _one_of("tracking.wandb.mode", self.mode, {"online", "offline", "disabled"})


@dataclass(kw_only=True)
class TrackingSection:
    wandb: WandbSection = field(default_factory=WandbSection)  # Weights & Biases
    progress: bool = True  # progress bar over rounds on the server
