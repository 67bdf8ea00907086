"""``fed-ddp plan``: what a run will send, byte for byte, before anything runs or downloads.

    fed-ddp plan configs/quickstart.yaml comm.uplink=[topk,int8] comm.downlink=[fp16]
    fed-ddp plan configs/quickstart.yaml --unet sd15 lora.rank=4 "lora.targets=[to_q,to_k,to_v,to_out.0]"
    fed-ddp plan configs/flux_lora_deepspeed.yaml lora.rank=16      # Flux.1 [dev] at real size, offline
    fed-ddp plan configs/quickstart.yaml --denoiser sdxl "lora.targets=[]"   # SDXL's UNet, its default targets
    fed-ddp plan configs/population.yaml fed.num_clients=100000    # bytes per round, memory and disk at that size

The denoiser (the family's UNet or transformer) is built from its config on the ``meta`` device (shapes, no
weights: Flux's 12 B parameters cost no memory), LoRA is attached by peft exactly as in training, and the
configured codec chains encode a zero adapter of that layout on the CPU: the sizes printed are those of real
messages (they never depend on the data). Denoiser config: ``--denoiser`` (alias ``--unet``: a name shipped in
``fed_ddp/diffusion/configs``, a ``config.json`` or a model directory; it sets ``model.family`` to its own),
else ``model.pretrained`` (``<dir>/unet/config.json`` or ``<dir>/transformer/config.json`` by family; the
known hub ids read their shipped config, others the hub), else the family's built-in tiny base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fed_ddp.compression import ByteCount, ChainState, CodecChain, CommConfig, layout_of
from fed_ddp.config import ConfigError, RunConfig, load_config
from fed_ddp.diffusion.meta import (  # noqa: F401  (re-exported: plan's callers and tests)
    BUILTIN_DENOISERS,
    KNOWN_HUB_IDS,
    UNET_CONFIGS,
    denoiser_config,
    meta_denoiser,
    meta_unet,
    read_denoiser,
    unet_config,
)
from fed_ddp.protocol import ControlWire, wire_for


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Direction:
    chain: CodecChain
    message: ByteCount  # the codec message (adapter), as sent
    header: int  # protocol fields around it (fp32), counted as metadata

    @property
    def total(self) -> ByteCount:
        return self.message + ByteCount(0, self.header)


@dataclass
class Plan:
    unet_source: str
    unet_parameters: int
    lora_parameters: int
    lora_tensors: int
    rounds: int
    clients: int  # population N
    up: Direction
    down: Direction
    per_round: float = 0.0  # clients per round (expected, before availability and dropouts)
    workers: int = 1
    sampling: str = "all"
    state_bytes: int = 0  # one client's state on disk (codec residuals and warm starts), 0 if it keeps none
    client_cache: int = 0
    cluster_down: int = 0  # bytes the downlink broadcasts deliver per round (head + body, every worker)
    cluster_up: int = 0  # bytes the uplink gather moves per round (native gather: padded to the fullest worker)
    method: str = "lora"  # train.method: what the flat vector holds
    family: str = "sd"  # model.family
    denoiser: str = "UNet2DConditionModel"  # the denoiser's class

    @property
    def dense_lora_bytes(self) -> int:
        return 4 * self.lora_parameters

    @property
    def full_unet_bytes(self) -> int:
        return 4 * self.unet_parameters


def make_plan(cfg: RunConfig, comm: CommConfig, denoiser: str | None = None) -> Plan:
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.models import quiet_libraries

    quiet_libraries()
    config, source, family = denoiser_config(cfg, denoiser)
    model = meta_denoiser(config, family)
    base = sum(p.numel() for p in model.parameters())
    prepare_trainable(model, cfg)
    layout = layout_of(model)
    f = cfg.fed
    w = wire_for(cfg, layout, f.num_workers, comm)  # the chains and sizes training will use
    state = ChainState()
    w.up.encode(torch.zeros(w.up.numel), state)  # a real encode fills the state a client keeps, at real sizes
    state_bytes = sum(t.numel() * t.element_size() for t in state.to_tensors()[0].values())
    if isinstance(w, ControlWire):  # scaffold: each client also keeps its c_i
        state_bytes += 4 * w.num_params  # fp32
    m = f.expected_round_size
    slots = math.ceil(m / f.num_workers)
    gather_up = (f.num_workers * slots if comm.gather == "gather" else m) * w.up_nbytes
    return Plan(source, base, w.num_params, len(layout), f.rounds, f.num_clients,
                Direction(w.up, w.up.wire_bytes, w.up_tail), Direction(w.down, w.down.wire_bytes, w.plan_bytes),
                per_round=m, workers=f.num_workers, sampling=f.sampling, state_bytes=state_bytes,
                client_cache=f.client_cache, cluster_down=f.num_workers * (w.head_nbytes + w.body_nbytes(slots)),
                cluster_up=round(gather_up), method=cfg.train.method, family=family, denoiser=type(model).__name__)


def _ratio(dense: int, sent: int) -> str:
    r = dense / sent
    return f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x"


def _chain_line(d: Direction, comm: CommConfig) -> str:
    ch = d.chain
    params = []
    names = set(ch.names)
    if names & {"topk", "randomk", "blocktopk", "segtopk"}:
        params.append(f"topk_fraction {comm.topk_fraction}")
    if names & {"blocktopk", "segtopk"}:
        params.append(f"topk_block {comm.topk_block}")
    if "lowrank" in names:
        params.append(f"lowrank_rank {comm.lowrank_rank}")
    if names & {"int8", "int4"}:
        params.append(f"block_size {comm.block_size}, {'stochastic' if comm.stochastic_rounding else 'nearest'} "
                      "rounding")
    if ch.error_feedback:
        params.append("error feedback")
    done = sum(ch.compresses(i) for i in range(len(ch.layout)))
    extra = f" ({', '.join(params)})" if params else ""
    small = "" if not ch.codecs else f"; {done}/{len(ch.layout)} tensors through it (min_numel {comm.min_numel})"
    return f"{ch.describe()}{extra}{small}"


def format_plan(p: Plan, comm: CommConfig) -> str:
    lines = [
        (f"denoiser  {p.denoiser} (model.family={p.family}) from {p.unet_source}, built on the meta device: "
         f"{p.unet_parameters:,} parameters"),
        (f"{'trained' if p.method == 'full' else 'LoRA':10s}{p.lora_parameters:,} trainable parameters in "
         f"{p.lora_tensors} tensors{' (train.method=full: every denoiser weight)' if p.method == 'full' else ''} "
         f"({p.dense_lora_bytes:,} B as fp32)"),
        f"uplink    {_chain_line(p.up, comm)}",
        f"downlink  {_chain_line(p.down, comm)}",
        "",
        (f"{'bytes per client per round':28s}{'payload':>18s}{'metadata':>14s}{'total':>18s}"
         f"{'vs dense LoRA':>15s}{'vs full model':>14s}"),
    ]
    for name, d in (("uplink", p.up), ("downlink", p.down)):
        t = d.total
        lines.append(f"  {name:26s}{t.payload:18,}{t.metadata:14,}{t.total:18,}"
                     f"{_ratio(p.dense_lora_bytes, t.total):>15s}{_ratio(p.full_unet_bytes, t.total):>14s}")
    n = p.rounds * p.per_round
    lines.append(f"totals over the air, {p.rounds} rounds x {p.per_round:g} clients")
    for name, ts in (("uplink", [p.up.total]), ("downlink", [p.down.total]), ("both", [p.up.total, p.down.total])):
        one = sum(ts, ByteCount())
        t = ByteCount(round(one.payload * n), round(one.metadata * n))
        dense = len(ts) * n
        lines.append(f"  {name:26s}{t.payload:18,}{t.metadata:14,}{t.total:18,}"
                     f"{_ratio(dense * p.dense_lora_bytes, t.total):>15s}{_ratio(dense * p.full_unet_bytes, t.total):>14s}")
    lines += _population_lines(p)
    lines += [
        "",
        (f"metadata includes the protocol's fields ({p.up.header} B up, {p.down.header} B down). "
         "'vs' columns: how many times fewer bytes than dense fp32."),
("Sizes are known to both ends from the round's table, so no size travels; with comm.gather=gather the "
         "uplink pads every worker to the fullest one, with p2p it moves exactly the messages."),
    ]
    return "\n".join(lines)


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def _population_lines(p: Plan) -> list[str]:
    """Population N, workers, per-round cluster bytes; memory that does not grow with N; disk that does."""
    m, n = p.per_round, p.clients
    ever = n * (1 - (1 - min(1.0, m / n)) ** p.rounds)  # expected distinct clients after R uniform rounds
    adapter = p.dense_lora_bytes
    lines = [
        "",
        (f"population {n:,} clients, {p.sampling} sampling, {m:g} per round (expected) on {p.workers} worker(s); "
         f"per round in the cluster{'' if p.sampling in ('all', 'uniform') else ' (expected)'}: "
         f"down {p.cluster_down:,} B (broadcast to every worker), up {p.cluster_up:,} B (gather)"),
        (f"memory, flat in N: server holds the round's decoded updates, {m:g} x {_mb(adapter)} = {_mb(m * adapter)} "
         f"(plus the gathered messages; one int32 per client records when it last played); "
         f"each worker caches at most {min(p.client_cache, n)} clients' encoded data and state"
         + (f" ({_mb(min(p.client_cache, n) * p.state_bytes)} of state)" if p.state_bytes else "")),
    ]
    if p.state_bytes:
        lines.append(f"disk: {_mb(p.state_bytes)} per client that ever took part (codec residuals, kept twice "
                     f"across a round: up to {_mb(2 * p.state_bytes)}); after {p.rounds} rounds about {ever:,.0f} "
                     f"clients = {_mb(2 * ever * p.state_bytes)} under clients/, "
                     f"plus {p.rounds + 1} checkpoints of {_mb(2 * adapter)}")
    else:
        lines.append(f"disk: clients keep no state with this uplink chain; {p.rounds + 1} checkpoints of "
                     f"{_mb(2 * adapter)}")
    return lines


def main(args) -> int:
    """``fed-ddp plan CONFIG [key=value ...] [--denoiser NAME|PATH] [--wireless]`` (called by ``fed_ddp.cli``)."""
    from fed_ddp.config import split_args

    files, overrides = split_args([args.config, *args.overrides])
    if args.denoiser:  # the denoiser says which family it is (its default targets follow); an explicit override wins
        overrides = [f"model.family={read_denoiser(args.denoiser)[2]}", *overrides]
    cfg = load_config(files, overrides)
    plan = make_plan(cfg, cfg.comm, args.denoiser)
    from fed_ddp.privacy.report import plan_lines

    try:
        privacy = plan_lines(cfg, plan.lora_parameters)
    except ValueError as e:  # an unreachable target epsilon, a count noise too small for z
        raise ConfigError("privacy", None, " ".join(str(e).split())) from None
    lines = [format_plan(plan, cfg.comm), *privacy]
    if args.wireless:
        from fed_ddp.wireless.plan import plan_lines as wireless_lines

        if plan.family != "sd":  # its FLOP count runs an SD UNet forward (one text state, no added conditioning)
            raise ConfigError("--wireless", None, f"models SD 1.x/2.x UNets only, not model.family={plan.family}")
        config, _ = unet_config(cfg, args.denoiser)
        lines += wireless_lines(cfg, config)
    print("\n".join(lines))
    return 0
