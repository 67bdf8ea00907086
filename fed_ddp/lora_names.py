"""The one naming rule for adapter parameters, and the one rule for what the flat vector holds (a leaf module:
compression, diffusion and the server use it)."""


def is_lora_name(name: str) -> bool:
    """peft names LoRA parameters ``...lora_A...`` / ``...lora_B...`` (and ``lora_embedding_*``)."""
    return "lora_" in name


PERSONAL = "personal"  # peft adapter name of a client's personal adapter (personal.mode=split): never in the flat vector


def is_personal_name(name: str) -> bool:
    """A parameter of the personal adapter (peft names it ``...lora_A.personal.weight``)."""
    return is_lora_name(name) and f".{PERSONAL}." in name


def trainable_named(module) -> list:
    """(name, parameter) of what clients train and exchange, in named order: the layout of every flat vector.

    The parameters that require grad and are LoRA-named, except the personal adapter's (it never leaves its
    client); in a model without LoRA (``train.method=full``), every parameter that requires grad (the whole UNet)."""
    named = list(module.named_parameters())
    has_lora = any(is_lora_name(n) for n, _ in named)
    return [(n, p) for n, p in named
            if p.requires_grad and (is_lora_name(n) or not has_lora) and not is_personal_name(n)]


def personal_named(module) -> list:
    """(name, parameter) of the personal adapter, in named order (empty without personal.mode=split)."""
    return [(n, p) for n, p in module.named_parameters() if is_personal_name(n)]
