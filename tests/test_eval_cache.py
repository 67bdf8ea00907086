"""The base model's evaluation is reused from ``model.cache_dir/eval`` only when the same base weights were
evaluated with the same settings: the same numbers and the same grid as evaluating again."""

from __future__ import annotations

import json

from inproc_runs import finished_run


def _round0(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["round"] == 0)


def test_base_evaluation_is_reused_only_for_the_same_base_and_settings(tiny_base, tmp_path):
    cache = f"model.cache_dir={tmp_path / 'cache'}"
    first = finished_run(tiny_base, tmp_path, "first", cache, "fed.rounds=1")
    again = finished_run(tiny_base, tmp_path, "again", cache, "fed.rounds=1")
    fresh = finished_run(tiny_base, tmp_path, "fresh", cache, "fed.rounds=1", "eval.cache_base=false")
    other = finished_run(tiny_base, tmp_path, "other", cache, "fed.rounds=1", "run.seed=1")
    a, b, c, d = (_round0(r) for r in (first, again, fresh, other))
    assert not a["base_eval_cached"] and b["base_eval_cached"] and not c["base_eval_cached"]
    assert not d["base_eval_cached"]  # another seed: another validation draw and other sampling seeds
    for key in ("val_loss", "gen_acc", "gen_acc_clients"):
        assert a[key] == b[key] == c[key], key  # reused = what evaluating again gives
    png = "samples/round_0000.png"
    assert (first / png).read_bytes() == (again / png).read_bytes() == (fresh / png).read_bytes()
    assert a["val_loss"] != d["val_loss"]
    stored = sorted(p.name for p in (tmp_path / "cache" / "eval").iterdir())
    assert len(stored) == 4 and not [n for n in stored if n.endswith(".tmp")]  # first's and other's json + png


def test_final_evaluation_reuses_the_last_rounds_validation_losses(tiny_base, tmp_path, monkeypatch):
    """The last round already computed the validation losses of the adapter the final evaluation sees."""
    import fed_ddp.client

    calls = []
    real = fed_ddp.client.validation_loss
    monkeypatch.setattr(fed_ddp.client, "validation_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = finished_run(tiny_base, tmp_path, "r", "fed.rounds=2", "eval.cache_base=false")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "seconds" in r]
    final = json.loads((run / "summary.json").read_text())["final"]
    sets = [k for k in rows[-1] if k.startswith("val_loss")]
    assert [r["round"] for r in rows] == [0, 1, 2] and sets
    assert len(calls) == 3 * len(sets)  # base, round 1, round 2: none for the final evaluation
    assert all(final[k] == rows[-1][k] for k in sets) and "gen_acc" in final


def test_evaluation_runs_on_eval_num_threads_and_restores_the_ranks(monkeypatch):
    """The server's evaluation uses eval.num_threads CPU threads (0: every core) while the workers wait, then
    gives the rank its own thread count back, also when the evaluation fails."""
    import types

    import pytest
    import torch

    from fed_ddp.distributed.nodes import cpu_cores
    from fed_ddp.evaluation import Evaluator

    seen = []

    def fake(self, rnd, losses, grid, accuracy, quality):
        seen.append(torch.get_num_threads())
        if rnd < 0:
            raise RuntimeError("boom")
        return {}

    monkeypatch.setattr(Evaluator, "_evaluate", fake)
    ev = Evaluator.__new__(Evaluator)
    ev.pipe = types.SimpleNamespace(device=torch.device("cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n, want in ((2, 2), (0, cpu_cores()), (1, 1)):  # 0: the cores the launcher counts too
            ev.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(num_threads=n, merge_lora=False))
            ev(1)
            assert seen[-1] == want and torch.get_num_threads() == 1
        ev.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(num_threads=2, merge_lora=False))
        with pytest.raises(RuntimeError):
            ev(-1)
        assert seen[-1] == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_merged_lora_evaluates_the_same_adapter_and_restores_the_base_bit_for_bit(tiny_base):
    """Evaluation merges the adapter into the base weights (eval.merge_lora): the denoiser's output is the
    unmerged one up to rounding, an untrained adapter (B = 0) merges to the base exactly, and every weight is
    bit-identical afterwards, also when the evaluation fails."""
    import pytest
    import torch

    from fed_ddp.config import load_config
    from fed_ddp.diffusion.families import denoiser
    from fed_ddp.diffusion.lora import get_flat, merged_lora, prepare_trainable, set_flat
    from fed_ddp.diffusion.models import load_pipeline

    cfg = load_config(None, [f"model.pretrained={tiny_base}"])
    unet = denoiser(load_pipeline(str(tiny_base), torch.device("cpu")))
    prepare_trainable(unet, cfg)
    unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    emb = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])

    def out():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb).sample

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = out()
    with merged_lora(unet):  # B = 0: the merge adds exact zeros
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items() if "lora_" not in k)
        assert torch.equal(out(), plain)
    set_flat(unet, torch.randn(get_flat(unet).numel(), generator=g) * 0.1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = out()
    with merged_lora(unet):
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("base_layer" in k for k in changed)
        merged = out()
    assert not torch.equal(merged, plain) and torch.allclose(merged, plain, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError), merged_lora(unet):
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(out(), plain)  # and it is unmerged again: the adapter applies once, not twice
    unet.to(torch.bfloat16)  # DeepSpeed's cast: a merge would round the update away, so none happens
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with merged_lora(unet):
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
