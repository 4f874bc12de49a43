"""Where the time goes: phases and top CUDA kernels of evaluation and a training step.

    python -m bench.profile_gpu --variant gemma-4-31b

Times each phase of ``evaluate`` (image preprocessing, vision tower, prompt prefill, decoding,
score mode's cache copies and candidate passes) on the bf16 base, then quantises to nf4 and
profiles one training micro-batch, printing the kernels that take the most GPU time. A
diagnostic for choosing levers; ``bench_gpu`` measures the results.
"""

from __future__ import annotations

import argparse
import sys
import time


def timed(device, fn, repeats: int = 1):
    import torch

    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) / repeats


def top_kernels(fn, limit: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=limit, max_name_column_width=60)


def profile_training(model, processor, photos, names, device) -> None:
    """The model work of fine-tune micro-batches of 2 and 4 on the nf4 model, as the step's
    Trainer runs it (bf16 autocast, loss on the answer only), without recomputation."""
    import torch

    from bench import bench_gpu
    from components import finetune, prompting

    ft = bench_gpu.finetune_config(lora_r=64, batch_size=16, seed=0, micro_batch_size=2, gradient_checkpointing="off")
    peft_model, _ = finetune.attach_lora(model, ft, 0)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    for micro in (2, 4):
        batch = prompting.encode_training_batch(processor, photos[:micro], names[:micro], names)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, count = finetune.answer_loss(peft_model, batch)
            (loss / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats(device)
        step()
        _, t = timed(device, step, 2)
        print(f"nf4 train micro-batch {micro}, no recompute: {t:.3f} s/step = {micro / t:.2f} samples/s, "
              f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(top_kernels(step, 20))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="gemma-4-31b")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    from bench import bench_gpu, real_size
    from components import random_model
    from components import evaluate, prompting
    from components.prepare_dataset import OXFORD_PET_CLASSES

    device = torch.device("cuda", torch.cuda.current_device())
    names = list(OXFORD_PET_CLASSES)
    processor = random_model.stand_in_processor(args.variant)
    model = real_size.build_model(random_model.variant_config(args.variant, processor.tokenizer), device, "none")
    photos = bench_gpu.random_photos(args.batch_size, 0)
    b = args.batch_size

    cpu_batch, t = timed(device, lambda: prompting.encode_prompt_batch(processor, photos, names))
    print(f"encode {b} prompts on CPU: {t:.3f} s ({torch.get_num_threads()} torch threads)")
    batch = evaluate._to_device(cpu_batch, device, torch.bfloat16)
    with torch.inference_mode():
        features = lambda: model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
        timed(device, features)
        _, t = timed(device, features, 3)
        print(f"vision tower, {b} images: {t:.3f} s")
        prefill = lambda: model(**batch, logits_to_keep=1, use_cache=False)
        timed(device, prefill)
        _, t = timed(device, prefill, 3)
        tokens = int(batch["attention_mask"].sum())
        print(f"prefill (no cache), {b} x {batch['input_ids'].shape[1]}: {t:.3f} s, "
              f"{2 * 29.3e9 * tokens / t / 1e12:.0f} TFLOP/s on the language model's weights")
        print(top_kernels(prefill))
        gen = evaluate.generation_config(processor.tokenizer, 9)
        gen.min_new_tokens = 9
        _, t = timed(device, lambda: model.generate(**batch, generation_config=gen))
        print(f"generate 9 tokens, batch {b}: {t:.3f} s")
        scorer = evaluate.CandidateScorer(model, evaluate.answer_token_ids(processor, names),
                                          processor.tokenizer.pad_token_id, device)
        scorer(batch)
        _, t = timed(device, lambda: scorer(batch))
        print(f"score, batch {b}: {t:.3f} s")
        out, t = timed(device, lambda: model(**batch, position_ids=evaluate.prompt_position_ids(batch["attention_mask"]),
                                              use_cache=True, logits_to_keep=1))
        print(f"  prompt pass with cache: {t:.3f} s")
        rows = torch.arange(min(64, b), device=device)
        _, t = timed(device, lambda: evaluate.select_cache_rows(out.past_key_values, rows.repeat(64 // len(rows))))
        print(f"  select_cache_rows (64 rows): {t:.3f} s")
        print(top_kernels(lambda: scorer(batch)))
    out = scorer = None  # the prompt cache and the scorer's buffers: freed before quantising
    torch.cuda.empty_cache()

    real_size.quantize_nf4_(model)
    profile_training(model, processor, photos, names, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
