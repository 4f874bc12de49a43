"""Training and evaluation speed and memory of Gemma 4: the recipe vs the project's defaults.

    python -m bench.bench_gpu --variant gemma-4-31b --output runs/bench-31b.json   # one H200
    python -m bench.bench_gpu --variant gemma-4-e4b --output runs/bench-e4b.json
    python -m bench.bench_gpu --model-dir runs/tiny-gemma4 --device cpu             # harness smoke run

One process, one model, one set of inputs: the recipe (``bench/recipe.py``) and the project's
configurations are timed one after the other on the same weights, so every ratio comes from
one run. The model is a random-init real-size Gemma 4 (``bench/real_size.py``) or a model folder.

Training rows run the project's own code (``finetune.memory_plan``, ``attach_lora``,
``encode_step``, ``train_step``, with the next step prefetched as ``finetune.run`` does); evaluation rows run ``evaluate``'s ``generate`` and ``score`` paths,
image preprocessing included, on the base model. Memory presets run under a cap on the caching
allocator (``torch.cuda.set_per_process_memory_fraction``) equal to the card they are for.

Model FLOPs per training sample follow the usual 6N convention, ``6 x (language-model weights x
tokens + vision weights x patches)``, against the H200's measured dense bf16 rate; a LoRA run
over a frozen base needs only about 4N of it (no weight gradients for the base).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from components.cli import UserError, entrypoint, parse_config
from components.files import write_json_atomic

PEAK_BF16_FLOPS = 790e12  # dense bf16 matmul rate measured on an H200 of this workplace (FLOP/s)
RECIPE_JOB = {"train_samples": 700 * 3, "eval_images": 2 * 200}  # 700 samples x 3 epochs; eval before and after
GIB = 2**30
# Memory cap (GiB of allocator memory) each preset is timed under: about the smallest card it is
# meant for. The CUDA context (~0.5 GiB) comes on top, and an L4 shows ~22 GiB, not 24.
PRESET_CARDS_GIB = {"fast": 78, "40gb": 40, "24gb": 24}


@dataclass
class BenchConfig:
    """Time the recipe and the project's defaults on one model, in one process."""

    output: str = field(metadata={"help": "JSON file to write (rows, environment, derived figures)"})
    variant: str = field(default="", metadata={"help": "random-init real-size model: gemma-4-31b, gemma-4-e4b, gemma-4-e2b"})
    model_dir: str = field(default="", metadata={"help": "or a model folder (the tiny stand-in, for a smoke run)"})
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu"})
    quantization: str = field(default="auto", metadata={"help": "nf4 or none; auto: nf4 on CUDA", "choices": ["auto", "nf4", "none"]})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank of the recipe and the project's rows"})
    batch_size: int = field(default=16, metadata={"help": "samples per optimizer step (the recipe's 1 x 16)"})
    timed_steps: int = field(default=2, metadata={"help": "optimizer steps timed per project row, after one warm-up micro-batch"})
    recipe_micro_batches: int = field(default=16, metadata={"help": "recipe micro-batches run; the first 2 are warm-up"})
    presets: str = field(default="fast,40gb,24gb", metadata={"help": "memory presets to time, each under its card's memory"})
    levers: bool = field(default=True, metadata={"help": "also time levers one at a time against the default"})
    evaluation: bool = field(default=True, metadata={"help": "time evaluation (generate, score) too"})
    bf16_base: bool = field(default=False, metadata={"help": "first time training and evaluation on the bf16 base, then quantise"})
    eval_batches: int = field(default=2, metadata={"help": "timed batches per evaluation row, after one warm-up batch"})
    eval_batch_sizes: str = field(default="64", metadata={"help": "project evaluation batch sizes to time"})
    recipe_long_generation: bool = field(default=True, metadata={"help": "also time the recipe's generate at 128 new tokens"})
    seed: int = field(default=0, metadata={"help": "seed of weights, images and LoRA init"})

    def __post_init__(self) -> None:
        if bool(self.variant) == bool(self.model_dir):
            raise ValueError("give exactly one of --variant and --model-dir")
        for name in ("lora_r", "batch_size", "timed_steps", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.recipe_micro_batches < 3:
            raise ValueError("--recipe-micro-batches must be at least 3 (2 are warm-up)")
        try:
            sizes = [int(x) for x in self.eval_batch_sizes.split(",")]
        except ValueError:
            raise ValueError(f"--eval-batch-sizes {self.eval_batch_sizes!r}: give comma-separated integers") from None
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"--eval-batch-sizes {self.eval_batch_sizes!r}: give positive integers")
        unknown = set(filter(None, self.presets.split(","))) - set(PRESET_CARDS_GIB)
        if unknown:
            raise ValueError(f"--presets: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PRESET_CARDS_GIB)})")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


class MemoryCap:
    """Limit the caching allocator to ``gib`` GiB of the card (None: no limit)."""

    def __init__(self, device, gib: float | None):
        import torch

        self.device, self.gib = device, gib
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None

    def __enter__(self):
        import torch

        if self.device.type == "cuda" and self.gib:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gib * GIB / total), self.index)
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda" and self.gib:
            torch.cuda.set_per_process_memory_fraction(1.0, self.index)
        return False


def environment(device) -> dict:
    import importlib.metadata as md
    import subprocess

    import torch

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
           "host": platform.node(), "device": str(device)}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def random_photos(count: int, seed: int):
    """Noise images the size of a typical Oxford-IIIT Pet photo (never all zeros)."""
    import numpy as np
    from PIL import Image

    from bench.real_size import PHOTO_SIZE

    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


@dataclass
class Sample:
    """The two fields ``finetune.train_step`` reads from a dataset example."""

    photo: object
    label_name: str

    def image(self):
        return self.photo


# --------------------------------------------------------------------------------------------
# Training rows
# --------------------------------------------------------------------------------------------


def detach_lora(peft_model):
    """The base model back, adapters removed unmerged and recomputation switched off."""
    base = peft_model.unload()
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    base.requires_grad_(False)
    return base


def release(peft_model, device):
    """After a training row: the base model back as the project loads it, memory freed."""
    from components import modeling

    peft_model.zero_grad(set_to_none=True)
    model = detach_lora(peft_model)
    modeling.fuse_rms_norms(model, enabled=device.type == "cuda")
    del peft_model
    reset_memory(device)
    return model


def finetune_config(lora_r: int, batch_size: int, seed: int, **overrides):
    """The project's fine-tune config for a timed row (paths unused: the bench supplies the data)."""
    from components import finetune

    values = dict(model_dir="-", dataset_dir="-", output_dir="-", lora_r=lora_r, lora_alpha=lora_r,
                  batch_size=batch_size, seed=seed)
    values.update(overrides)
    return finetune.FinetuneConfig(**values)


def train_row_project(model, processor, samples, class_names, cfg: BenchConfig, device, *, name: str,
                      cap_gib: float | None = None, fused_norms: bool = True, lora_r: int | None = None,
                      **overrides) -> tuple[object, dict]:
    """Time the project's loop: one warm-up micro-batch, then ``timed_steps`` optimizer steps.
    ``lora_r`` (alpha the same) replaces the bench's rank; ``overrides`` are FinetuneConfig fields."""
    import torch

    from components import finetune, modeling, prompting

    modeling.fuse_rms_norms(model, enabled=fused_norms and device.type == "cuda")

    ft = finetune_config(lora_r or cfg.lora_r, cfg.batch_size, cfg.seed, **overrides)
    preset, micro, recompute_every = finetune.memory_plan(ft, device)
    row = {"row": name, "kind": "train", "loop": "project", "memory_preset": preset, "micro_batch_size": micro,
           "batch_size": ft.batch_size, "recompute_every": recompute_every, "lora_r": ft.lora_r,
           "memory_cap_gib": cap_gib}
    reset_memory(device)
    torch.manual_seed(cfg.seed)
    peft_model, targets = finetune.attach_lora(model, ft, recompute_every)
    row["lora_layers"] = len(targets)
    try:
        with MemoryCap(device, cap_gib):
            peft_model.train()
            causal_lm = peft_model.get_base_model()
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=ft.learning_rate, fused=device.type == "cuda")
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            def step(batches):
                return finetune.train_step(causal_lm, batches, device, optimizer, scheduler, trainable, ft.max_grad_norm)

            def encode(window):
                return finetune.encode_step(processor, [window[i : i + micro] for i in range(0, len(window), micro)],
                                            class_names, ft)

            step(encode(samples[:micro]))  # warm-up: kernels, allocator, autotuning
            timed_steps = 1 if micro == 1 else cfg.timed_steps  # micro-batch 1 is slow; one step is 16 samples
            windows = [samples[(i + 1) * ft.batch_size : (i + 2) * ft.batch_size] for i in range(timed_steps)]
            sync(device)
            start = time.perf_counter()
            # As finetune.run: the next step is encoded on a CPU thread while this one runs.
            losses = [step(batches) for batches in prompting.prefetched(encode, windows)]
            sync(device)
            seconds = time.perf_counter() - start
            row.update(samples_per_s=timed_steps * ft.batch_size / seconds, seconds=seconds,
                       timed_samples=timed_steps * ft.batch_size, losses=losses, peak_gib=peak_gib(device))
    except torch.OutOfMemoryError as error:
        row.update(error=f"out of memory: {str(error).splitlines()[0]}", peak_gib=peak_gib(device))
    finally:
        model = release(peft_model, device)
    return model, row


def train_row_recipe(model, processor, samples, class_names, cfg: BenchConfig, device) -> tuple[object, dict]:
    """Time the recipe's Trainer loop over ``recipe_micro_batches`` micro-batches of 1 sample."""
    import torch

    from bench import recipe
    from components import finetune, modeling

    ft = finetune_config(cfg.lora_r, cfg.batch_size, cfg.seed)
    n = cfg.recipe_micro_batches
    row = {"row": "recipe", "kind": "train", "loop": "transformers.Trainer", "micro_batch_size": recipe.RECIPE_MICRO_BATCH,
           "batch_size": min(n, recipe.RECIPE_GRAD_ACCUM), "recompute_every": 1, "lora_r": ft.lora_r}
    reset_memory(device)
    torch.manual_seed(cfg.seed)
    # LoRA placed by the same function, so rank, targets and alpha are the project's exactly.
    peft_model, targets = finetune.attach_lora(model, ft, recompute_every=0)  # Trainer switches recomputation on
    row["lora_layers"] = len(targets)
    modeling.fuse_rms_norms(model, enabled=False)  # the recipe runs transformers' own modules
    try:
        tensors = recipe.sample_tensors(processor, [s.photo for s in samples[:n]],
                                        [s.label_name for s in samples[:n]], class_names)
        with tempfile.TemporaryDirectory() as out:
            result = recipe.train(peft_model, tensors, out, max_steps=math.ceil(n / recipe.RECIPE_GRAD_ACCUM),
                                  learning_rate=ft.learning_rate, grad_accum_steps=min(n, recipe.RECIPE_GRAD_ACCUM),
                                  seed=cfg.seed)
        marks = result["marks"]  # marks[i]: end of micro-batch i (marks[0]: start)
        seconds = marks[-1] - marks[2]  # micro-batches 3.. n; the optimizer step falls inside
        row.update(samples_per_s=(len(marks) - 3) / seconds, seconds=seconds, timed_samples=len(marks) - 3,
                   losses=result["losses"], peak_gib=peak_gib(device))
    except torch.OutOfMemoryError as error:
        row.update(error=f"out of memory: {str(error).splitlines()[0]}", peak_gib=peak_gib(device))
    finally:
        model = release(peft_model, device)
    return model, row


# --------------------------------------------------------------------------------------------
# Evaluation rows
# --------------------------------------------------------------------------------------------


def eval_row(model, processor, photos, class_names, cfg: BenchConfig, device, *, name: str, mode: str,
             batch_size: int, max_new_tokens: int | None = None, batches: int | None = None,
             fused_norms: bool = True) -> dict:
    """Images/s of ``evaluate``'s generate or score path, preprocessing included."""
    import torch

    from components import evaluate, modeling, prompting

    modeling.fuse_rms_norms(model, enabled=fused_norms and device.type == "cuda")

    row = {"row": name, "kind": "eval", "mode": mode, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    batches = batches or cfg.eval_batches
    reset_memory(device)
    dtype = modeling.compute_dtype(device)
    tokenizer = processor.tokenizer
    if mode == "score":
        run_batch = evaluate.CandidateScorer(model, evaluate.answer_token_ids(processor, class_names),
                                             tokenizer.pad_token_id, device)
    else:
        gen_config = evaluate.generation_config(tokenizer, max_new_tokens)
        # Random weights rarely say <turn|>: make every row run to the cap, as an untuned baseline does.
        gen_config.min_new_tokens = max_new_tokens

        def run_batch(batch):
            return evaluate.generate_answers(model, tokenizer, batch, gen_config)

    def encode(i):
        chunk = [photos[(i * batch_size + j) % len(photos)] for j in range(batch_size)]
        return prompting.encode_prompt_batch(processor, chunk, class_names)

    try:
        # As evaluate.run: inference mode, bf16 autocast on CUDA, the next batch encoded on a thread.
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            run_batch(evaluate._to_device(encode(0), device, dtype))  # warm-up
            sync(device)
            start = time.perf_counter()
            for batch in prompting.prefetched(encode, range(1, batches + 1)):
                run_batch(evaluate._to_device(batch, device, dtype))
            sync(device)
        seconds = time.perf_counter() - start
        row.update(images_per_s=batches * batch_size / seconds, seconds=seconds, timed_images=batches * batch_size,
                   peak_gib=peak_gib(device))
    except torch.OutOfMemoryError as error:
        row.update(error=f"out of memory: {str(error).splitlines()[0]}", peak_gib=peak_gib(device))
    modeling.fuse_rms_norms(model, enabled=device.type == "cuda")
    reset_memory(device)
    return row


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def model_flops_per_sample(counts: dict, tokens: int, patches: int) -> float:
    return 6 * (counts.get("language_model", 0) * tokens + counts.get("vision", 0) * patches)


def log(row: dict) -> None:
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "losses"}
    print(json.dumps(shown), flush=True)


def run(cfg: BenchConfig) -> dict:
    import torch

    from bench import real_size, recipe
    from components import random_model
    from components import evaluate, finetune, modeling, prompting
    from components.prepare_dataset import OXFORD_PET_CLASSES

    device = modeling.pick_device(cfg.device)
    if cfg.variant and device.type != "cuda":
        raise ValueError(f"--variant {cfg.variant} builds a real-size model and needs a CUDA GPU "
                         "(use --model-dir with the tiny model for a CPU smoke run)")
    quantization = modeling.resolve_quantization(cfg.quantization, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    class_names = list(OXFORD_PET_CLASSES)
    result = {"config": dataclasses.asdict(cfg), "environment": environment(device), "rows": []}
    output = Path(cfg.output)

    began = time.perf_counter()

    def record(row):
        row["at_s"] = round(time.perf_counter() - began, 1)  # when the row finished, for the log
        result["rows"].append(row)
        log(row)
        write_json_atomic(output, result)  # after every row: a run cut off keeps what it measured

    built = time.perf_counter()
    if cfg.variant:
        processor = random_model.stand_in_processor(cfg.variant)
        config = random_model.variant_config(cfg.variant, processor.tokenizer)
        model = real_size.build_model(config, device, "none" if cfg.bf16_base else quantization)
    else:
        processor = modeling.load_processor(cfg.model_dir)
        model = modeling.load_model(cfg.model_dir, device, "none" if cfg.bf16_base else quantization)
        model.requires_grad_(False)
    counts = real_size.parameter_counts(model)
    photos = random_photos(cfg.batch_size * (cfg.timed_steps + 1), cfg.seed)
    samples = [Sample(p, random.choice(class_names)) for p in photos]
    probe = prompting.encode_training_batch(processor, photos[:1], [class_names[0]], class_names)
    tokens = int(probe["attention_mask"].sum())
    soft_tokens = int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image|>")).sum())
    patches = int(probe["pixel_values"].shape[1])
    candidates = evaluate.answer_token_ids(processor, class_names)
    cap = max(len(c) for c in candidates) + 1  # longest answer (name + <turn|>) plus one
    result["model"] = {"source": cfg.variant or cfg.model_dir, "parameters": counts,
                       "parameters_total": sum(counts.values()), "sample_tokens": tokens,
                       "image_soft_tokens": soft_tokens, "image_patches": patches,
                       "generate_cap_new_tokens": cap, "build_seconds": time.perf_counter() - built,
                       "model_flops_per_sample": model_flops_per_sample(counts, tokens, patches)}
    print(json.dumps(result["model"]), flush=True)
    sizes = [int(x) for x in cfg.eval_batch_sizes.split(",")]

    if cfg.bf16_base:
        # Lever: the unquantised base (bf16 on CUDA, fp32 on CPU). Same rows, then quantise in
        # place for the nf4 rows.
        plain = "bf16" if device.type == "cuda" else "fp32"
        for micro in (2, 4):
            model, row = train_row_project(model, processor, samples, class_names, cfg, device,
                                           name=f"bf16 base, micro-batch {micro}, no recompute",
                                           micro_batch_size=micro, gradient_checkpointing="off")
            record({**row, "base": plain})
        record({**eval_row(model, processor, photos, class_names, cfg, device, name="generate, bf16 base",
                           mode="generate", batch_size=sizes[-1], max_new_tokens=cap), "base": plain})
        record({**eval_row(model, processor, photos, class_names, cfg, device, name="score, bf16 base",
                           mode="score", batch_size=sizes[-1]), "base": plain})
        if quantization == "nf4":
            real_size.quantize_nf4_(model)
            reset_memory(device)
    base = quantization

    # Training: the recipe, then the project's defaults for this GPU, then each memory preset
    # under its card's memory, then levers one at a time.
    model, row = train_row_recipe(model, processor, samples, class_names, cfg, device)
    record({**row, "base": base})
    model, row = train_row_project(model, processor, samples, class_names, cfg, device, name="project default")
    record({**row, "base": base})
    # Each preset under the memory of the smallest card it is for (the CUDA context, ~0.5 GiB,
    # comes on top); the 24 GB preset at r=16, as it is meant for. On CPU the rows still run (the
    # CPU plan, no cap), so a CPU run exercises every row's code (tests/test_bench.py).
    for preset in filter(None, cfg.presets.split(",")):
        rank = 16 if preset == "24gb" else cfg.lora_r
        model, row = train_row_project(model, processor, samples, class_names, cfg, device,
                                       name=f"preset {preset}", cap_gib=PRESET_CARDS_GIB[preset],
                                       memory_preset=preset, lora_r=rank)
        record({**row, "base": base})
    if cfg.levers:
        # One lever at a time against the default; docs/benchmarks.md lists the others, measured
        # in earlier runs of this harness.
        model, row = train_row_project(model, processor, samples, class_names, cfg, device,
                                       name="lever: default without fused norms", fused_norms=False)
        record({**row, "base": base})
        for micro, recompute in ((8, "every-2"), (4, "off")):
            if cfg.batch_size % micro == 0:
                model, row = train_row_project(model, processor, samples, class_names, cfg, device,
                                               name=f"lever: micro-batch {micro}, recompute {recompute}",
                                               micro_batch_size=micro, gradient_checkpointing=recompute)
                record({**row, "base": base})

    # Evaluation on the base model: the recipe's (transformers' own modules), then the project's
    # at its default batch for this GPU and at the largest asked for.
    if not cfg.evaluation:
        result["summary"] = summarize(result)
        write_json_atomic(output, result)
        print(render_markdown(result))
        return result
    model.eval()
    recipe_eval = dict(mode="generate", batch_size=recipe.RECIPE_EVAL_BATCH, fused_norms=False)
    record({**eval_row(model, processor, photos, class_names, cfg, device, name="recipe generate",
                       max_new_tokens=cap, **recipe_eval), "base": base})
    if cfg.recipe_long_generation:
        record({**eval_row(model, processor, photos, class_names, cfg, device, name="recipe generate, 128 tokens",
                           max_new_tokens=recipe.RECIPE_MAX_NEW_TOKENS, batches=1, **recipe_eval), "base": base})
    default_size = evaluate.default_batch_size(device)
    for size in sorted(set(sizes + [default_size])):
        tag = " (default)" if size == default_size else f" (batch {size})"
        record({**eval_row(model, processor, photos, class_names, cfg, device, name=f"project generate{tag}",
                           mode="generate", batch_size=size, max_new_tokens=cap), "base": base})
        record({**eval_row(model, processor, photos, class_names, cfg, device, name=f"project score{tag}",
                           mode="score", batch_size=size), "base": base})

    result["summary"] = summarize(result)
    write_json_atomic(output, result)
    print(render_markdown(result))
    return result


# --------------------------------------------------------------------------------------------
# Derived figures and the table
# --------------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    """Ratios against the recipe and the recipe job's wall time, from this run's rows."""
    rows = {r["row"]: r for r in result["rows"] if "error" not in r}
    flops = result["model"]["model_flops_per_sample"]
    summary = {"mfu": {name: r["samples_per_s"] * flops / PEAK_BF16_FLOPS
                       for name, r in rows.items() if r["kind"] == "train"}}
    recipe_train = rows.get("recipe", {}).get("samples_per_s")
    recipe_eval = rows.get("recipe generate", {}).get("images_per_s")
    if recipe_train:
        summary["train_speedup"] = {name: r["samples_per_s"] / recipe_train
                                    for name, r in rows.items() if r["kind"] == "train"}
    if recipe_eval:
        summary["eval_speedup"] = {name: r["images_per_s"] / recipe_eval
                                   for name, r in rows.items() if r["kind"] == "eval"}

    def job_minutes(train_rate, eval_rate):
        return (RECIPE_JOB["train_samples"] / train_rate + RECIPE_JOB["eval_images"] / eval_rate) / 60

    project_train = rows.get("project default", {}).get("samples_per_s")
    project_eval = max((r["images_per_s"] for n, r in rows.items() if n.startswith("project generate")), default=None)
    default_eval = next((r["images_per_s"] for n, r in rows.items() if n == "project generate (default)"), project_eval)
    if recipe_train and recipe_eval:
        summary["recipe_job_minutes"] = job_minutes(recipe_train, recipe_eval)
    if project_train and default_eval:
        summary["project_job_minutes"] = job_minutes(project_train, default_eval)
    return summary


def recompute_label(every: int) -> str:
    return {0: "no", 1: "every layer"}.get(every, f"every {every}th layer" if every > 2 else "every 2nd layer")


def render_markdown(result: dict) -> str:
    env, model, summary = result["environment"], result["model"], result.get("summary", {})
    lines = [f"**{model['source']}**, {model['parameters_total'] / 1e9:.2f} B parameters, "
             f"{model['sample_tokens']}-token samples ({model['image_soft_tokens']} soft tokens), "
             f"{env.get('gpu', env['device'])}, {env['date']}",
             "", "| training | loop | micro x accum | recompute | r | cap | samples/s | vs recipe | MFU (6N) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] != "train":
            continue
        accum = r["batch_size"] // r["micro_batch_size"]
        cap = f"{r['memory_cap_gib']} GiB" if r.get("memory_cap_gib") else "-"
        if "error" in r:
            speed = speedup = mfu = r["error"][:40]
        else:
            speed = f"{r['samples_per_s']:.2f}"
            speedup = f"{summary.get('train_speedup', {}).get(r['row'], float('nan')):.2f}x"
            mfu = f"{summary['mfu'][r['row']]:.1%}"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['row']} ({r.get('base', '')}) | {r['loop']} | {r['micro_batch_size']} x {accum} | "
                     f"{recompute_label(r['recompute_every'])} | {r['lora_r']} | {cap} | {speed} | {speedup} | "
                     f"{mfu} | {peak} |")
    lines += ["", "| evaluation | mode | batch | new tokens | images/s | vs recipe | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] != "eval":
            continue
        if "error" in r:
            speed = speedup = r["error"][:40]
        else:
            speed = f"{r['images_per_s']:.2f}"
            speedup = f"{summary.get('eval_speedup', {}).get(r['row'], float('nan')):.2f}x"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['row']} ({r.get('base', '')}) | {r['mode']} | {r['batch_size']} | {r['max_new_tokens'] or '-'} | "
                     f"{speed} | {speedup} | {peak} |")
    for key, label in (("recipe_job_minutes", "recipe job (2,100 training samples + 400 eval images), recipe"),
                       ("project_job_minutes", "same job, project defaults")):
        if key in summary:
            lines.append(f"\n{label}: {summary[key]:.1f} min")
    return "\n".join(lines)


@entrypoint
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv)
    try:
        run(cfg)
    except ValueError as err:  # bad input found before any model is built: one line, exit 2
        raise UserError(str(err)) from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
