"""LoRA-aware aggregation: FedAvg of A and B is not the average of B·A; FFA-LoRA and FlexLoRA are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inproc_runs import TINY, finished_run

from fed_ddp.config import ConfigError, load_config
from fed_ddp.strategies import ClientUpdate, FedAvg, FlexLora, build_strategy, lora_pairs, product_error

# two LoRA layers: a linear one (out 5, in 6, rank 2) and a conv one (out 3, in 2, 3x3 kernel, rank 2),
# in peft's naming and order (A before B)
LAYOUT = [("l.lora_A.default.weight", (2, 6)), ("l.lora_B.default.weight", (5, 2)),
          ("c.lora_A.default.weight", (2, 2, 3, 3)), ("c.lora_B.default.weight", (3, 2, 1, 1))]
SIZES = [12, 10, 36, 6]


def _split(flat):
    out, o = [], 0
    for n in SIZES:
        out.append(flat[o:o + n])
        o += n
    return out


def _np_product(flat, k):  # independent: numpy, from the layout by hand
    a, b = _split(flat)[2 * k], _split(flat)[2 * k + 1]
    sa, sb = LAYOUT[2 * k][1], LAYOUT[2 * k + 1][1]
    return b.reshape(sb[0], -1) @ a.reshape(sa[0], -1)


def _clients(rng, freeze_a=False, m=3):
    g = rng.normal(size=sum(SIZES))
    deltas = []
    for _ in range(m):
        d = rng.normal(scale=0.3, size=sum(SIZES))
        if freeze_a:  # FFA-LoRA: the A factors never move
            for k in (0, 2):
                o = sum(SIZES[:k])
                d[o:o + SIZES[k]] = 0
        deltas.append(d)
    ups = [ClientUpdate(i, torch.from_numpy(d).float(), n) for i, (d, n) in enumerate(zip(deltas, [3, 1, 6][:m]))]
    return torch.from_numpy(g).float(), ups


def _np_error(g, ups):
    w = np.array([u.num_examples for u in ups], dtype=float)
    w /= w.sum()
    local = [g.double().numpy() + u.delta.double().numpy() for u in ups]
    mean = sum(wi * x for wi, x in zip(w, local))
    errs = []
    for k in (0, 1):
        exact = sum(wi * _np_product(x, k) for wi, x in zip(w, local))
        errs.append(np.linalg.norm(_np_product(mean, k) - exact) / np.linalg.norm(exact - _np_product(
            g.double().numpy(), k)))
    return errs


def test_pairs_follow_peft_names_and_offsets():
    pairs = lora_pairs(LAYOUT)
    assert [p.name for p in pairs] == ["l", "c"]
    assert (pairs[0].a, pairs[0].b, pairs[1].a, pairs[1].b) == (slice(0, 12), slice(12, 22), slice(22, 58),
                                                                slice(58, 64))
    assert lora_pairs([("l.lora_B.default.weight", (5, 2))]) == []  # FFA-LoRA's layout: no A travels
    assert lora_pairs([("conv_in.weight", (4, 4))]) == []  # full fine-tuning
    from fed_ddp.strategies import FfaLora

    with pytest.raises(ValueError, match="holds A factors"):  # an unprepared UNet would make FFA-LoRA inexact
        FfaLora(local_steps=1, lr=1.0, layout=LAYOUT)
    FfaLora(local_steps=1, lr=1.0, layout=[("l.lora_B.default.weight", (5, 2))])


def test_naive_error_is_nonzero_and_matches_numpy():
    g, ups = _clients(np.random.default_rng(0))
    err = product_error(lora_pairs(LAYOUT), g, ups)
    want = _np_error(g, ups)
    assert err["mean"] == pytest.approx(np.mean(want), rel=1e-6) and err["max"] == pytest.approx(max(want), rel=1e-6)
    assert err["max"] > 0.05


def test_ffa_lora_aggregation_is_exact():
    g, ups = _clients(np.random.default_rng(1), freeze_a=True)
    assert product_error(lora_pairs(LAYOUT), g, ups)["max"] < 1e-12
    new, _ = FedAvg(local_steps=1, lr=1.0).aggregate(1, g, ups)  # FFA-LoRA's server step is FedAvg on B
    w = np.array([3, 1, 6]) / 10
    for k in (0, 1):
        exact = sum(wi * _np_product(g.double().numpy() + u.delta.double().numpy(), k) for wi, u in zip(w, ups))
        np.testing.assert_allclose(_np_product(new.double().numpy(), k), exact, atol=1e-5)


def test_flexlora_is_exact_at_full_rank_and_reports_its_truncation():
    # full rank: layers whose product has rank <= r (in <= r): a 3 x 2 linear layer with r = 2
    layout = [("x.lora_A.default.weight", (2, 2)), ("x.lora_B.default.weight", (3, 2))]
    rng = np.random.default_rng(2)
    g = torch.from_numpy(rng.normal(size=10))
    ups = [ClientUpdate(i, torch.from_numpy(rng.normal(size=10)), n) for i, n in enumerate([2, 5, 3])]
    new, m = FlexLora(local_steps=1, lr=1.0, layout=layout).aggregate(1, g, ups)
    w = np.array([2, 5, 3]) / 10

    def prod(x):
        return x[4:].reshape(3, 2) @ x[:4].reshape(2, 2)

    exact = sum(wi * prod(g.numpy() + u.delta.numpy()) for wi, u in zip(w, ups))
    np.testing.assert_allclose(prod(new.numpy()), exact, atol=1e-10)
    assert m["truncation_error_max"] < 1e-12
    # rank-r truncation otherwise: the result is numpy's best rank-2 approximation, the error its tail
    g, ups = _clients(np.random.default_rng(3))
    new, m = FlexLora(local_steps=1, lr=1.0, layout=LAYOUT).aggregate(1, g, ups)
    w = np.array([3, 1, 6]) / 10
    tails = []
    for k in (0, 1):
        exact = sum(wi * _np_product(g.double().numpy() + u.delta.double().numpy(), k) for wi, u in zip(w, ups))
        u_, s, vh = np.linalg.svd(exact, full_matrices=False)
        best = (u_[:, :2] * s[:2]) @ vh[:2]
        np.testing.assert_allclose(_np_product(new.double().numpy(), k), best, atol=1e-4)
        moved = np.linalg.norm(exact - _np_product(g.double().numpy(), k))  # relative to the round's update
        tails.append(np.sqrt((s[2:] ** 2).sum()) / moved)
        # A keeps the old A's RMS row norm, with orthogonal rows
        a_old, a_new = _split(g.double().numpy())[2 * k], _split(new.double().numpy())[2 * k]
        rows_old, rows_new = a_old.reshape(2, -1), a_new.reshape(2, -1)
        c = np.sqrt((rows_old ** 2).sum(1).mean())
        np.testing.assert_allclose(rows_new @ rows_new.T, c * c * np.eye(2), atol=1e-6 * c * c)  # fp32 result
    assert m["truncation_error_max"] == pytest.approx(max(tails), rel=1e-5) and max(tails) > 0.01


def test_flexlora_pads_layers_narrower_than_the_rank():
    # in = 1 < r = 2: one direction; the spare component gets B = 0 and a non-zero A, the product stays exact
    layout = [("x.lora_A.default.weight", (2, 1)), ("x.lora_B.default.weight", (3, 2))]
    rng = np.random.default_rng(4)
    g = torch.from_numpy(rng.normal(size=8))
    ups = [ClientUpdate(i, torch.from_numpy(rng.normal(size=8)), 1) for i in range(3)]
    new, m = FlexLora(local_steps=1, lr=1.0, layout=layout).aggregate(1, g, ups)
    x = new.numpy()
    exact = sum(((g.numpy() + u.delta.numpy())[2:].reshape(3, 2) @ (g.numpy() + u.delta.numpy())[:2].reshape(2, 1))
                for u in ups) / 3
    np.testing.assert_allclose(x[2:].reshape(3, 2) @ x[:2].reshape(2, 1), exact, atol=1e-10)
    assert np.all(x[2:].reshape(3, 2)[:, 1] == 0) and np.all(x[:2] != 0) and m["truncation_error_max"] < 1e-12


def test_strategy_config_rules_are_one_line():
    with pytest.raises(ConfigError, match="needs fed.aggregator=mean"):
        load_config(TINY, ["fed.strategy=flexlora", "fed.aggregator=median"])
    with pytest.raises(ConfigError, match="needs train.method=lora"):
        load_config(TINY, ["fed.strategy=ffa_lora", "train.method=full"])
    with pytest.raises(ConfigError, match="cannot work on a clipped"):
        load_config(TINY, ["fed.strategy=flexlora", "privacy.dp.noise_multiplier=1.0", "fed.sampling=poisson",
                           "fed.sample_rate=0.5"])
    with pytest.raises(ConfigError, match="error-feedback residuals"):
        load_config(TINY, ["fed.strategy=flexlora", "comm.uplink=[topk,int8]"])
    load_config(TINY, ["fed.strategy=flexlora", "comm.uplink=[int8]"])  # stateless codecs are fine
    cfg = load_config(TINY, ["fed.strategy=flexlora"])
    with pytest.raises(ValueError, match="needs the adapter's layout"):
        build_strategy(cfg.fed, cfg.train)


def test_ffa_lora_run_sends_b_only_keeps_a_and_exports_for_diffusers(tiny_base, tmp_path):
    """In the production loop: the flat vector holds only the B factors (half the LoRA values for square
    layers), the exported A equals the shared initialisation, and the adapter loads in diffusers."""
    import json

    from safetensors.torch import load_file

    from fed_ddp.diffusion.lora import attach_lora, prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline

    run = finished_run(tiny_base, tmp_path, "ffa", "fed.strategy=ffa_lora")
    final = load_file(str(run / "checkpoints" / "final" / "pytorch_lora_weights.safetensors"))
    cfg = load_config(TINY, ["fed.strategy=ffa_lora"])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(pipe.unet, cfg)
    fresh = {n: p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    a_names = [n for n in fresh if ".lora_A." in n]
    assert a_names and all(not p.requires_grad for n, p in pipe.unet.named_parameters() if n in a_names)
    for n in a_names:  # exported A == the shared initialisation; B moved
        assert torch.equal(final["unet." + n.replace(".default", "")], fresh[n])
    assert any(final["unet." + n.replace(".default", "")].abs().sum() > 0 for n in fresh if ".lora_B." in n)
    summary = json.loads((run / "summary.json").read_text())
    ref = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(ref.unet, cfg.lora)
    b_only = sum(p.numel() for n, p in ref.unet.named_parameters() if ".lora_B." in n)
    assert summary["lora_parameters"] == b_only < sum(p.numel() for n, p in ref.unet.named_parameters()
                                                      if "lora_" in n)
    ref.load_lora_weights(str(run / "checkpoints" / "final"))  # diffusers reads it
    # a resume whose frozen A would differ from the one the clients trained against is refused
    import fed_ddp.server.loop

    real = fed_ddp.server.loop.frozen_digest
    fed_ddp.server.loop.frozen_digest = lambda unet: "0" * 64
    try:
        with pytest.raises(RuntimeError, match="frozen LoRA factors differ"):
            finished_run(tiny_base, tmp_path, "ffa", "fed.strategy=ffa_lora", "run.resume=true", "fed.rounds=3")
    finally:
        fed_ddp.server.loop.frozen_digest = real


def test_fedavg_run_reports_the_aggregation_error_flexlora_its_truncation(tiny_base, tmp_path):
    import json

    run = finished_run(tiny_base, tmp_path, "naive", "fed.rounds=1")
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert 0 < row["lora_agg_error"]["mean"] <= row["lora_agg_error"]["max"]
    run = finished_run(tiny_base, tmp_path, "flex", "fed.rounds=1", "fed.strategy=flexlora")
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert 0 <= row["truncation_error_mean"] <= row["truncation_error_max"] < 1


def test_compare_runs_one_federated_arm_per_strategy(tiny_base, tmp_path, capsys):
    from fed_ddp.compare import compare

    cfg = load_config(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "fed.rounds=1",
                             "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]"])
    table = compare(cfg, strategies=["fedavg", "ffa_lora"])
    assert list(table) == ["federated-fedavg", "federated-ffa_lora", "centralized", "local_only", "base"]
    fedavg, ffa = table["federated-fedavg"], table["federated-ffa_lora"]
    assert fedavg["total_local_steps"] == ffa["total_local_steps"] == table["centralized"]["total_local_steps"]
    assert 0 < ffa["air_up_total"] < fedavg["air_up_total"]  # B only on the wire
    assert fedavg["val_loss"] != ffa["val_loss"]
    out = capsys.readouterr().out
    assert "federated-ffa_lora" in out and "uplink bytes" in out


def test_compare_refuses_a_bad_strategy_in_one_line(capsys):
    from fed_ddp.cli import main

    assert main(["compare", TINY, "--strategies", "fedavg,fedex"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--strategies='fedex'" in err and "fed.strategy" in err and "\n" not in err
    assert main(["compare", TINY, "--strategies", "fedavg,fedyogi:server_lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--strategies='fedyogi:server_lr=-1'" in err and "fed.server_lr" in err and "\n" not in err
    assert main(["compare", TINY, "--strategies", "fedavg,fedavg"]) == 2
    assert "names an arm twice" in capsys.readouterr().err


def test_compare_arms_take_their_own_settings():
    from fed_ddp.compare import arm_config, arm_name

    cfg = load_config(TINY)
    arm = arm_config(cfg, "fedyogi:server_lr=0.01:beta1=0.5")
    assert (arm.fed.strategy, arm.fed.server_lr, arm.fed.beta1) == ("fedyogi", 0.01, 0.5)
    assert (arm.fed.local_steps, arm.train.lr, arm.run.name) == (cfg.fed.local_steps, cfg.train.lr, cfg.run.name)
    assert arm_name("fedyogi:server_lr=0.01") == "federated-fedyogi+server_lr=0.01"  # a valid run folder
    for bad in ("fedavg:rounds=3", "fedavg:num_clients=8", "fedavg:server_lr"):  # the step count is every arm's
        with pytest.raises(ConfigError, match="may set only"):
            arm_config(cfg, bad)
