"""The one naming rule for adapter parameters (a leaf module: compression, diffusion and the server use it)."""


def is_lora_name(name: str) -> bool:
    """peft names LoRA parameters ``...lora_A...`` / ``...lora_B...`` (and ``lora_embedding_*``)."""
    return "lora_" in name
