"""Image quality (``eval.metrics``): FID and KID against scipy/numpy on the same features, the CLIP score against
CLIPModel's own forward, feature networks of both calling conventions loaded from TorchScript files, a whole
run reporting pooled and per-client figures, and the one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fed_ddp.config import ConfigError, load_config
from fed_ddp.quality import Clip, FeatureNet, clip_score, fid_kid, rgb255

TINY = "configs/tiny_test.yaml"


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def _numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³ over all samples (Bińkowski et al. 2018)."""
    m, d = len(a), a.shape[1]
    kxx, kyy, kxy = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_fid_and_kid_equal_scipy_and_numpy_on_the_same_features():
    rng = np.random.default_rng(0)
    d, n = 12, 80  # more samples than dimensions: full-rank covariances, a well-defined sqrtm
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.7 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
    got = fid_kid(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    a32, b32 = (torch.from_numpy(x).float().double().numpy() for x in (a, b))  # what fid_kid was given
    want = {"fid": _scipy_fid(a32, b32), "kid": _numpy_kid(a32, b32)}
    for k in ("fid", "kid"):
        assert math.isclose(got[k], want[k], rel_tol=1e-6), (k, got[k], want[k])
    assert want["fid"] > 1 and want["kid"] > 0.01  # far from zero: the relative test means something
    same = fid_kid(torch.from_numpy(a), torch.from_numpy(a))  # unbiased KID of a set with itself is not 0
    assert abs(same["fid"]) < 1e-9 * want["fid"] and math.isclose(same["kid"], _numpy_kid(a, a), rel_tol=1e-6)


class Plain(torch.nn.Module):
    """forward(img) -> (N, 6): a random conv and a global pool."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv((img - 128) / 128)).mean(dim=(2, 3))


class Nvidia(torch.nn.Module):
    """NVIDIA's convention: forward(img, return_features=True) -> (N, 5) features, else (N, 3) logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img, size=(12, 12), mode="bilinear", align_corners=False)
        f = torch.tanh(self.conv((x - 128) / 128)).mean(dim=(2, 3))
        return f if return_features else self.head(f)


class Flat(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.mean(dim=1)  # (N, H, W): not (N, D)


def _scripted(module: torch.nn.Module, path) -> str:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))
    return str(path)


def test_feature_networks_of_both_conventions_load_from_torchscript_files(tmp_path):
    images = rgb255(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert images.shape == (4, 3, 8, 8) and torch.equal(images, images.round()) and images.max() <= 255
    torch.manual_seed(0)
    plain, nvidia = Plain(), Nvidia()
    for module, dim in ((plain, 6), (nvidia, 5)):
        net = FeatureNet(_scripted(module, tmp_path / f"{type(module).__name__}.pt"))
        assert net.check(8) == dim
        with torch.no_grad():
            want = module(images, return_features=True) if module is nvidia else module(images)
        torch.testing.assert_close(net(images), want.double())
    resized = FeatureNet(str(tmp_path / "Plain.pt"), image_size=16)
    with torch.no_grad():
        up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False,
                                             antialias=True)
        torch.testing.assert_close(resized(images), plain(up).double())


def _tiny_clip(path) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fed_ddp.diffusion.tiny import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    size = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**size, "vocab_size": len(tok), "max_position_embeddings": 16, "bos_token_id": None,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = CLIPConfig(text_config=text, vision_config={**size, "image_size": 16, "patch_size": 4}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tok).save_pretrained(path)
    return str(path)


def test_clip_score_equals_clip_model_s_own_forward(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    path = _tiny_clip(tmp_path / "clip")
    words = ["zero", "one", "two", "three", "four", "five"]
    captions = [f"a handwritten digit {w}" for w in words] * 3
    images = rgb255(torch.rand(len(captions), 1, 8, 8) * 2 - 1).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    got = Clip(path).scores(images, captions)  # batches of 16: two here

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():  # the forward's own normalised embeddings, every pair in one batch
        out = model(**proc(text=captions, images=list(images), return_tensors="pt", padding=True))
    want = 100 * (out.image_embeds.double() * out.text_embeds.double()).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(want.std()) > 1  # the pairs differ: a per-pair comparison, not one number
    # random weights: these pairs' mean is negative (clipped to 0); the mean itself, on the negated scores
    assert math.isclose(clip_score(got), max(float(want.mean()), 0.0), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(clip_score(-got), max(-float(want.mean()), 0.0), rel_tol=1e-5) and clip_score(-got) > 1
    assert clip_score(torch.tensor([-3.0, 1.0])) == 0.0 and clip_score(torch.tensor([3.0, 1.0])) == 2.0


def test_quality_compares_images_generated_from_a_set_s_captions_with_that_set(tiny_base, tmp_path):
    """The pooled FID/KID against a reference that generates the same images itself (diffusers' pipeline, the
    metric's seeds), takes their features from the TorchScript module directly and computes with scipy; per-client
    figures from each client's held-out images (``val_clients``: data.client_dirs) are named ``_clients_val``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank runs: on 2 shared cores, more threads are 50x slower for these tiny batches
    try:
        _compare_with_reference(tiny_base, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_with_reference(tiny_base, tmp_path):
    from fed_ddp.data.digits import load_digits_dataset
    from fed_ddp.data.federated import FederatedData
    from fed_ddp.diffusion.models import generate, load_pipeline
    from fed_ddp.quality import BATCH, Quality
    from fed_ddp.seeds import eval_metrics

    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    digits = load_digits_dataset()
    data = FederatedData(clients=[digits.subset(range(40)), digits.subset(range(40, 80))], val=digits.subset(range(80, 120)),
                         val_clients=[digits.subset(range(120, 130)), digits.subset([130])])
    torch.manual_seed(0)
    module = Nvidia()
    weights = _scripted(module, tmp_path / "inception.pt")
    cfg = load_config(TINY, ["eval.metrics=[fid,kid]", f"eval.fid.weights={weights}", "eval.metrics_images=20"])
    got = Quality(cfg, data)(pipe, 2, 1.0)
    assert set(got) == {f"{m}_{k}" for m in ("fid", "kid") for k in ("pooled", "clients_val", "clients_val_mean")}
    assert got["fid_clients_val"]["1"] is None and got["fid_clients_val_mean"] == got["fid_clients_val"]["0"]

    # the reference: which 20 of the 40 validation images, then the same generation, by hand
    pick = np.sort(np.random.default_rng(eval_metrics(cfg.run.seed, 0, -1)).choice(40, 20, replace=False))
    real = data.val.subset(pick)
    fake = np.concatenate([generate(pipe, real.captions[j:j + BATCH], eval_metrics(cfg.run.seed, 0, j // BATCH), 2, 1.0)
                           for j in range(0, 20, BATCH)])
    as_rgb = lambda x: np.repeat(np.round(np.clip(x, 0, 1) * 255), 3, axis=1).astype(np.float32)
    with torch.no_grad():
        feats = [module(torch.from_numpy(as_rgb(x)), return_features=True).double().numpy()
                 for x in ((real.images.numpy() + 1) / 2, fake.transpose(0, 3, 1, 2))]
    assert math.isclose(got["fid_pooled"], _scipy_fid(*feats), rel_tol=1e-6), (got["fid_pooled"], _scipy_fid(*feats))
    assert math.isclose(got["kid_pooled"], _numpy_kid(*feats), rel_tol=1e-6)


def test_a_run_reports_fid_kid_and_clip_score_pooled_and_per_client(tiny_base, tmp_path):
    import fed_ddp

    weights, clip = _scripted(Nvidia(), tmp_path / "inception.pt"), _tiny_clip(tmp_path / "clip")
    fed_ddp.run(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "run.name=quality",
                       "fed.rounds=2", "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]",
                       "eval.metrics_every=1",
                       "eval.metrics=[fid,kid,clip_score]", f"eval.fid.weights={weights}", f"eval.clip.model={clip}",
                       "eval.metrics_images=6", "eval.num_threads=1"], launch="inprocess")
    final = json.loads((tmp_path / "quality" / "summary.json").read_text())["final"]
    for key in ("fid_pooled", "kid_pooled", "clip_score", "fid_clients_train_mean", "kid_clients_train_mean"):
        assert isinstance(final[key], float) and math.isfinite(final[key]), (key, final.get(key))
    for key in ("fid_clients_train", "kid_clients_train", "clip_score_clients_train"):
        assert set(final[key]) == {"0", "1"} and all(math.isfinite(v) for v in final[key].values()), final[key]
    assert final["fid_pooled"] > 0 and final["fid_clients_train"]["0"] != final["fid_clients_train"]["1"]
    rows = {r["round"]: r for r in map(json.loads, (tmp_path / "quality" / "metrics.jsonl").read_text().splitlines())}
    # eval.metrics_every=1: round 1's line has them; the last round's are the final evaluation's (summary.json)
    assert sorted(rows) == [0, 1, 2] and "fid_pooled" not in rows[0] and "fid_pooled" not in rows[2]
    assert set(rows[1]["kid_clients_train"]) == {"0", "1"} and math.isfinite(rows[1]["clip_score"])
    assert rows[1]["fid_pooled"] != final["fid_pooled"]  # another adapter, the same real images and noise
    from fed_ddp.report import load_run, table_rows

    columns, table = table_rows([load_run(tmp_path / "quality")])  # fed-ddp report: the final figures, a column each
    quality = {c: table[0][c] for c in columns if c.startswith(("fid", "kid", "clip"))}
    assert quality == {f"{k}_final": final[k] for k in ("clip_score", "clip_score_clients_train_mean", "fid_pooled",
                                                         "fid_clients_train_mean", "kid_pooled", "kid_clients_train_mean")}


def test_quality_settings_refused_in_one_line(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("not an archive")
    pickled = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(2)}, pickled)
    flat = _scripted(Flat(), tmp_path / "flat.pt")
    missing = tmp_path / "nowhere.pt"
    fid = ["eval.metrics=[fid]"]
    config_time = [(["eval.metrics=[fid,lpips]"], "eval.metrics='lpips': must be one of ['clip_score', 'fid', 'kid']"),
                   (fid, "eval.fid.weights: eval.metrics=['fid'] needs the feature network"),
                   ([*fid, f"eval.fid.weights={missing}"], f"eval.fid.weights='{missing}': no such file"),
                   (["eval.metrics=[clip_score]", f"eval.clip.model={tmp_path / 'clip-nowhere'}"],
                    "eval.clip.model='" + str(tmp_path / "clip-nowhere") + "': must be a local CLIP directory")]
    for overrides, said in config_time:
        with pytest.raises(ConfigError) as e:
            load_config(TINY, overrides)
        assert said in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    from fed_ddp.preflight import check_metrics

    siglip = _tiny_clip(tmp_path / "siglip")  # a CLIP directory whose config says it is another model
    conf = json.loads((tmp_path / "siglip" / "config.json").read_text())
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({**conf, "model_type": "siglip"}))
    (tmp_path / "broken-clip").mkdir()
    (tmp_path / "broken-clip" / "config.json").write_text("{}")
    preflight = [([*fid, f"eval.fid.weights={notes}"], "is not a TorchScript archive"),
                 ([*fid, f"eval.fid.weights={pickled}"], "is not a TorchScript archive"),
                 ([*fid, f"eval.fid.weights={flat}"], "the network gave (2, 8, 8) for 2 images, not (2, D) features"),
                 (["eval.metrics=[clip_score]", f"eval.clip.model={tmp_path / 'broken-clip'}"],
                  "is not a CLIP directory that CLIPModel and CLIPProcessor load"),
                 (["eval.metrics=[clip_score]", f"eval.clip.model={siglip}"], "holds a 'siglip' model, not a CLIP")]
    for overrides, said in preflight:
        cfg = load_config(TINY, overrides)
        with pytest.raises(ConfigError) as e:
            check_metrics(cfg)
        assert said in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
        assert str(e.value).startswith(("eval.fid.weights=", "eval.clip.model=")), str(e.value)


def test_under_dp_the_per_client_figures_stay_on_the_server():
    from fed_ddp.tracking import public_row

    row = {"round": 2, "fid_pooled": 3.0, "kid_pooled": 0.1, "clip_score": 20.0, "fid_clients_train": {"0": 4.0},
           "fid_clients_train_mean": 4.0, "kid_clients_val": {"1": 0.2}, "clip_score_clients_train": {"0": 21.0}}
    assert public_row(row) == {"round": 2, "fid_pooled": 3.0, "kid_pooled": 0.1, "clip_score": 20.0}


def test_the_base_evaluation_cache_ignores_eval_metrics(tiny_base, tmp_path):
    """Round 0 never measures eval.metrics: turning them on reuses the same cached base evaluation."""
    from types import SimpleNamespace

    from fed_ddp.evaluation import base_eval_key

    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    weights = _scripted(Plain(), tmp_path / "plain.pt")
    keys = [base_eval_key(load_config(TINY, [f"model.pretrained={tiny_base}", *extra]), str(tiny_base), model)
            for extra in ([], ["eval.metrics=[fid,kid]", f"eval.fid.weights={weights}", "eval.metrics_every=2"],
                          ["eval.inference_steps=3"])]
    assert keys[0] is not None and keys[0] == keys[1] != keys[2]
