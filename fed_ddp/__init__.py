"""fed_ddp: federated LoRA fine-tuning of diffusion models over torch.distributed."""

import os

# Quiet the libraries before they are imported: their import-time notes and per-load progress bars
# would otherwise repeat once per rank. Users can override any of these from the environment.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"


def run(config, overrides=(), launch: str = "torchrun"):
    """Run a config (``fed_ddp.api.run``): ``launch="torchrun"`` as ``fed-ddp run``, ``"inprocess"`` in this
    process; returns the run's ``results.RunSummary``."""
    from fed_ddp.api import run as _run

    return _run(config, overrides, launch)
