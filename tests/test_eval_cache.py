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


def test_evaluation_runs_on_eval_num_threads_and_restores_the_ranks(monkeypatch):
    """The server's evaluation uses eval.num_threads CPU threads (0: every core) while the workers wait, then
    gives the rank its own thread count back, also when the evaluation fails."""
    import os
    import types

    import pytest
    import torch

    from fed_ddp.evaluation import Evaluator

    seen = []

    def fake(self, rnd, losses, grid, accuracy):
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
        for n, want in ((2, 2), (0, os.cpu_count()), (1, 1)):
            ev.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(num_threads=n))
            ev(1)
            assert seen[-1] == want and torch.get_num_threads() == 1
        ev.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(num_threads=2))
        with pytest.raises(RuntimeError):
            ev(-1)
        assert seen[-1] == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
