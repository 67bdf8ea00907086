"""User code on every rank (``run.plugins``), a strategy built from ``fed.strategy_args``, callbacks on the server
(``run.callbacks``) and the Python API (``fed_ddp.run``): a strategy and a callback in a file outside the package,
run through ``fed-ddp run`` (1 server + 2 gloo workers) and in-process, checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("registries_restored")  # the plug-ins registered here stay here

TINY = str(ROOT / "configs" / "tiny_test.yaml")
BETA, SERVER_LR = 0.5, 0.8

EXAMPLE = ROOT / "examples" / "fedema.py"  # the shipped examples, as a user names them
PROBES, RECORDER = ROOT / "examples" / "probes.py", ROOT / "tests" / "recorder_callback.py"
SAMPLER = ROOT / "examples" / "round_robin.py"  # 4 clients, 2 a round in turn: {0, 1}, then {2, 3}
ANNEAL = ROOT / "examples" / "annealed_offset.py"  # a strategy's plan value, used by the clients' objective
CODEC, BLOCK = ROOT / "examples" / "sign_codec.py", 32  # the uplink: 1-bit signs + a scale per 32 values


@pytest.fixture(scope="module")
def plugin() -> Path:
    return EXAMPLE


def _overrides(base: Path, out: Path, name: str, plugin: Path, *more: str) -> list[str]:
    return [f"model.pretrained={base}", f"run.output_dir={out}", f"run.name={name}",
            f"run.plugins=[{plugin},{SAMPLER},{CODEC}]", "fed.sampling=round_robin", "fed.num_clients=4",
            "comm.uplink=[sign]", f"comm.block_size={BLOCK}", "comm.min_numel=0",
            "fed.clients_per_round=2", "fed.strategy=fedema", f"fed.strategy_args.beta={BETA}",
            f"fed.server_lr={SERVER_LR}",
            f"run.callbacks=[{PROBES}:DeltaNorm,{RECORDER}:Recorder]", "eval.images_per_prompt=2", "eval.inference_steps=2",
            "eval.sample_seeds=[0]", "fed.workers=2", *more]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "final" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def launched(tiny_base, plugin, tmp_path_factory):
    """fed-ddp run: 1 server + 2 gloo workers, 2 rounds, the plug-in strategy and the probe named by the config."""
    out, probe = tmp_path_factory.mktemp("plug"), tmp_path_factory.mktemp("probe")
    proc = run_cli("run", TINY, *_overrides(tiny_base, out, "cli", plugin), "tracking.wandb.mode=offline",
                   env={"RECORDER_DIR": str(probe)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "cli", probe


def test_a_plugin_strategy_runs_on_every_rank_and_aggregates_as_numpy_does(launched):
    run, probe = launched
    m, prev_after = None, None
    for rnd in (1, 2):
        seen = load_file(probe / f"round_{rnd}.safetensors")
        deltas = np.stack([seen[f"delta_{i}"].double().numpy() for i in range(len(seen["examples"]))])
        w = seen["examples"].numpy()
        d = (w[:, None] * deltas).sum(0) / w.sum()
        m = (1 - BETA) * d if m is None else BETA * m + (1 - BETA) * d
        want = seen["before"].double().numpy() + SERVER_LR * m / (1 - BETA ** rnd)
        np.testing.assert_allclose(seen["after"].double().numpy(), want, rtol=0, atol=1e-6)
        if prev_after is not None:  # round 2 starts from round 1's result
            assert torch.equal(seen["before"], prev_after)
        prev_after = seen["after"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    assert [r["updates"] for r in rounds] == [2, 2]  # the callbacks' values, in every round's record
    assert [r["clients"]["sampled"] for r in rounds] == [[0, 1], [2, 3]]  # the plug-in sampler's turns
    assert [r["recorded_train_loss"] for r in rounds] == [r["train_loss_mean"] for r in rounds]
    for r in rounds:  # examples/probes.py's DeltaNorm: the norm of what the aggregation moved
        seen = load_file(probe / f"round_{r['round']}.safetensors")
        assert r["step_norm"] == pytest.approx(float((seen["after"] - seen["before"]).norm()), rel=1e-6)
    final = _adapter(run)
    flat = torch.cat([final[k].flatten() for k in final])  # the adapter the last aggregation returned
    assert flat.numel() == prev_after.numel() and bool(torch.isfinite(flat).all())
    # the plug-in codec carried every delta: one |value| per block of 32 (dense fp32 has one per value) ...
    blocks = sum(-(-t.numel() // BLOCK) for t in final.values())
    for rnd in (1, 2):
        seen = load_file(probe / f"round_{rnd}.safetensors")
        for i in range(len(seen["examples"])):
            assert len(np.unique(np.abs(seen[f"delta_{i}"].numpy()))) <= blocks < flat.numel() / 10
    # ... and the bytes the run reports are what the codec produced: its payloads, sized by numpy's packbits
    from fed_ddp.plugins import import_plugin
    from fed_ddp.protocol import UP_TAIL_BYTES

    sign = import_plugin(str(CODEC)).Sign(BLOCK)
    made = [sign.encode(torch.randn(t.shape)).bytes for t in final.values()]
    payload, metadata = sum(b.payload for b in made), sum(b.metadata for b in made)
    assert payload == sum(np.packbits(np.zeros(t.numel(), bool)).size for t in final.values())
    assert metadata == 4 * blocks
    for r in rounds:
        up = r["comm"]["air"]["up"]
        assert (up["messages"], up["payload"], up["metadata"]) == (2, 2 * payload, 2 * (metadata + UP_TAIL_BYTES))


def wandb_history(run: Path) -> dict[int, dict]:
    """The history rows of the run's offline W&B file (``wandb/offline-run-*/run-*.wandb``), by step, read with
    W&B's own protobuf ``Record``: the file is a LevelDB-style log (a 7-byte header ``:W&B`` 0xBEE1 v0, then
    32 KiB blocks of chunks: crc32 (4 B), length (2 B), type (1 B: full 1, first 2, middle 3, last 4))."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    pos, block, part, rows = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record
            rec = Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                rows[row["_step"]] = row
    return rows


def test_a_callbacks_values_are_in_the_offline_wandb_files(launched):
    """What the callbacks returned, in W&B's offline run of the launched run too, at every round, equal to
    metrics.jsonl (the values W&B would upload with `wandb sync`)."""
    run, _ = launched
    history = wandb_history(run)
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["round"] > 0]
    assert len(rounds) == 2
    for r in rounds:
        logged = history[r["round"]]
        for name in ("step_norm", "relative_step", "updates", "recorded_train_loss"):  # DeltaNorm's, Recorder's
            assert logged[name] == pytest.approx(r[name], rel=1e-12), name


def test_the_api_both_ways_and_a_resume_give_the_launched_run_bit_for_bit(launched, tiny_base, plugin, tmp_path,
                                                                   monkeypatch):
    """fed_ddp.run(launch="torchrun") for round 1, then launch="inprocess" resumes it to round 2: the plug-in's
    momentum comes back from the checkpoint, and the final adapter is the one fed-ddp run's two rounds gave,
    bit for bit (the API's two launches and the CLI agree)."""
    import fed_ddp

    monkeypatch.setenv("RECORDER_DIR", str(tmp_path))
    ov = _overrides(tiny_base, tmp_path, "api", plugin)
    first = fed_ddp.run(TINY, [*ov, "fed.rounds=1"], launch="torchrun")  # fed-ddp run's main, its real ranks
    assert first.rounds == 1 and first.workers == 2
    summary = fed_ddp.run(TINY, [*ov, "fed.rounds=2", "run.resume=true"], launch="inprocess")
    assert summary.rounds == 2 and summary.final == json.loads((tmp_path / "api" / "summary.json").read_text())["final"]
    a, b = _adapter(launched[0]), _adapter(tmp_path / "api")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_plugin_codec_encodes_and_decodes_as_numpy_does_and_sends_what_it_counts():
    """examples/sign_codec.py against numpy (packbits, per-block mean |x|), alone and through a chain's byte
    buffer (what the wire sends); secure aggregation refuses it in one line."""
    from fed_ddp.compression import ByteCount, CommConfig, build_chain
    from fed_ddp.config import ConfigError, load_config
    from fed_ddp.plugins import import_plugin

    sign = import_plugin(str(CODEC))

    def reference(v: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scales = np.array([np.abs(v[i:i + block]).mean() for i in range(0, v.size, block)], dtype=np.float32)
        decoded = np.where(v >= 0, 1.0, -1.0) * np.repeat(scales, block)[:v.size]
        return np.packbits(v >= 0, bitorder="little"), scales, decoded

    gen = torch.Generator().manual_seed(0)
    for n, block in ((1, 64), (13, 4), (1000, 32), (4096, 64)):
        x = torch.randn(n, generator=gen)
        x[::7] = 0.0  # zero is sent as +: decodes to +scale
        p = sign.Sign(block).encode(x)
        signs, scales, decoded = reference(x.numpy(), block)
        np.testing.assert_array_equal(p.fields["signs"].numpy(), signs)
        np.testing.assert_allclose(p.fields["scales"].numpy(), scales, rtol=1e-6)
        np.testing.assert_allclose(sign.Sign(block).decode(p).numpy(), decoded, rtol=1e-6)
        assert p.bytes == ByteCount(-(-n // 8), 4 * -(-n // block))
    layout = [("a", (8, 33)), ("b", (5,))]
    chain = build_chain(["sign"], layout, CommConfig(uplink=["sign"], block_size=16, min_numel=0))
    flat = torch.randn(8 * 33 + 5, generator=gen)
    buf = chain.encode(flat).to_bytes()
    assert buf.numel() == chain.wire_bytes.total == (33 + 1) + 4 * (17 + 1)
    got = chain.decode(chain.from_bytes(buf)).numpy()
    want = np.concatenate([reference(flat[:264].numpy(), 16)[2], reference(flat[264:].numpy(), 16)[2]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"run.plugins=[{CODEC}]", "comm.uplink=[sign]", "privacy.secagg=true"])
    assert "comm.uplink=['sign']: sign is not linear" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("extra", "said"), [
    (["run.plugins=[my_lab.not_there]"], "run.plugins='my_lab.not_there': does not import: ModuleNotFoundError"),
    (["fed.strategy=fed_ddp.strategies:NoSuch"], ("fed.strategy='fed_ddp.strategies:NoSuch': fed_ddp.strategies has "
                                                 "no 'NoSuch'")),
    (["fed.strategy=fedadam", "fed.strategy_args.gamma=2"], ("fed.strategy_args.gamma=2: fed.strategy=fedadam takes "
                                                            "no setting 'gamma'")),
    (["fed.strategy=fedadam", "fed.strategy_args.beta1=0.5"], "takes no setting 'beta1' (set fed.beta1)"),
    (["run.callbacks=[fed_ddp.strategies:FedAvg]"], "run.callbacks='fed_ddp.strategies:FedAvg': defines none of"),
    (["run.callbacks=[probe]"], "run.callbacks='probe': must be package.module:Name or a registered callback"),
])
def test_bad_plugin_input_is_one_line_before_anything_starts(extra, said):
    from fed_ddp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=None) as e:
        load_config(TINY, extra)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_plugin_that_takes_a_built_in_name_and_a_strategy_setting_of_the_wrong_type(tmp_path):
    from fed_ddp.config import ConfigError, load_config

    clash = tmp_path / "clash.py"
    clash.write_text("from fed_ddp.strategies import FedAvg, register\nregister('fedavg', FedAvg)\n")
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"run.plugins=[{clash}]"])
    assert str(e.value) == (f"run.plugins='{clash}': does not import: ValueError: strategy 'fedavg' is already "
                            "registered")
    own = tmp_path / "own.py"
    own.write_text(EXAMPLE.read_text().replace('"fedema"', '"fedema2"'))
    with pytest.raises(ConfigError, match=r"fed.strategy_args.beta='high': must be a float \(fed.strategy=fedema2's "
                                          r"default is 0.9\)"):
        load_config(TINY, [f"run.plugins=[{own}]", "fed.strategy=fedema2", "fed.strategy_args.beta=high"])


def test_a_strategys_plan_values_reach_every_client_over_gloo_ranks(tiny_base, tmp_path):
    """examples/annealed_offset.py through fed-ddp run (1 server + 2 gloo workers, 2 rounds): the objective of
    every client reports the strength it trained with, which in every round is the strategy's schedule
    start x (R - t + 1) / R as fp32; the value adds 4 B to every head and to every client's downlink."""
    start, rounds = 0.3, 2
    proc = run_cli("run", TINY, f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "run.name=anneal",
                   f"run.plugins=[{ANNEAL}]", "fed.strategy=annealed_offset", "train.objective=annealed_offset",
                   f"fed.strategy_args.start={start}", "fed.workers=2", "eval.images_per_prompt=2",
                   "eval.inference_steps=2", "eval.sample_seeds=[0]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "anneal" / "metrics.jsonl").read_text().splitlines()][1:]
    p = json.loads((tmp_path / "anneal" / "summary.json").read_text())["lora_parameters"]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        want = float(np.float32(start * (rounds - r["round"] + 1) / rounds))
        assert r["clients"]["sampled"] == [0, 1] and r["noise_offset"] == {"0": want, "1": want}
        down = r["comm"]["air"]["down"]  # 2 clients: the adapter (dense fp32) + 5 plan fields + the value
        assert (down["messages"], down["payload"], down["metadata"]) == (2, 2 * 4 * p, 2 * 4 * (5 + 1))
        assert r["bytes_down"] == 2 * (4 * (6 + 1) + 8 * 2 * 1 + 4 * p)  # 2 workers: head + table + adapter


@pytest.mark.parametrize(("declared", "said"), [
    ('("noise offset",)', "plan value 'noise offset' is not an identifier"),
    ('("anneal", "anneal")', "plan value 'anneal' is declared twice"),
    ('("lr",)', "plan value 'lr' is a field of every plan"),
    ('"anneal"', "plan_values='anneal' is not a tuple of names"),
])
def test_a_strategy_that_declares_bad_plan_values_is_one_line_at_config_load(tmp_path, declared, said):
    from fed_ddp.config import ConfigError, load_config

    own = tmp_path / "planned.py"
    own.write_text(f"from fed_ddp.strategies import FedAvg\n\n\nclass Planned(FedAvg):\n    plan_values = {declared}\n")
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"fed.strategy={own}:Planned"])
    assert str(e.value) == (f"fed.strategy='{own}:Planned': {said}: plan_values takes distinct identifiers other "
                            "than kind, round, local_steps, lr, proximal_mu, slots, values")


def test_a_callback_that_raises_stops_the_run_naming_itself_and_the_round(tiny_base, tmp_path):
    import fed_ddp
    from fed_ddp.callbacks import CallbackError

    cb = tmp_path / "boom.py"
    cb.write_text("class Boom:\n    def on_round_end(self, rnd, record):\n        if rnd == 2:\n"
                  "            raise ValueError('no more')\n")
    with pytest.raises(CallbackError) as e:
        fed_ddp.run(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "run.name=boom",
                           f"run.callbacks=[{cb}:Boom]", "eval.images_per_prompt=2", "eval.inference_steps=2",
                           "eval.sample_seeds=[0]"], launch="inprocess")
    assert str(e.value) == f"run.callbacks: {cb}:Boom.on_round_end raised at round 2: ValueError: no more"
    assert (tmp_path / "boom" / "checkpoints" / "round_0001").is_dir()  # round 1 is kept


def test_fed_ddp_new_writes_templates_that_run_as_written(tiny_base, tmp_path):
    """`fed-ddp new KIND PATH` for every kind; the four files, unedited, in one in-process run: the strategy's
    setting, the objective's per-client metric, the sampler's choice and the callback's values all arrive."""
    from conftest import cli_here

    import fed_ddp
    from fed_ddp.templates import KINDS

    paths = {kind: tmp_path / "my_lab" / f"my_{kind}.py" for kind in KINDS}
    for kind, path in paths.items():
        proc = cli_here("new", kind, str(path))
        assert proc.returncode == 0 and f"a {kind} named 'my_{kind}'" in proc.stdout, proc.stderr
        assert f"my_lab/my_{kind}.py" in path.read_text()  # the usage line names the file as given
    again = cli_here("new", "strategy", str(paths["strategy"]))
    assert again.returncode != 0 and again.stderr.strip() == f"fed-ddp: {paths['strategy']}: File exists"
    bad = cli_here("new", "sampler", str(tmp_path / "My-Sampler.py"))
    assert "must be a .py file named in lower-case letters" in bad.stderr
    plugins = ",".join(str(paths[k]) for k in ("strategy", "objective", "sampler"))
    summary = fed_ddp.run(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "run.name=new",
                                 f"run.plugins=[{plugins}]", "fed.strategy=my_strategy", "fed.strategy_args.mix=0.5",
                                 "train.objective=my_objective", "fed.sampling=my_sampler", "fed.clients_per_round=1",
                                 f"run.callbacks=[{paths['callback']}:MyCallback]", "eval.images_per_prompt=2",
                                 "eval.inference_steps=2", "eval.sample_seeds=[0]"], launch="inprocess")
    assert summary.rounds == 2
    rows = [json.loads(x) for x in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()][1:]
    for r in rows:
        (client,) = r["clients"]["sampled"]
        assert set(r["my_objective_mse"]) == {str(client)} and r["my_objective_mse"][str(client)] > 0
        assert r["my_callback_clients"] == 1 and r["my_callback_step"] > 0
        assert r["update_norm"] == pytest.approx(r["my_callback_step"], rel=1e-5)  # mix * server_lr * delta
