"""Model families (SD, SDXL, SD3, Flux) behind one interface: the flow-matching objective against an
independent computation, the sampler's shift, per-family runs whose exported adapter the family's own
diffusers pipeline loads to the same image as ``fed-ddp generate``, a family of one's own (a plug-in) trained
and planned through the real paths, and the one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image

from fed_ddp.diffusion.families import denoiser, family_of, get_family

PROMPT = "a handwritten digit seven"


def _tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    fam = get_family(name)
    return fam, fam.tiny_pipeline()


# -- the flow-matching objective ----------------------------------------------------------------------
def test_sd3_flow_loss_matches_an_independent_computation():
    fam, pipe = _tiny("sd3")
    model, sched = denoiser(pipe), fam.training_scheduler(pipe)
    g = torch.Generator().manual_seed(1)
    x, n = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.5, 0.93])
    cond = {"embeds": torch.randn(3, 16, 64, generator=g), "pooled": torch.randn(3, 64, generator=g)}
    with torch.no_grad():
        ours = fam.loss(model, sched, x, cond, n, sigma).item()
        xd, nd, sd = x.double().numpy(), n.double().numpy(), sigma.double().numpy()[:, None, None, None]
        noisy = torch.from_numpy((1 - sd) * xd + sd * nd).float()  # x_σ = (1 − σ) x + σ ε
        pred = model(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=cond["embeds"],
                     pooled_projections=cond["pooled"]).sample.double().numpy()
    assert ours == pytest.approx(np.mean((pred - (nd - xd)) ** 2), rel=1e-5)  # target: the velocity ε − x


def test_flux_flow_loss_packs_latents_like_an_independent_computation():
    """2x2 patches into tokens, (0, row, col) position ids, σ as the timestep, guidance 1: by hand here."""
    fam, pipe = _tiny("flux")
    model, sched = denoiser(pipe), fam.training_scheduler(pipe)
    g = torch.Generator().manual_seed(2)
    b, c, h, w = 2, 1, 8, 8
    x, n = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    sigma = torch.tensor([0.2, 0.7])
    cond = {"embeds": torch.randn(b, 8, 32, generator=g), "pooled": torch.randn(b, 32, generator=g)}

    def pack(t):  # (b, c, h, w) -> (b, h/2 * w/2, c * 4), channels then the 2x2 patch, row-major
        return t.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    ids = torch.tensor([[0.0, i, j] for i in range(h // 2) for j in range(w // 2)])
    with torch.no_grad():
        ours = fam.loss(model, sched, x, cond, n, sigma).item()
        s = sigma.view(-1, 1, 1, 1)
        pred = model(hidden_states=pack((1 - s) * x + s * n), timestep=sigma, guidance=torch.ones(b),
                     pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                     txt_ids=torch.zeros(8, 3), img_ids=ids).sample
    ref = torch.mean((pred.double() - pack(n - x).double()) ** 2).item()  # the same MSE in token order
    assert ours == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_training_noise_levels_are_the_samplers(name):
    """σ drawn for training = the family's density of u, shifted exactly as the pipeline's sampler shifts
    its noise levels (SD3: the scheduler's shift; Flux: exp(μ) for this image's token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = get_family(name)
    cfg = {"shift": 3.0} if name == "sd3" else {"use_dynamic_shifting": True, "shift": 3.0}
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    latents = torch.zeros(5, 16, 64, 64)  # 64x64 latents: 1024 image tokens (Flux's shift depends on it)
    noise, sigma = fam.draw(latents, sched, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(noise, torch.randn(latents.shape, generator=g))
    u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=g)) if name == "sd3" else torch.rand(5, generator=g)
    mu = None
    if name == "flux":  # diffusers' calculate_shift, written out: a line from (256, 0.5) to (4096, 1.15)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    s = 3.0 if name == "sd3" else math.exp(mu)
    np.testing.assert_allclose(sigma.numpy(), (s * u / (1 + (s - 1) * u)).numpy(), rtol=1e-6)
    grid = np.linspace(1.0, 0.05, 20)  # what the sampler makes of the same noise levels
    sched.set_timesteps(sigmas=grid, mu=mu)
    np.testing.assert_allclose(fam.shifted(torch.from_numpy(grid), sched, latents).numpy(),
                               sched.sigmas[:-1].numpy(), rtol=1e-5)


# -- the interface ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_family_round_trip_and_default_targets(name, family_base):
    """Saved and reloaded by the family's pipeline class; default LoRA targets attach on its denoiser."""
    from fed_ddp.config import LoraSection
    from fed_ddp.diffusion.lora import attach_lora, lora_parameters
    from fed_ddp.diffusion.models import load_pipeline

    pipe = load_pipeline(str(family_base(name)), torch.device("cpu"))
    fam = family_of(pipe)
    assert fam.name == name and type(pipe).__name__ == fam.pipeline_class_name
    attach_lora(denoiser(pipe), LoraSection(rank=2))  # targets [] = the family's defaults
    hit = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in denoiser(pipe).named_parameters() if ".lora_A." in n}
    leaf = {t.rsplit(".", 1)[-1] for t in fam.default_targets}
    assert hit and hit <= leaf
    assert len(lora_parameters(denoiser(pipe))) > 0


# -- end to end, per family ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_runs(family_base, tmp_path_factory):
    """2 clients, 2 rounds on each non-SD family's tiny base (random weights), through the production server
    and worker loop in this process (SD's CLI run is tests/test_e2e.py; Flux over gloo: test_distributed)."""
    from inproc_runs import finished_run

    out = tmp_path_factory.mktemp("families")
    # alpha != rank and a large lr: a lost adapter scale or lost LoRA tensors would change the image
    # Flux also carries the simulated wireless cell: its FLOPs are counted on a meta copy of the transformer
    return {name: finished_run(family_base(name), out, name, f"model.family={name}", "lora.rank=4", "lora.alpha=8",
                               "train.lr=0.05", *(["wireless.enabled=true"] if name == "flux" else []))
            for name in ("sdxl", "sd3", "flux")}


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_family_adapter_loads_in_its_pipeline_like_fed_ddp_generate(name, family_runs, family_base, tmp_path):
    """The final adapter, loaded by the family's own diffusers pipeline with ``load_lora_weights``, draws
    the image that ``fed-ddp generate`` draws for the same prompt and seed, and that differs from the base's."""
    import diffusers
    from safetensors.torch import load_file

    from fed_ddp.cli import main
    from fed_ddp.evaluation import generate
    from fed_ddp.images import save_grid

    final = family_runs[name] / "checkpoints" / "final"
    ours = tmp_path / "ours.png"
    assert main(["generate", str(final), "--prompt", PROMPT, "--seed", "3", "--steps", "4", "--out", str(ours)]) == 0

    pipe = getattr(diffusers, get_family(name).pipeline_class_name).from_pretrained(family_base(name))
    pipe.set_progress_bar_config(disable=True)
    plain = tmp_path / "plain.png"
    save_grid(generate(pipe, [PROMPT], 3, 4, 1.0)[None], [PROMPT], plain, cell=64)
    pipe.load_lora_weights(final)
    exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
    prefix = "unet." if name == "sdxl" else "transformer."
    assert exported and all(k.startswith(prefix) for k in exported)
    loaded = [n for n, _ in denoiser(pipe).named_parameters() if "lora_" in n]
    assert len(loaded) == len(exported)  # every exported tensor found its module
    theirs = tmp_path / "theirs.png"
    save_grid(generate(pipe, [PROMPT], 3, 4, 1.0)[None], [PROMPT], theirs, cell=64)
    a, b, c = (np.asarray(Image.open(p), dtype=np.int16) for p in (ours, theirs, plain))
    assert np.array_equal(a, b), f"max pixel difference {np.abs(a - b).max()}"
    assert np.abs(a - c).max() > 0, "the adapter changed nothing: the comparison would not catch a lost adapter"


def test_family_run_metrics(family_runs):
    for name, run_dir in family_runs.items():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in rows if "seconds" in r and r["round"] > 0]
        assert [r["round"] for r in rounds] == [1, 2], name
        assert all(np.isfinite(r["val_loss"]) and r["bytes_up"] > 0 for r in rounds), name
        cfg = (run_dir / "config.yaml").read_text()
        assert f"family: {name}" in cfg
        from fed_ddp.checkpoint import read_info

        assert read_info(run_dir / "checkpoints" / "final")["family"] == name  # generate loads this family
    flux = [json.loads(x) for x in (family_runs["flux"] / "metrics.jsonl").read_text().splitlines()]
    sims = [r for r in flux if "sim_latency_s" in r]
    assert [r["round"] for r in sims] == [1, 2] and all(r["sim_latency_s"] > 0 for r in sims)



# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_family_is_one_line():
    r = run_cli("run", str(ROOT / "configs" / "tiny_test.yaml"), "model.family=sd4")
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and "model.family='sd4'" in msg[0] and "sdxl" in msg[0], r.stderr


def test_pretrained_of_another_family_is_one_line(family_base):
    base = family_base("sd3")
    r = run_cli("run", str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={base}")  # family: sd
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and "holds a sd3 pipeline (StableDiffusion3Pipeline): set model.family=sd3" in msg[0], r.stderr


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_batched_accuracy_images_equal_one_call_per_digit(name, family_base):
    """Generation accuracy samples every digit in one pipeline call: each digit's images start from the noise its
    own generator draws, so they equal what ``generate`` draws for that digit alone."""
    from fed_ddp.diffusion.families import family_of
    from fed_ddp.diffusion.models import load_pipeline
    from fed_ddp.diffusion.tiny import caption
    from fed_ddp.evaluation import generate

    pipe = load_pipeline(str(family_base(name)), torch.device("cpu"))
    fam = family_of(pipe)
    lat = torch.cat([fam.initial_latents(pipe, 3, torch.Generator().manual_seed(10 + d)) for d in (4, 7)])
    batched = pipe([caption(d) for d in (4, 7) for _ in range(3)], latents=lat, num_inference_steps=3,
                   guidance_scale=1.0, output_type="np", **fam.sample_kwargs(pipe)).images
    alone = np.concatenate([generate(pipe, [caption(d)] * 3, 10 + d, 3, 1.0) for d in (4, 7)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


# -- a family of one's own (run.plugins, package.module:Name) ------------------------------------------------------
COUNTING = '''
import torch

from fed_ddp.diffusion.families import SD, register

TRAINING_CALLS = []  # the batch size of each loss call made with gradients (the clients' steps)


class Counting(SD):
    """SD with LoRA on the value and output projections only, counting its loss calls."""

    name = "sd_counting"
    default_targets = ("to_v", "to_out.0")

    def loss(self, model, scheduler, latents, cond, noise, t):
        if torch.is_grad_enabled():
            TRAINING_CALLS.append(len(latents))
        return super().loss(model, scheduler, latents, cond, noise, t)


register("sd_counting", Counting)
'''


def _doc_family() -> str:
    """The python block of docs/extending.md's "A model family" section, as written."""
    text = (ROOT / "docs" / "extending.md").read_text().split("## A model family", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.usefixtures("registries_restored")
def test_a_plugin_family_trains_with_its_own_targets_and_loss(tiny_base, tmp_path):
    """A family registered from a file in run.plugins, on the path every rank takes (load_config, load_pipeline
    with model.family, prepare_trainable, a client's local steps, the export): its default targets are the only
    ones trained and exported, and every local step calls its loss."""
    import sys

    from safetensors.torch import load_file

    from fed_ddp.client import LocalTrainer
    from fed_ddp.config import load_config
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import export_adapter, get_flat, prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.strategies import RoundPlan

    plugin = tmp_path / "counting.py"
    plugin.write_text(COUNTING)
    cfg = load_config(str(ROOT / "configs" / "tiny_test.yaml"), [
        f"model.pretrained={tiny_base}", f"run.plugins=[{plugin}]", "model.family=sd_counting"])
    assert cfg.lora.targets == ["to_v", "to_out.0"]
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"), cfg.model.revision, cfg.model.family)
    assert type(family_of(pipe)).__name__ == "Counting"
    prepare_trainable(denoiser(pipe), cfg)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    trainer = LocalTrainer(pipe, training_scheduler(pipe), data.clients[0], cfg.train, cfg.run.seed)
    delta, metrics = trainer.fit(get_flat(denoiser(pipe)), RoundPlan(1, cfg.fed.local_steps, cfg.train.lr))
    calls = sys.modules[f"fed_ddp_plugin_{plugin.stem}"].TRAINING_CALLS
    assert calls == [cfg.train.batch_size] * cfg.fed.local_steps  # 3 steps of 8 (configs/tiny_test.yaml)
    assert np.isfinite(metrics["train_loss"]) and delta.abs().max() > 0
    keys = load_file(export_adapter(denoiser(pipe), tmp_path / "out"))
    modules = {k.split(".lora_")[0] for k in keys}
    assert all(m.endswith((".to_v", ".to_out.0")) for m in modules)
    assert {m.endswith(".to_v") for m in modules} == {True, False}  # both targets, and only they


@pytest.mark.usefixtures("registries_restored")
def test_the_documented_family_plans_its_targets(tmp_path):
    """docs/extending.md's example as written, in run.plugins or named ``file.py:Name``: ``fed-ddp plan`` counts
    LoRA on its two targets of the SD tiny base's UNet (fewer than SD's four), and of SD 1.5's."""
    from conftest import cli_here

    from fed_ddp.config import load_config
    from fed_ddp.plan import UNET_CONFIGS, make_plan, meta_denoiser

    doc = tmp_path / "sd_qv.py"
    doc.write_text(_doc_family())
    tiny = str(ROOT / "configs" / "tiny_test.yaml")
    cfg = load_config(tiny, [f"run.plugins=[{doc}]", "model.family=sd_qv"])
    assert cfg.lora.targets == ["to_q", "to_v"]
    assert load_config(tiny, [f"model.family={doc}:SDQV"]).lora.targets == ["to_q", "to_v"]
    ours, sd = make_plan(cfg, cfg.comm), make_plan(load_config(tiny), cfg.comm)
    unet = get_family("sd").tiny_denoiser()
    by_hand = sum(4 * (m.in_features + m.out_features) for n, m in unet.named_modules()
                  if n.endswith((".to_q", ".to_v")))  # rank 4 (lora.rank's default): r * (in + out)
    assert ours.lora_parameters == by_hand and 0 < by_hand < sd.lora_parameters
    proc = cli_here("plan", tiny, f"model.family={doc}:SDQV")
    assert proc.returncode == 0 and f"{by_hand:,} trainable parameters" in proc.stdout, proc.stderr
    # SD 1.5's published UNet is its own (it recognises the config), by --denoiser or by the hub id's shipped config
    real = meta_denoiser(json.loads((UNET_CONFIGS / "sd15_unet.json").read_text()), "sd")
    by_hand = sum(4 * (m.in_features + m.out_features) for n, m in real.named_modules() if n.endswith((".to_q", ".to_v")))
    proc = cli_here("plan", tiny, f"model.family={doc}:SDQV", "--denoiser", "sd15")
    assert proc.returncode == 0 and f"{by_hand:,} trainable parameters" in proc.stdout, proc.stderr
    hub = load_config(tiny, [f"model.family={doc}:SDQV", "model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5"])
    assert make_plan(hub, hub.comm).lora_parameters == by_hand


@pytest.mark.usefixtures("registries_restored")
@pytest.mark.parametrize(("plugin", "family", "said"), [
    ("", "sd4", "model.family='sd4': must be one of {known} or package.module:Name"),  # the built-ins, and any plug-in
    ("", "fed_ddp.strategies:FedAvg",
     "model.family='fed_ddp.strategies:FedAvg': is not a fed_ddp.diffusion.families.sd.SD subclass"),
    ("from fed_ddp.diffusion.families import SDXL, register\nregister('sd', SDXL)\n", "sd",
     "does not import: ValueError: family 'sd' is already registered"),
])
def test_bad_family_is_one_line(plugin, family, said, tmp_path):
    from fed_ddp.config import ConfigError, load_config
    from fed_ddp.diffusion.families import REGISTRY

    extra = []
    if plugin:
        (tmp_path / "clash.py").write_text(plugin)
        extra = [f"run.plugins=[{tmp_path / 'clash.py'}]"]
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs" / "tiny_test.yaml"), [*extra, f"model.family={family}"])
    assert said.format(known=sorted(REGISTRY)) in str(e.value) and "\n" not in str(e.value)
    from fed_ddp.diffusion.families.sd import SD

    assert REGISTRY["sd"] is SD  # a refused registration replaces nothing
