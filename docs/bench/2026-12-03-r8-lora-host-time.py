"""Host time per LoRA layer, PEFT's forward against the addmm lever (bench/fused_lora.py).

    PYTHONPATH=. python docs/bench/2026-12-03-r8-lora-host-time.py

50 LoRA layers of 8 x 8 on one CPU thread, forward and backward: the tensors are tiny, so the
time is Python and dispatch, what a GPU run's host spends per layer. 6 interleaved pairs.
"""

import time

import torch
from peft import LoraConfig, get_peft_model

from bench.fused_lora import fuse_lora_adds

torch.set_num_threads(1)
layers = 50
base = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.05,
                                        target_modules=[str(i) for i in range(layers)])).train()
x = torch.randn(4, 8, requires_grad=True)


def microseconds_per_layer(steps: int = 60) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    return (time.perf_counter() - start) / steps / layers * 1e6


for pair in range(6):
    for fused in (True, False):
        fuse_lora_adds(model, enabled=fused)
        microseconds_per_layer(5)  # warm-up after the switch
        print(pair, "addmm" if fused else "PEFT ", f"{microseconds_per_layer():.1f} us per layer, forward + backward")
