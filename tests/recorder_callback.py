"""A test's callback (run.callbacks=[tests/recorder_callback.py:Recorder]): every aggregation's inputs and result
to safetensors files under $RECORDER_DIR, for a numpy check of the rule the strategy applied."""

import os

import torch
from safetensors.torch import save_file


class Recorder:
    def on_aggregate(self, rnd, before, updates, after):
        tensors = {"before": before, "after": after,
                   "examples": torch.tensor([u.num_examples for u in updates], dtype=torch.float64)}
        tensors.update({f"delta_{i}": u.delta for i, u in enumerate(updates)})
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{os.environ['RECORDER_DIR']}/round_{rnd}.safetensors")

    def on_round_end(self, rnd, record):
        return {"recorded_train_loss": record.train_loss_mean}
