"""fed_ddp: federated LoRA fine-tuning of diffusion models over torch.distributed."""

import os

# Quiet the libraries before they are imported: their import-time notes and per-load progress bars
# would otherwise repeat once per rank. Users can override any of these from the environment.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
