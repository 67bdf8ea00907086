"""fed_ddp: federated LoRA fine-tuning of diffusion models over torch.distributed."""
__version__ = "0.1.0"
