"""What a training row leaves changed in the model, by module type: parameter and buffer dtypes,
requires_grad, bitsandbytes' compute dtype, training mode, and the attention implementation.
    python docs/bench/2026-12-03-r10-state-after-train.py gemma-4-e4b   (CUDA) | /tmp/tiny (CPU)"""

import collections
import random
import sys

import torch

from bench import bench_gpu as b
from components.prepare_dataset import OXFORD_PET_CLASSES


def census(model):
    seen = collections.Counter()
    for name, module in model.named_modules():
        kind = type(module).__name__
        for p in module.parameters(recurse=False):
            seen[(kind, "param", str(p.dtype), p.requires_grad)] += p.numel()
        for t in module.buffers(recurse=False):
            seen[(kind, "buffer", str(t.dtype), False)] += t.numel()
        if hasattr(module, "compute_dtype"):
            seen[(kind, "compute_dtype", str(module.compute_dtype), getattr(module, "compute_type_is_set", None))] += 1
        seen[(kind, "training", str(module.training), False)] += 1
    seen[("config", "attn", str(model.config._attn_implementation), False)] += 1
    return seen


def main(source):
    tiny = source.startswith("/")
    cfg = b.BenchConfig(output="-", model_dir=source if tiny else "", variant="" if tiny else source,
                        device="cpu" if tiny else "auto", batch_size=4 if tiny else 16, eval_batches=1)
    device = torch.device("cpu" if tiny else "cuda")
    model, processor = b.build(cfg, device, "none" if tiny else "nf4")
    names = list(OXFORD_PET_CLASSES)
    desc = b.describe_model(cfg, model, processor, names, 0.0)
    photos = b.random_photos(cfg.batch_size * (cfg.timed_steps + 1), cfg.seed)
    ctx = b.Context(cfg, device, processor, names, photos, [b.Sample(p, random.choice(names)) for p in photos],
                    desc["generate_cap_new_tokens"])
    row = b.eval_row(model, ctx, name="before", mode="generate")
    before = census(model)
    print(f"generate before training: {row['images_per_s']:.2f} images/s", flush=True)
    model, _ = b.train_row_project(model, ctx, name="project default")
    row = b.eval_row(model, ctx, name="after", mode="generate")
    after = census(model)
    print(f"generate after training: {row['images_per_s']:.2f} images/s", flush=True)
    for key in sorted(set(before) | set(after), key=str):
        if before[key] != after[key]:
            print(f"changed: {key}: {before[key]} -> {after[key]}")


if __name__ == "__main__":
    main(sys.argv[1])
