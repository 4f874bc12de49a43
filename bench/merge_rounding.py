"""Does a bf16 merge round a small LoRA delta away, or is the merge wrong? Measured on the CPU.

A random-init Gemma 4 at a published variant's widths and a few layers (``components.random_model``)
gets a LoRA adapter on every target layer the fine-tune adapts (rank r, alpha), with lora_A at
PEFT's initialisation and lora_B as after ``steps`` AdamW steps at ``lr``: every entry +-lr*steps
(Adam moves each weight by about lr per step whatever the gradient's size; an upper bound, the
warm-up makes it smaller). Then, on one 500x375 photo with the 37-class prompt:

- weight space: the share of s·B·A entries under half a bf16 ulp of W, and bf16's share of the
  change kept (merge_export.delta_kept);
- logits in fp32: base + adapter (reference), the base (adapter effect), the merge rounded once to
  bf16 (pure rounding), the merge in fp32 (merge math), the one-ulp noise floor of the step;
- logits in bf16 compute, as on the GPU: the base (bf16 vs fp32: the compute noise floor), base +
  adapter unmerged, and the bf16 merge, each against the fp32 reference.

    python -m bench.merge_rounding --variant gemma-4-e4b --layers 6 --lr 5e-5 --steps 3

Results: docs/merge.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def build(variant: str, layers: int, rank: int, alpha: int, lr: float, steps: int, seed: int, fp32: bool = True):
    """fp32 model holding bf16 values (a bf16 checkpoint loaded on the CPU; bf16 with
    ``fp32=False``) + the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma4ForConditionalGeneration

    from components import modeling, random_model

    torch.manual_seed(seed)
    processor = random_model.stand_in_processor(variant)
    config = random_model.variant_config(variant, processor.tokenizer, layers)
    config.audio_config = None  # never adapted nor run on images; saves memory here
    model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    if fp32:
        model.float()
    targets = modeling.lora_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randint(0, 2, param.shape, generator=generator) * 2 - 1) * (lr * steps))
    return peft_model.requires_grad_(False), processor


def sample(processor, side: int | None):
    """One noise photo (500x375, or ``side`` px square) with the 37-class prompt and an answer."""
    import numpy as np
    from PIL import Image

    from bench.bench_gpu import random_photos
    from components import prompting
    from components.prepare_dataset import OXFORD_PET_CLASSES

    images = random_photos(1, seed=0) if side is None else [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))]
    batch = prompting.encode_training_batch(processor, images, ["pug"], list(OXFORD_PET_CLASSES))
    batch.pop("labels")
    return [batch]


def cast_base_(peft_model, dtype) -> None:
    """Cast the base weights only (the adapter stays fp32, as PEFT keeps it on the GPU)."""
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(dtype)


def measure(args) -> dict:
    import torch

    from components import merge_export as me

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    peft_model, processor = build(args.variant, args.layers, args.rank, args.alpha, args.lr, args.steps, args.seed,
                                  fp32=not args.weights_only)
    batches = sample(processor, args.image_side)
    out = {"variant": args.variant, "layers": args.layers, "lr": args.lr, "steps": args.steps, "rank": args.rank,
           "alpha": args.alpha, "tokens": int(batches[0]["input_ids"].shape[1])}
    out["bf16_delta_kept"] = me.delta_kept(peft_model, torch.bfloat16)
    print(json.dumps(out), flush=True)
    if args.weights_only:
        return out
    logits = me.compute_logits
    ref32 = logits(peft_model, batches, cpu)
    with peft_model.disable_adapter():
        base32 = logits(peft_model, batches, cpu)
    out["adapter_effect_fp32"] = me.compare_logits(ref32, base32)
    out["step_noise_floor_fp32"] = me.noise_floor(peft_model, batches, cpu, torch.bfloat16)
    print(json.dumps(out), flush=True)
    # bf16 compute, as on a GPU: the base weights are bf16 values already, so casting is exact.
    cast_base_(peft_model, torch.bfloat16)
    with peft_model.disable_adapter():
        base16 = logits(peft_model, batches, cpu)
    out["compute_noise_base_bf16_vs_fp32"] = me.compare_logits(base32, base16)
    ref16 = logits(peft_model, batches, cpu)
    out["unmerged_bf16_vs_ref_fp32"] = me.compare_logits(ref32, ref16)
    out["adapter_effect_bf16"] = me.compare_logits(ref16, base16)
    print(json.dumps(out), flush=True)
    cast_base_(peft_model, torch.float32)
    out["weight_check"] = me.merge_lora_(peft_model, torch.bfloat16)
    merged = peft_model.unload()
    out["merged_bf16_values_fp32_compute_vs_ref"] = me.compare_logits(ref32, logits(merged, batches, cpu))
    merged.to(torch.bfloat16)
    merged16 = logits(merged, batches, cpu)
    out["merged_bf16_compute_vs_ref_fp32"] = me.compare_logits(ref32, merged16)
    out["merged_bf16_compute_vs_unmerged_bf16"] = me.compare_logits(ref16, merged16)
    out["merged_bf16_compute_vs_base_bf16"] = me.compare_logits(base16, merged16)
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="gemma-4-e4b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=None, help="square noise image (default: a 500x375 photo)")
    parser.add_argument("--weights-only", action="store_true", help="skip the logits (no forward passes)")
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args(argv)
    result = measure(args)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
