"""Client objectives (``train.objective``): Min-SNR against an independent reference, the noise offset, a user's
objective whose metric travels up and appears per client, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fed_ddp.config import ConfigError, load_config
from fed_ddp.data.digits import load_digits_dataset
from fed_ddp.diffusion.lora import attach_lora, get_flat
from fed_ddp.diffusion.models import load_pipeline, training_scheduler
from fed_ddp.strategies import RoundPlan

pytestmark = pytest.mark.usefixtures("registries_restored")  # the plug-ins registered here stay here

TINY = "configs/tiny_test.yaml"


@pytest.fixture(scope="module")
def pipe(tiny_base):
    p = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(p.unet, load_config(None, []).lora, seed=0)
    p.start = get_flat(p.unet).clone()  # every delta below starts here (a fit leaves the local adapter in)
    return p


def _delta(pipe, *overrides: str, loss=None, monkeypatch=None) -> torch.Tensor:
    """One client's delta after 3 local steps from the same adapter, seed and data."""
    from fed_ddp.client import LocalTrainer

    cfg = load_config(None, ["train.batch_size=8", "train.lr=0.01", *overrides])
    t = LocalTrainer(pipe, training_scheduler(pipe), load_digits_dataset().subset(range(48)), cfg.train, 0)
    if loss is not None:
        monkeypatch.setattr(t.family, "loss", loss)
    delta, _ = t.fit(pipe.start, RoundPlan(1, 3, 0.01))
    return delta


def test_min_snr_matches_a_reference_written_from_the_noise_schedule(pipe, monkeypatch):
    """The reference weights each example's MSE by min(SNR, gamma) / SNR with SNR = abar / (1 - abar) from the
    scheduler's alphas_cumprod (the paper's definition; fed_ddp goes through diffusers' compute_snr)."""
    gamma = 2.0

    def reference(model, scheduler, latents, cond, noise, t):
        abar = scheduler.alphas_cumprod.to(torch.float64)[t]
        snr = abar / (1 - abar)
        weight = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
        noisy = scheduler.add_noise(latents, noise, t)
        pred = model(noisy, t, encoder_hidden_states=cond["embeds"]).sample
        per = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per * weight.float()).mean()

    assert training_scheduler(pipe).config.prediction_type == "epsilon"
    got = _delta(pipe, "train.objective=min_snr", f"train.snr_gamma={gamma}")
    want = _delta(pipe, "train.objective=mse", loss=reference, monkeypatch=monkeypatch)
    plain = _delta(pipe, "train.objective=mse")
    # fp64 vs fp32 SNR: AdamW's normalisation lifts the last bits of near-zero gradients to ~3e-6 (of updates ~1e-2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float((got - plain).abs().max()) > 1e-3  # the weighting changed the update, far beyond that


def test_noise_offset_of_zero_is_the_plain_loss_and_otherwise_is_not(pipe):
    plain = _delta(pipe)
    assert torch.equal(_delta(pipe, "train.objective=noise_offset", "train.noise_offset=0"), plain)
    assert not torch.equal(_delta(pipe, "train.objective=noise_offset", "train.noise_offset=0.1"), plain)


OBJECTIVE = '''
import torch.nn.functional as F

from fed_ddp.objectives import Objective, register


class Smooth(Objective):
    """The family's MSE, and how large the model's prediction is (a per-client metric)."""

    metrics = ("pred_rms",)

    def loss(self, family, model, scheduler, latents, cond, noise, t, generator):
        noisy = scheduler.add_noise(latents, noise, t)
        pred = family.predict(model, noisy, t, cond).float()
        return F.mse_loss(pred, noise.float()), {"pred_rms": pred.detach().pow(2).mean().sqrt()}


register("smooth", Smooth)
'''


def test_a_user_objective_s_metric_travels_up_and_appears_per_client(tiny_base, tmp_path):
    import fed_ddp

    plugin = tmp_path / "smooth_objective.py"
    plugin.write_text(OBJECTIVE)
    common = [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "fed.rounds=1",
              "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]"]
    mine = fed_ddp.run(TINY, [*common, "run.name=smooth", f"run.plugins=[{plugin}]", "train.objective=smooth"],
                       launch="inprocess")
    plain = fed_ddp.run(TINY, [*common, "run.name=plain"], launch="inprocess")
    row = [json.loads(x) for x in (tmp_path / "smooth" / "metrics.jsonl").read_text().splitlines()][1]
    assert set(row["pred_rms"]) == {"0", "1"} and all(0 < v < 10 for v in row["pred_rms"].values())
    # one more fp32 field in every message, counted in the bytes; the same training otherwise (the loss is MSE)
    up = (mine.comm["per_client_round"]["up"], plain.comm["per_client_round"]["up"])
    assert up[0]["metadata"] == up[1]["metadata"] + 4 and up[0]["payload"] == up[1]["payload"]
    rows = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert row["train_loss"] == rows[1]["train_loss"]


def test_objectives_refused_in_one_line(tmp_path):
    cases = [(["train.objective=huber"], "train.objective='huber': must be one of ['min_snr', 'mse', 'noise_offset'"),
             (["train.objective=min_snr", "model.family=sd3"],
              "train.objective='min_snr': is defined for model.family ['sd', 'sdxl'], not 'sd3'"),
             (["train.objective=fed_ddp.objectives:Nope"], "fed_ddp.objectives has no 'Nope'")]
    bad = tmp_path / "clash_objective.py"
    bad.write_text(OBJECTIVE.replace('"pred_rms"', '"train_loss"').replace('"smooth"', '"clash"'))
    cases += [(["train.objective=prior"], "train.prior_prompts=[]: train.objective=prior needs the class prompts"),
              ([*PRIOR, "train.engine=deepspeed", "deepspeed.zero_stage=3"],
               "ZeRO-3 partitions: use deepspeed.zero_stage=2")]
    cases.append(([f"run.plugins=[{bad}]", "train.objective=clash"],
                  "train.objective='clash': reports 'train_loss', a name the round already reports"))
    for overrides, said in cases:
        with pytest.raises(ConfigError) as e:
            load_config(TINY, overrides)
        assert said in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))


PRIOR = ["train.objective=prior", "train.prior_prompts=[a handwritten digit zero,a handwritten digit one]",
         "train.prior_images=3", "train.prior_steps=2", "train.prior_loss_weight=0.5"]


def test_prior_preservation_is_the_instance_loss_plus_the_weighted_loss_on_the_base_s_own_images(pipe, monkeypatch):
    """The reference generates the class images itself (diffusers' pipeline with the adapter off, the client's
    seed), encodes them, and adds 0.5 x the family's loss on a batch of them drawn from the objective's stream."""
    from fed_ddp.client import LocalTrainer
    from fed_ddp.diffusion.models import encode_images
    from fed_ddp.objectives import Prior
    from fed_ddp.seeds import client_objective, client_prior

    cfg = load_config(None, ["train.batch_size=8", "train.lr=0.01", *PRIOR])
    pipe.unet.disable_adapters()
    gen = torch.Generator().manual_seed(client_prior(cfg.run.seed, 3))
    prompts = ["a handwritten digit zero"] * 3 + ["a handwritten digit one"] * 3
    imgs = pipe(prompts, num_inference_steps=2, guidance_scale=1.0, generator=gen, output_type="np").images
    pipe.unet.enable_adapters()
    want_latents = encode_images(pipe, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() * 2 - 1)
    t = LocalTrainer(pipe, training_scheduler(pipe), load_digits_dataset().subset(range(48)), cfg.train, cfg.run.seed,
                     client_id=3)
    assert isinstance(t.objective, Prior)
    torch.testing.assert_close(t.objective.latents, want_latents)
    assert len(t.objective.cond["embeds"]) == 6

    lat, cond, noise, steps = t._batch(np.random.default_rng(0), torch.Generator().manual_seed(0))
    scheduler, fam = training_scheduler(pipe), t.family
    loss, said = t.objective.loss(fam, pipe.unet, scheduler, lat, cond, noise, steps, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    i = torch.randint(0, 6, (8,), generator=g)
    pn, pt = fam.draw(want_latents[i], scheduler, g)
    with torch.no_grad():
        enc = t.objective.cond
        prior = F.mse_loss(pipe.unet(scheduler.add_noise(want_latents[i], pn, pt), pt,
                                     encoder_hidden_states=enc["embeds"][i]).sample, pn)
        inst = F.mse_loss(pipe.unet(scheduler.add_noise(lat, noise, steps), steps,
                                    encoder_hidden_states=cond["embeds"]).sample, noise)
    torch.testing.assert_close(loss.detach(), inst + 0.5 * prior)
    torch.testing.assert_close(said["prior_loss"], prior)
    assert client_objective(cfg.run.seed, 1, 3) != client_prior(cfg.run.seed, 3)
    # the class images are the client's own: another client draws others; the same client, the same ones
    other = LocalTrainer(pipe, scheduler, load_digits_dataset().subset(range(48)), cfg.train, cfg.run.seed, client_id=4)
    again = LocalTrainer(pipe, scheduler, load_digits_dataset().subset(range(48)), cfg.train, cfg.run.seed, client_id=3)
    assert not torch.equal(other.objective.latents, want_latents) and torch.equal(again.objective.latents,
                                                                                  t.objective.latents)


def test_prior_preservation_runs_and_reports_each_client_s_prior_loss(tiny_base, tmp_path):
    import fed_ddp

    common = [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "fed.rounds=1",
              "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]"]
    fed_ddp.run(TINY, [*common, "run.name=prior", *PRIOR], launch="inprocess")
    rows = [json.loads(x) for x in (tmp_path / "prior" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["round"] for r in rows] == [1]
    for r in rows:
        assert set(r["prior_loss"]) == set(r["train_loss"]) and all(0 < v < 10 for v in r["prior_loss"].values())
