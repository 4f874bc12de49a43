"""Lever (not adopted): each LoRA layer's update as one addmm into the base layer's output.

PEFT's 4-bit LoRA layer clones the base output, scales the LoRA output and adds the two: three
passes over every adapted layer's output. ``torch.addmm`` adds B's product into the base output
in the matmul's epilogue instead: the same sum, rounded once. Round 8 (docs/benchmarks.md): 4%
faster at 31B, slower at E4B in the same kind of run, so the step keeps PEFT's forward and the
bench keeps this as the ``lever-fused-lora`` row.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def fuse_lora_adds(model: nn.Module, enabled: bool = True) -> int:
    """Bind the fused forward on each LoRA linear layer (``enabled=False``: back to PEFT's); the count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        # LoRA on a linear layer (nn.Linear or bitsandbytes' 4-bit one): its A is a Linear
        if isinstance(module, LoraLayer) and any(isinstance(a, nn.Linear) for a in module.lora_A.values()):
            if enabled:
                module.forward = types.MethodType(_fused_lora_forward, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # One plain adapter only; anything else (adapters off or merged, several adapters, DoRA, a
    # bias on B, per-call kwargs, mixed dtypes without autocast) takes PEFT's own forward.
    active = [name for name in self.active_adapters if name in self.lora_A]
    name = active[0] if len(active) == 1 else None
    if (name is None or kwargs or self.disable_adapters or self.merged or name in self.lora_variant
            or self.lora_B[name].bias is not None
            or not (torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[name].weight.dtype)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args)
    down = self.lora_A[name](self.lora_dropout[name](x))
    update = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                         self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return update.view(result.shape)
