"""Where the time goes: phases and top CUDA kernels of evaluation and a training step.

    python -m bench.profile_gpu --variant gemma-4-31b

Times each phase of ``evaluate`` at one batch (vision tower, prompt pass, a whole generate,
score mode) on the nf4 base as the bench's evaluation rows run it (``--eval-bf16``: on the bf16
base), with ``--compile`` also generate with the vision encoder layers and the language model's
MLPs compiled; then times training micro-batches (by default 16 with every layer recomputed,
as the ``fast`` preset) with PEFT's own LoRA forward (the step's) and with the fused LoRA adds
lever (bench/fused_lora.py), printing the kernels that take the most GPU time (``--skip-eval``:
training only; ``--skip-train``: evaluation only). ``--attention`` times each SDPA kernel at the
variant's head sizes instead. A diagnostic for choosing levers; ``bench_gpu`` measures the results.
"""

from __future__ import annotations

import argparse
import sys
import time


def timed(device, fn, repeats: int = 1):
    from bench.bench_gpu import sync

    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - start) / repeats


def top_kernels(fn, limit: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=limit, max_name_column_width=60)


SDPA_KERNELS = [("efficient", "EFFICIENT_ATTENTION", False), ("math fp32", "MATH", False), ("math bf16", "MATH", True),
                ("cudnn", "CUDNN_ATTENTION", False), ("flash", "FLASH_ATTENTION", False)]


def time_sdpa_kernels(label: str, shape: tuple[int, int, int, int], mask, device, repeats: int = 5) -> None:
    """Forward and forward+backward milliseconds of one bf16 attention call of ``shape`` (batch,
    heads, tokens, head dim) with ``mask`` (bool, or None), on each SDPA kernel: medians."""
    import statistics

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    for name, backend, bf16_math in SDPA_KERNELS:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(bf16_math)
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
                both = lambda: fwd().backward(grad)
                both()
                times = [(timed(device, fwd)[1], timed(device, both)[1]) for _ in range(repeats)]
            print(f"attention {label}, {name}: forward {statistics.median(t[0] for t in times) * 1e3:.2f} ms, "
                  f"forward+backward {statistics.median(t[1] for t in times) * 1e3:.2f} ms")
        except RuntimeError as error:
            print(f"attention {label}, {name}: not available ({str(error).splitlines()[0][:120]})")
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def time_attention_kernels(config, device, batch: int = 16, seq: int = 509, soft_tokens: int = 266) -> None:
    """Each SDPA kernel at the language model's sliding and global head sizes, as transformers
    calls it (bool mask, key/value heads repeated), and at the vision tower's: every image padded
    to the same patch count with the padding masked, and the real patches alone without a mask
    (what a tower that dropped the padding would run). Which kernel a layer of this width should take."""
    import torch

    text = config.text_config
    mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    mask[10:10 + soft_tokens, 10:10 + soft_tokens] = True  # the image's soft tokens see each other (Gemma 4)
    widths = {kind: text.per_layer_config[i].head_dim for i, kind in enumerate(text.layer_types)}
    for kind, head_dim in widths.items():
        time_sdpa_kernels(f"{kind} (head dim {head_dim})", (batch, text.num_attention_heads, seq, head_dim),
                          mask.expand(batch, 1, seq, seq), device)
    vision = config.vision_config
    patches = vision.default_output_length * vision.pooling_kernel_size**2  # every image is padded to this
    real = soft_tokens * vision.pooling_kernel_size**2  # a 500x375 photo's
    keys = torch.arange(patches, device=device) < real
    shape = (batch, vision.num_attention_heads, patches, vision.head_dim)
    time_sdpa_kernels(f"vision (head dim {vision.head_dim}), {patches} patches, padding masked", shape,
                      keys.expand(batch, 1, patches, patches), device)
    time_sdpa_kernels(f"vision, the {real} real patches, no mask", (*shape[:2], real, shape[3]), None, device)


def profile_training(model, processor, photos, names, device, micros: list[int], recompute_every: int,
                     repeats: int = 3) -> None:
    """The model work of fine-tune micro-batches on the nf4 model, as the step's Trainer runs it
    (bf16 autocast, loss on the answer only, every ``recompute_every``-th layer recomputed), with
    the fused LoRA adds lever and with PEFT's own LoRA forward (the step's): timed interleaved,
    then the kernels that take the most GPU time in each."""
    import statistics

    import torch

    from bench import bench_gpu, fused_lora
    from components import finetune, prompting

    ft = bench_gpu.finetune_config(lora_r=64, batch_size=16, seed=0)
    peft_model, _ = finetune.attach_lora(model, ft, recompute_every)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    for micro in micros:
        batch = prompting.encode_training_batch(processor, photos[:micro], names[:micro], names)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, count = finetune.answer_loss(peft_model, batch)
            (loss / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds = {True: [], False: []}
        for _ in range(repeats):
            for fused in (True, False):
                fused_lora.fuse_lora_adds(peft_model, enabled=fused)
                step()  # warm-up after the switch
                seconds[fused].append(timed(device, step)[1])
        for fused, label in ((True, "fused LoRA adds"), (False, "PEFT's LoRA forward")):
            t = statistics.median(seconds[fused])
            print(f"nf4 train micro-batch {micro}, recompute every {recompute_every}, {label}: "
                  f"{', '.join(f'{x:.3f}' for x in seconds[fused])} s/step, median {micro / t:.2f} samples/s")
        for fused in (True, False):
            fused_lora.fuse_lora_adds(peft_model, enabled=fused)
            print(f"top kernels, micro-batch {micro}, fused LoRA adds {fused}:")
            print(top_kernels(step, 25))
    bench_gpu.release(peft_model, device)


def eval_inputs(processor, photos, names, device):
    """(one prompt batch on ``device``, the generation config of the bench's generate rows)."""
    import torch

    from components import evaluate, prompting

    cpu_batch, t = timed(device, lambda: prompting.encode_prompt_batch(processor, photos, names))
    print(f"encode {len(photos)} prompts on CPU: {t:.3f} s ({torch.get_num_threads()} torch threads)")
    gen = evaluate.generation_config(processor.tokenizer, 9)
    gen.min_new_tokens = 9  # as the bench's rows: every image runs to the cap
    return evaluate._to_device(cpu_batch, device, torch.bfloat16), gen


def profile_evaluation(model, processor, names, device, batch, gen, repeats: int = 3) -> None:
    """Phases of ``evaluate``'s paths at one batch as the bench's rows run them (inference mode,
    bf16 autocast): the vision tower, the prompt pass, a whole generate of 9 tokens and score
    mode, each the median of ``repeats``; then the kernels that take the most GPU time in each."""
    import statistics

    import torch

    from components import evaluate

    b = len(batch["input_ids"])
    scorer = evaluate.CandidateScorer(model, evaluate.answer_token_ids(processor, names),
                                      processor.tokenizer.pad_token_id, device)
    phases = {
        "vision tower": lambda: model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]),
        "prompt pass (cache, last logits)": lambda: model(**batch, use_cache=True, logits_to_keep=1),
        "generate 9 tokens": lambda: model.generate(**batch, generation_config=gen),
        "score": lambda: scorer(batch),
    }
    tokens = int(batch["attention_mask"].sum())
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for name, fn in phases.items():
            fn()
            t = statistics.median(timed(device, fn)[1] for _ in range(repeats))
            print(f"{name}, batch {b} ({tokens} prompt tokens): {t:.3f} s, {b / t:.2f} images/s")
        for name in ("vision tower", "prompt pass (cache, last logits)", "generate 9 tokens"):
            print(f"top kernels, {name}, batch {b}:")
            print(top_kernels(phases[name], 20))


def compile_ab(model, device, batch, gen, repeats: int = 3) -> None:
    """Generate at one batch, eager against each vision encoder layer compiled (fixed shapes:
    every image is padded to the same patch count) and against the language model's MLPs
    compiled too: interleaved repeats, medians. A diagnostic: a lever is a bench row."""
    import statistics

    import torch

    from bench.bench_gpu import decoder_layers, vision_layers

    vision = list(vision_layers(model))
    mlps = [layer.mlp for layer in decoder_layers(model)]
    variants = {"eager": [], "vision layers compiled": vision, "vision layers and MLPs compiled": vision + mlps}
    compiled = {}
    for module in vision + mlps:
        module.compile()
        compiled[module] = module._compiled_call_impl
    generate = lambda: model.generate(**batch, generation_config=gen)
    features = lambda: model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
    seconds = {name: [] for name in variants}
    vision_seconds = {name: [] for name in variants}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(repeats + 1):  # the first round compiles and is not counted
            for name, on in variants.items():
                for module in vision + mlps:
                    module._compiled_call_impl = compiled[module] if module in on else None
                vision_seconds[name].append(timed(device, features)[1])
                seconds[name].append(timed(device, generate)[1])
    for module in vision + mlps:
        module._compiled_call_impl = None
    b = len(batch["input_ids"])
    for name in variants:
        t, v = statistics.median(seconds[name][1:]), statistics.median(vision_seconds[name][1:])
        print(f"generate, {name}: {', '.join(f'{x:.3f}' for x in seconds[name][1:])} s "
              f"(compiling round {seconds[name][0]:.1f} s), median {b / t:.2f} images/s; vision tower {v:.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="gemma-4-31b")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation images per pass (64: the default on 80 GB+)")
    parser.add_argument("--train-micro-batches", default="16", help="comma-separated micro-batch sizes to profile")
    parser.add_argument("--recompute-every", type=int, default=1, help="as the fine-tune step's memory plan; 0: none")
    parser.add_argument("--skip-eval", action="store_true", help="profile training only")
    parser.add_argument("--skip-train", action="store_true", help="profile evaluation only")
    parser.add_argument("--eval-bf16", action="store_true", help="profile evaluation on the bf16 base (default: nf4)")
    parser.add_argument("--compile", action="store_true", help="also time generate with vision layers / MLPs compiled")
    parser.add_argument("--attention", action="store_true", help="time the SDPA kernels at this variant's head sizes only")
    args = parser.parse_args(argv)

    import torch

    from bench import bench_gpu, real_size
    from components import random_model
    from components.prepare_dataset import OXFORD_PET_CLASSES

    device = torch.device("cuda", torch.cuda.current_device())
    names = list(OXFORD_PET_CLASSES)
    processor = random_model.stand_in_processor(args.variant)
    if args.attention:
        time_attention_kernels(random_model.variant_config(args.variant, processor.tokenizer), device)
        return 0
    model = real_size.build_model(random_model.variant_config(args.variant, processor.tokenizer), device, "none")
    micros = [int(m) for m in args.train_micro_batches.split(",")]
    photos = bench_gpu.random_photos(max(args.batch_size, *micros), 0)
    if not args.skip_eval:
        if not args.eval_bf16:
            real_size.quantize_nf4_(model)  # as the bench's evaluation rows, and evaluate on CUDA
        batch, gen = eval_inputs(processor, photos[:args.batch_size], names, device)
        profile_evaluation(model, processor, names, device, batch, gen)
        if args.compile:
            compile_ab(model, device, batch, gen)
        batch = None  # freed before training
        torch.cuda.empty_cache()
    if args.skip_train:
        return 0
    if args.skip_eval or args.eval_bf16:
        real_size.quantize_nf4_(model)
    profile_training(model, processor, photos, names, device, micros, args.recompute_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
