"""Why E4B evaluation runs slower after training rows in one bench process (rounds 4-10).

One process: the bench's generate row twice, one training row (the project default), the
generate row twice more, then twice with Python's collector frozen (gc.freeze: the objects left
by training are no longer scanned). Each line: images/s, the seconds Python spent in full
(generation 2) collections it ran on its own during the row, the objects the collector tracks, and the CPU
seconds of encoding one batch (the prefetch thread's work). Run from the repo root:
    python docs/bench/2026-12-03-r10-eval-after-train.py gemma-4-e4b    (CUDA)
    python docs/bench/2026-12-03-r10-eval-after-train.py /tmp/tiny      (CPU smoke run)
"""

import gc
import random
import sys
import time

import torch

from bench import bench_gpu as b
from components import evaluate, prompting
from components.prepare_dataset import OXFORD_PET_CLASSES

full_gc = {"s": 0.0, "n": 0, "start": 0.0, "explicit": False}


def on_gc(phase, info):
    if info["generation"] == 2 and not full_gc["explicit"]:  # the collector's own, not reset_memory's
        if phase == "start":
            full_gc["start"] = time.perf_counter()
        else:
            full_gc["s"] += time.perf_counter() - full_gc["start"]
            full_gc["n"] += 1


def reset_memory(device, _reset=b.reset_memory):
    full_gc["explicit"] = True
    try:
        _reset(device)
    finally:
        full_gc["explicit"] = False


def measure(label, model, ctx):
    full_gc.update(s=0.0, n=0)
    batch = evaluate.default_batch_size(ctx.device)
    start = time.process_time()
    prompting.encode_prompt_batch(ctx.processor, [ctx.photos[i % len(ctx.photos)] for i in range(batch)], ctx.class_names)
    encode_cpu_s = time.process_time() - start
    row = b.eval_row(model, ctx, name=label, mode="generate")
    print(f"{label}: {row['images_per_s']:.2f} images/s; full collections {full_gc['n']} taking {full_gc['s']:.2f} s; "
          f"tracked objects {len(gc.get_objects())}; encoding {batch} prompts {encode_cpu_s:.2f} CPU s; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    return model


def main(source):
    tiny = source.startswith("/")
    cfg = b.BenchConfig(output="-", model_dir=source if tiny else "", variant="" if tiny else source,
                        device="cpu" if tiny else "auto", batch_size=4 if tiny else 16, eval_batches=1 if tiny else 2)
    device = torch.device("cpu" if tiny else "cuda")
    model, processor = b.build(cfg, device, "none" if tiny else "nf4")
    names = list(OXFORD_PET_CLASSES)
    desc = b.describe_model(cfg, model, processor, names, 0.0)
    photos = b.random_photos(cfg.batch_size * (cfg.timed_steps + 1), cfg.seed)
    ctx = b.Context(cfg, device, processor, names, photos, [b.Sample(p, random.choice(names)) for p in photos],
                    desc["generate_cap_new_tokens"])
    gc.callbacks.append(on_gc)
    b.reset_memory = reset_memory
    for label in ("before training, 1", "before training, 2"):
        model = measure(label, model, ctx)
    model, row = b.train_row_project(model, ctx, name="project default")
    print(f"training row: {row.get('samples_per_s', row.get('error'))} samples/s", flush=True)
    for label in ("after training, 1", "after training, 2"):
        model = measure(label, model, ctx)
    gc.freeze()
    for label in ("after training, collector frozen, 1", "after training, collector frozen, 2"):
        model = measure(label, model, ctx)


if __name__ == "__main__":
    main(sys.argv[1])
