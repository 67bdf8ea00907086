"""Diffusion models: the tiny built-in base, pretrained pipelines, LoRA, loss and sampling."""
