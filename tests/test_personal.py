"""Personalization (``personal.mode``): real in-process runs (the production server loop and ``Worker`` over the
in-memory transport, the UNet prepared as the ranks prepare it).

- split: the personal adapter never travels (the uplink bytes are those of a run without it when it cannot
  move, and of the same size when it trains), it crosses rounds a client sits out and a resume bit for bit,
  ``fed-ddp generate --client`` reproduces what plain diffusers makes of the exported files;
- finetune: every client's adapter after local steps from the final global one;
- the per-client table global vs personal, and the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from fed_ddp.config import ConfigError, load_config

TINY = str(ROOT / "configs" / "tiny_test.yaml")
# 2 clients, one per round: each sits out some rounds; a personal lr that moves the personal adapter visibly
SPLIT = ("fed.num_clients=2", "fed.clients_per_round=1", "fed.rounds=4", "eval.images_per_prompt=2",
         "eval.inference_steps=2", "eval.sample_seeds=[0]", "lora.rank=2")


def _run(base: Path, out: Path, name: str, *overrides: str) -> tuple[Path, dict, list[torch.Tensor]]:
    """A finished in-process run; (its directory, summary, every uplink buffer the worker sent, in order)."""
    from fed_ddp.compression import layout_of
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline, quiet_libraries, training_scheduler
    from fed_ddp.protocol import wire_for
    from fed_ddp.server import run_server
    from fed_ddp.transport import InMemoryTransport
    from fed_ddp.worker import Worker

    quiet_libraries()
    torch.set_num_threads(1)
    cfg = load_config(TINY, [f"model.pretrained={base}", f"run.output_dir={out}", f"run.name={name}", *SPLIT,
                             *overrides])
    pipe = load_pipeline(str(base), torch.device("cpu"))
    prepare_trainable(pipe.unet, cfg)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    wire = wire_for(cfg, layout_of(pipe.unet), workers=1)
    worker = Worker(0, cfg, pipe, training_scheduler(pipe), data, wire)
    sent: list[torch.Tensor] = []

    def handle(head, body):
        up, sizes = worker.handle(head, body)
        sent.append(up.clone())
        return up, sizes

    summary = run_server(cfg, pipe, training_scheduler(pipe), data, InMemoryTransport([handle]), str(base),
                         wire=wire).to_json()  # as summary.json holds it
    return cfg.run.dir, summary, sent


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, tuple[Path, dict, list[torch.Tensor]]]:
    out = tmp_path_factory.mktemp("personal")
    return {"plain": _run(tiny_base, out, "plain"),
            "frozen": _run(tiny_base, out, "frozen", "personal.mode=split", "personal.lr=0"),
            "split": _run(tiny_base, out, "split", "personal.mode=split", "personal.lr=0.05")}


def _played(run_dir: Path) -> dict[int, list[int]]:
    """client -> the rounds it played."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, list[int]] = {}
    for r in rows:
        for c in (r.get("clients") or {}).get("arrived", []):
            out.setdefault(c, []).append(r["round"])
    return out


def _sent(buf: torch.Tensor) -> torch.Tensor:
    """An uplink message without its two timing fields (seconds differ from run to run): the encoded delta, the
    client id, its sample count and train loss."""
    from fed_ddp.protocol import UP_FIELDS

    return buf[:len(buf) - 4 * (len(UP_FIELDS) - UP_FIELDS.index("train_seconds"))]


def _plan(cfg, unet, rnd: int, steps: int):
    """The round plan as a client reads it from the downlink head (the lr travels as fp32)."""
    from fed_ddp.compression import layout_of
    from fed_ddp.protocol import Wire
    from fed_ddp.strategies import RoundPlan

    wire = Wire(cfg.comm, layout_of(unet))
    return wire.unpack_head(wire.pack_head(RoundPlan(round=rnd, local_steps=steps, lr=cfg.train.lr), 1)).plan


def test_the_personal_adapter_never_travels(runs):
    plain, frozen, split = (runs[k] for k in ("plain", "frozen", "split"))
    # a personal adapter that cannot move (lr 0, B = 0) leaves every uplink byte of the run without it as it was
    assert len(plain[2]) == len(frozen[2]) == 4
    assert all(torch.equal(_sent(a), _sent(b)) for a, b in zip(plain[2], frozen[2]))
    # one that trains changes what the shared adapter learns, never the size of what is sent
    assert [len(x) for x in split[2]] == [len(x) for x in plain[2]]
    assert not all(torch.equal(_sent(a), _sent(b)) for a, b in zip(plain[2], split[2]))
    assert split[1]["comm"]["air"] == plain[1]["comm"]["air"]
    assert split[1]["lora_parameters"] == plain[1]["lora_parameters"]
    # ... while it sits in the clients' state files, trained (B no longer zero)
    from fed_ddp.population import ClientStateStore

    store = ClientStateStore(split[0] / "clients")
    assert store.clients() == [0, 1]
    _, tensors, _ = store.load(0, max_round=99)
    b = [v for k, v in tensors.items() if k.startswith("personal|") and ".lora_B." in k]
    assert b and all(k.startswith("personal|") for k in tensors) and max(v.abs().max().item() for v in b) > 0


def test_personal_state_crosses_sat_out_rounds(runs, tiny_base):
    """A client's personal adapter of the last round it played is what it trained from when it came back: its
    newest state equals a by-hand replay of that round from the state before the gap and the global of the
    round before (independent of the worker's bookkeeping)."""
    from fed_ddp.checkpoint import load_state
    from fed_ddp.client import LocalTrainer, encode_set
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import personal_state, prepare_trainable, set_personal
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.population import ClientStateStore

    run_dir = runs["split"][0]
    played = _played(run_dir)
    gaps = {c: r for c, r in played.items() if len(r) >= 2 and r[-1] - r[-2] > 1}
    assert gaps, f"no client sat out a round between two it played: {played}"
    c, (before, last) = next((c, r[-2:]) for c, r in gaps.items())
    store = ClientStateStore(run_dir / "clients", cache_size=0)
    assert store.rounds(c) == [before, last]  # the newest file and the one before
    start = {k.removeprefix("personal|"): v for k, v in store.load_round(c, before)[0].items()}
    want = {k.removeprefix("personal|"): v for k, v in store.load_round(c, last)[0].items()}

    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(pipe.unet, cfg)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    trainer = LocalTrainer(pipe, training_scheduler(pipe), data.clients[c], cfg.train, cfg.run.seed,
                           encode_set(pipe, data.replay), cfg.data.replay_fraction, client_id=c,
                           personal_lr=cfg.personal.lr)
    set_personal(pipe.unet, start)
    trainer.fit(load_state(run_dir / "checkpoints" / f"round_{last - 1:04d}")["global"],
                _plan(cfg, pipe.unet, last, cfg.fed.local_steps))
    got = personal_state(pipe.unet)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(start[k], want[k]) for k in want)


def test_resume_is_bit_identical(runs, tiny_base, tmp_path):
    """Stop after round 2, resume to round 4: the global adapter, every client's personal state and the exported
    personal adapters equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from fed_ddp.checkpoint import load_state
    from fed_ddp.personal import client_dir

    full = runs["split"][0]
    part, _, _ = _run(tiny_base, tmp_path, "part", "personal.mode=split", "personal.lr=0.05", "fed.rounds=2")
    _run(tiny_base, tmp_path, "part", "personal.mode=split", "personal.lr=0.05", "run.resume=true")
    def same(a: Path, b: Path) -> bool:
        x, y = load_file(str(a)), load_file(str(b))
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    final = full / "checkpoints" / "final"
    assert torch.equal(load_state(final)["global"], load_state(part / "checkpoints" / "final")["global"])
    for c in (0, 1):
        name = "pytorch_lora_weights.safetensors"
        assert same(client_dir(final, c) / name, client_dir(part / "checkpoints" / "final", c) / name)
        files = sorted((full / "clients" / f"client_{c:06d}").glob("round_*.safetensors"))
        assert len(files) == 2 and all(same(f, part / "clients" / f"client_{c:06d}" / f.name) for f in files)


def test_generate_client_matches_plain_diffusers(runs, tiny_base, tmp_path):
    """``fed-ddp generate --client k`` = global + client k's personal adapter, both at weight 1, as plain diffusers
    loads them from the exported files; different from the global alone; a client without one is one line."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from fed_ddp.cli import main
    from fed_ddp.images import save_grid
    from fed_ddp.personal import client_dir

    ckpt = runs["split"][0] / "checkpoints" / "final"
    prompt, args = "a handwritten digit seven", ["--seed", "3", "--steps", "4", "--num-images", "2"]
    assert main(["generate", str(ckpt), "--prompt", prompt, "--client", "1", "--out", str(tmp_path / "p.png"), *args]) == 0
    assert main(["generate", str(ckpt), "--prompt", prompt, "--out", str(tmp_path / "g.png"), *args]) == 0

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ckpt), adapter_name="shared")
    pipe.load_lora_weights(str(client_dir(ckpt, 1)), adapter_name="mine")
    pipe.set_adapters(["shared", "mine"], adapter_weights=[1.0, 1.0])
    imgs = pipe([prompt] * 2, num_inference_steps=4, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(3)).images
    save_grid(imgs[None], [prompt], tmp_path / "ref.png", cell=64)

    def px(name):
        return np.asarray(Image.open(tmp_path / name))

    assert np.array_equal(px("p.png"), px("ref.png"))
    assert not np.array_equal(px("p.png"), px("g.png"))


def test_generate_without_a_personal_adapter_is_one_line(runs, capsys):
    from fed_ddp.cli import main

    for run, client, why in (("plain", 0, "personal.mode=none"), ("split", 7, "clients with one: 0-1")):
        ckpt = runs[run][0] / "checkpoints" / "final"
        assert main(["generate", str(ckpt), "--prompt", "x", "--client", str(client)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--client={client}" in err and why in err, err


def test_evaluation_table_split(runs, caplog):
    """Per client: own digits (those it holds), global vs personal, others; the frozen personal adapter (B = 0)
    is the global model, so its figures are the global ones exactly (the pairing of seeds is right)."""
    from fed_ddp.personal import table

    split, frozen = runs["split"][1]["personal"], runs["frozen"][1]["personal"]
    part = json.loads((runs["split"][0] / "partition.json").read_text())
    for block in (split, frozen):
        assert block["mode"] == "split" and block["rank"] == 2 and set(block["clients"]) == {"0", "1"}
        for c, v in block["clients"].items():
            held = sorted(int(d) for d, n in part["clients"][int(c)]["label_counts"].items() if n)
            assert v["own_digits"] == held
            assert set(v) >= {"own_global", "own_personal", "others_global", "others_personal"}
        assert set(block["mean"]) == {"own_global", "own_personal", "others_global", "others_personal"}
        lines = table(block).splitlines()
        assert len(lines) == 2 + len(block["clients"]) + 1 and lines[-1].strip().startswith("mean")
    for v in frozen["clients"].values():
        assert v["own_personal"] == v["own_global"] and v["gen_acc_personal"] == {
            d: a for d, a in runs["frozen"][1]["final"]["gen_acc"].items() if int(d) in range(5, 10)}
    index = json.loads((runs["split"][0] / "checkpoints" / "final" / "personal" / "personal.json").read_text())
    assert index["mode"] == "split" and index["clients"] == [0, 1]


def test_finetune(tiny_base, tmp_path):
    """finetune: each client's adapter after personal.steps local steps from the final global adapter equals a
    by-hand run of those steps; generate --client loads it instead of the global one."""
    from fed_ddp.checkpoint import load_state
    from fed_ddp.cli import main
    from fed_ddp.client import LocalTrainer, encode_set
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import get_flat, load_adapter, prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.personal import client_dir
    from fed_ddp.strategies import RoundPlan

    run_dir, summary, _ = _run(tiny_base, tmp_path, "ft", "personal.mode=finetune", "personal.steps=2",
                               "fed.rounds=2")
    block = summary["personal"]
    assert block["mode"] == "finetune" and block["steps"] == 2 and set(block["clients"]) == {"0", "1"}
    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(pipe.unet, cfg)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    final = load_state(run_dir / "checkpoints" / "final")["global"]
    trainer = LocalTrainer(pipe, training_scheduler(pipe), data.clients[1], cfg.train, cfg.run.seed,
                           encode_set(pipe, data.replay), cfg.data.replay_fraction, client_id=1)
    delta, _ = trainer.fit(final, RoundPlan(round=cfg.fed.rounds + 1, local_steps=2, lr=cfg.train.lr))
    load_adapter(pipe.unet, client_dir(run_dir / "checkpoints" / "final", 1))
    assert torch.equal(get_flat(pipe.unet), final + delta) and delta.abs().max() > 0
    assert main(["generate", str(run_dir / "checkpoints" / "final"), "--prompt", "a handwritten digit five",
                 "--client", "1", "--steps", "2", "--out", str(tmp_path / "ft.png")]) == 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["personal.mode=mine"], "personal.mode='mine': must be one of"),
    (["personal.mode=split", "train.method=full", "train.lr=1e-3"], "needs train.method=lora"),
    (["personal.mode=finetune", "train.engine=deepspeed"], "needs train.engine=torch"),
    (["personal.mode=split", "fed.ranks_per_client=2"], "split needs fed.ranks_per_client=1"),
    (["personal.mode=split", "privacy.secagg=true"], "split does not run with privacy.secagg"),
    (["personal.rank=0"], "personal.rank"),
])
def test_bad_input_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(TINY, overrides)
    assert len(str(e.value).splitlines()) == 1


def test_what_split_accepts():
    """split with differential privacy (the personal adapter never leaves the client: clipping and noise act on
    the shared delta only) and with ffa_lora (only the shared A is frozen; the personal adapter is never averaged)."""
    from fed_ddp.compression import layout_of
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.tiny import build_pipeline
    from fed_ddp.lora_names import personal_named

    load_config(TINY, ["personal.mode=split", "fed.sampling=poisson", "fed.sample_rate=1.0",
                       "privacy.dp.noise_multiplier=1.0"])
    layouts = []
    for mode in ("none", "split"):
        torch.manual_seed(0)
        unet = build_pipeline().unet
        prepare_trainable(unet, load_config(TINY, [f"personal.mode={mode}", "fed.strategy=ffa_lora"]))
        layouts.append(layout_of(unet))
        if mode == "split":
            assert not any(p.requires_grad for n, p in unet.named_parameters() if ".lora_A.default." in n)
            assert all(p.requires_grad for _, p in personal_named(unet))
    assert layouts[0] == layouts[1] and all(".lora_B." in n for n, _ in layouts[0])


def test_scaffold_with_a_personal_adapter(tiny_base, tmp_path):
    """scaffold + split: the control variates correct the shared adapter only; each client's state file holds its
    c_i next to its personal adapter, and c stays the mean of the clients' c_i."""
    from fed_ddp.checkpoint import load_state
    from fed_ddp.population import ClientStateStore
    from fed_ddp.strategies.scaffold import CLIENT_CONTROL

    run, summary, sent = _run(tiny_base, tmp_path, "scaffold", "personal.mode=split", "personal.lr=0.05",
                              "fed.strategy=scaffold")
    final = load_state(run / "checkpoints" / "final")
    n = final["global"].numel()
    from fed_ddp.protocol import UP_TAIL_BYTES

    assert [len(buf) for buf in sent] == [8 * n + UP_TAIL_BYTES] * 4  # one client a round: [dx, dc], shared only
    store, total = ClientStateStore(run / "clients", 0), torch.zeros(n, dtype=torch.float64)
    for c in range(2):
        _, tensors, _ = store.load(c, max_round=10**6)
        assert tensors[CLIENT_CONTROL].shape == (n,)
        assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith("personal|") and ".lora_B." in k)
        total += tensors[CLIENT_CONTROL].double()
    torch.testing.assert_close(final["strategy"]["c"].double(), total / 2, rtol=0, atol=1e-6)
    assert set(summary["personal"]["clients"]) == {"0", "1"}
