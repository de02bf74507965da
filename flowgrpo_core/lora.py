"""LoRA adapters on plain ``nn.Module`` policies through peft.

The adapter is injected in place (no ``PeftModel`` wrapper), so the module keeps its own forward. Base
weights are frozen; LoRA parameters are trainable and kept in fp32 whatever the base dtype. With the
default ``init="gaussian"`` (Flow-GRPO's choice) ``B = 0``: a fresh adapter leaves the policy equal to the
reference, so the first log-prob ratio is exactly 1 and the KL starts at 0.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn


def add_lora(module: nn.Module, target_modules: Union[Sequence[str], str], rank: int = 8,
             alpha: float | None = None, init: Union[str, bool] = "gaussian", dropout: float = 0.0) -> nn.Module:
    """Inject a LoRA adapter of ``rank`` (scale ``alpha / rank``; ``alpha`` defaults to ``rank``) into ``module``.

    ``target_modules``: module-name suffixes (peft semantics) or a regex string. Returns ``module``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                        init_lora_weights=init)
    inject_adapter_in_model(config, module)
    trainable = 0
    for name, param in module.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            param.data = param.data.float()
            trainable += param.numel()
    if trainable == 0:
        raise ValueError(f"no module matched target_modules={target_modules!r}; "
                         f"available: {sorted({n.rsplit('.', 1)[-1] for n, _ in module.named_modules() if n})}")
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft key names, detached CPU copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors from :func:`lora_state_dict` into ``module``'s adapter; unknown or missing keys raise."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA state has keys this module lacks: {unexpected[:5]}")
