"""A callback in a file of your own: how far each round moved the global adapter.

    fed-ddp run configs/quickstart.yaml run.callbacks=[examples/probes.py:DeltaNorm]

Its returned dicts join every round's record: metrics.jsonl and W&B get ``step_norm``, ``updates`` and
``relative_step`` with nothing else to configure. Callbacks run on the server rank only.
"""


class DeltaNorm:
    def on_aggregate(self, rnd, before, updates, after):
        step = float((after - before).norm())
        return {"step_norm": step, "updates": len(updates),
                "relative_step": step / max(float(before.norm()), 1e-12)}
