"""Training and evaluation speed and memory of Gemma 4: the recipe, TRL and the project's loop.

    python -m bench.bench_gpu --variant gemma-4-31b --output runs/bench-31b.json --plan   # rows, steps, time estimate
    python -m bench.bench_gpu --variant gemma-4-31b --output runs/bench-31b.json          # one H200
    python -m bench.bench_gpu --variant gemma-4-31b --output runs/train-31b.json --rows train
    python -m bench.bench_gpu --variant gemma-4-e4b --output runs/bench-e4b.json --rows recipe,default,generate
    python -m bench.bench_gpu --model-dir runs/tiny-gemma4 --device cpu --output x.json   # harness smoke run

One process, one model, one set of inputs: every row is timed on the same weights, so every ratio
comes from one run. The model is a random-init real-size Gemma 4 (``bench/real_size.py``) or a
model folder. Rows are timed ``--repeats`` times, interleaved (round 1 runs every selected row
once, then round 2, ...), and reported as the median with its spread; docs/benchmarks.md says
how. Each repeat of a row sets the row up afresh (LoRA attached, optimizer made), runs an
untimed warm-up and then the timed steps.

Training rows run the project's own code (``finetune.memory_plan``, ``attach_lora`` and the
fine-tune step's Trainer, ``answer_trainer.make_trainer``), the recipe's ``transformers.Trainer``
(``bench/recipe.py``) or TRL's ``SFTTrainer`` set up at its best (``bench/trl_peer.py``);
evaluation rows run ``evaluate``'s ``generate`` and ``score`` paths, image preprocessing
included, on the base model. Memory presets run under a cap on the caching
allocator (``torch.cuda.set_per_process_memory_fraction``) equal to the card they are for.

Model FLOPs per training sample follow the usual 6N convention, ``6 x (language-model weights x
tokens + vision weights x patches)``, against the H200's measured dense bf16 rate; a LoRA run
over a frozen base needs only about 4N of it (no weight gradients for the base).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from components.cli import UserError, entrypoint, parse_config
from components.files import write_json_atomic

PEAK_BF16_FLOPS = 790e12  # dense bf16 matmul rate measured on an H200 of this workplace (FLOP/s)
RECIPE_JOB = {"train_samples": 700 * 3, "eval_images": 2 * 200}  # 700 samples x 3 epochs; eval before and after
GIB = 2**30
# Memory cap (GiB of allocator memory) each preset is timed under: about the smallest card it is
# meant for. The CUDA context (~0.5 GiB) comes on top, and an L4 shows ~22 GiB, not 24.
PRESET_CARDS_GIB = {"fast": 78, "40gb": 40, "24gb": 24}
# Cards the presets are derived for from the medians: (allocator GiB a row may peak at, LoRA
# rank). "over-100gb" is the card the bench runs on when it has more than 100 GB.
CARDS = {"over-100gb": (None, 64), "80gb": (PRESET_CARDS_GIB["fast"], 64), "40gb": (PRESET_CARDS_GIB["40gb"], 64),
         "24gb": (PRESET_CARDS_GIB["24gb"], 16)}
# Issue 16's goals (31B, r=64, one H200, medians), checked in the summary.
GOALS = {"train_speedup": 8.0, "generate_speedup": 4.0, "project_job_minutes": 8.0}
TRL_MOVE_WITHIN = 0.10  # move the fine-tune step onto TRL if it is within this of the project's loop
# Attention kernels tried by the attention lever (--attention auto), fastest first, by the module
# each needs: the row is skipped when none installs.
ATTENTION_KERNELS = {"flash_attention_3": "flash_attn_interface", "flash_attention_2": "flash_attn"}
# For the time estimate only (--plan and the plan printed before a run): rough model-FLOP
# utilisations by kind of row, from the runs in docs/benchmarks.md; after round 1 the bench
# prints the measured time instead.
ROUGH_MFU = {"project": 0.33, "small-micro": 0.15, "recipe": 0.06, "trl": 0.25, "eval": 0.35,
             "recipe-eval": 0.12, "long-eval": 0.02}
ROUGH_SETUP_S = 6.0  # attach LoRA, optimizer, release: per row and repeat
ROUGH_COMPILE_S = 120.0  # torch.compile on the first repeat of a compiled row


@dataclass
class BenchConfig:
    """Time the recipe, TRL and the project's loop on one model, in one process."""

    output: str = field(metadata={"help": "JSON file to write (rows, environment, derived figures)"})
    variant: str = field(default="", metadata={"help": "random-init real-size model: gemma-4-31b, gemma-4-e4b, gemma-4-e2b"})
    model_dir: str = field(default="", metadata={"help": "or a model folder (the tiny stand-in, for a smoke run)"})
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu"})
    quantization: str = field(default="auto", metadata={"help": "nf4 or none; auto: nf4 on CUDA", "choices": ["auto", "nf4", "none"]})
    rows: str = field(default="train,eval", metadata={"help": "rows to time: comma-separated row ids or groups "
                                                           "(--plan lists them; 'all' adds the bf16-base and 128-token rows)"})
    repeats: int = field(default=3, metadata={"help": "times each row is timed, interleaved; the table shows medians"})
    plan: bool = field(default=False, metadata={"help": "print the rows, their steps and a rough GPU time, then stop"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank of the recipe and the project's rows"})
    batch_size: int = field(default=16, metadata={"help": "samples per optimizer step (the recipe's 1 x 16)"})
    timed_steps: int = field(default=1, metadata={"help": "optimizer steps timed per training row and repeat, after a warm-up"})
    recipe_micro_batches: int = field(default=16, metadata={"help": "recipe micro-batches per repeat; the first 2 are warm-up"})
    eval_batches: int = field(default=2, metadata={"help": "timed batches per evaluation row and repeat, after one warm-up batch"})
    eval_batch_sizes: str = field(default="", metadata={"help": "extra project evaluation batch sizes to time, besides the card's default"})
    attention: str = field(default="auto", metadata={"help": "attention lever's implementation; auto: the first of "
                                                             + ", ".join(ATTENTION_KERNELS) + " that installs"})
    seed: int = field(default=0, metadata={"help": "seed of weights, images and LoRA init"})

    def __post_init__(self) -> None:
        if bool(self.variant) == bool(self.model_dir):
            raise ValueError("give exactly one of --variant and --model-dir")
        for name in ("lora_r", "batch_size", "timed_steps", "eval_batches", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.recipe_micro_batches < 3:
            raise ValueError("--recipe-micro-batches must be at least 3 (2 are warm-up)")
        if self.batch_size % 2:
            raise ValueError("--batch-size must be even (the 24gb preset's micro-batch is 2)")
        try:
            sizes = [int(x) for x in filter(None, self.eval_batch_sizes.split(","))]
        except ValueError:
            raise ValueError(f"--eval-batch-sizes {self.eval_batch_sizes!r}: give comma-separated integers") from None
        if sizes and min(sizes) <= 0:
            raise ValueError(f"--eval-batch-sizes {self.eval_batch_sizes!r}: give positive integers")
        select_rows(row_specs(self), self.rows)  # names an unknown row or group


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
        torch.cuda.reset_accumulated_memory_stats(device)  # alloc_retries counts from here


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def peaks(device) -> dict:
    """Peak allocated memory, peak reserved by the caching allocator (what must fit a card), and
    how often the allocator, at the card's or the cap's limit, freed its cache and retried (each a
    device sync: a suspect for the slow capped presets, docs/benchmarks.md round 6)."""
    import torch

    if device.type != "cuda":
        return {"peak_gib": None, "peak_reserved_gib": None}
    return {"peak_gib": peak_gib(device), "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
            "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0)}


class MemoryCap:
    """Limit the caching allocator to ``gib`` GiB of the card (None: no limit); with
    ``expandable_segments``, the row's new allocations go to segments that grow in place instead
    of fixed blocks, the allocator's remedy for fragmentation near a limit (PyTorch's CUDA
    memory docs, PYTORCH_CUDA_ALLOC_CONF; set at run time as PyTorch's own
    test_cuda_expandable_segments.py does)."""

    def __init__(self, device, gib: float | None, expandable_segments: bool = False):
        import torch

        self.device, self.gib = device, gib
        self.expandable = expandable_segments and device.type == "cuda"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None

    def __enter__(self):
        import torch

        if self.device.type == "cuda" and self.gib:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gib * GIB / total), self.index)
        if self.expandable:
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda" and self.gib:
            torch.cuda.set_per_process_memory_fraction(1.0, self.index)
        if self.expandable:
            torch.cuda.empty_cache()
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        return False


class GpuClocks:
    """The card's SM clock, temperature, power and clock-event reasons sampled by nvidia-smi every
    500 ms during one repeat: the first suspect when one row's repeats, or the evaluation rows
    after the training rows, run slower (docs/benchmarks.md round 10). Nothing without nvidia-smi."""

    def __init__(self, device):
        import os
        import shutil

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        index = device.index or 0
        self.gpu = visible[index] if index < len(visible) and visible[index].strip() else str(index)
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.process, self.summary = None, {}

    def __enter__(self):
        import subprocess

        if self.on:
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={self.gpu}", f"--query-gpu={clock_query()}", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.summary = summarize_clocks(self.process.communicate(timeout=30)[0].splitlines())
        return False


@functools.lru_cache(maxsize=1)
def clock_query() -> str:
    """nvidia-smi's fields; the reasons field was renamed from clocks_throttle_reasons in driver 535."""
    import subprocess

    fields = subprocess.run(["nvidia-smi", "--help-query-gpu"], capture_output=True, text=True, timeout=30).stdout
    reasons = "clocks_event_reasons.active" if "clocks_event_reasons.active" in fields else "clocks_throttle_reasons.active"
    return f"clocks.sm,temperature.gpu,power.draw,{reasons}"


def summarize_clocks(lines: list[str]) -> dict:
    """nvidia-smi's CSV samples -> medians and extremes; unreadable fields ([N/A]) are skipped."""
    clocks, temps, watts, reasons = [], [], [], set()
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        for values, text in ((clocks, fields[0]), (temps, fields[1]), (watts, fields[2])):
            try:
                values.append(float(text))
            except ValueError:
                pass
        if fields[3].startswith("0x") and int(fields[3], 16):
            reasons.add(fields[3])
    if not clocks:
        return {}
    return {"gpu_samples": len(clocks), "sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks),
            "temperature_c_max": max(temps, default=None),
            "power_w_median": statistics.median(watts) if watts else None, "clock_event_reasons": sorted(reasons)}


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
    """The two fields the fine-tune step reads from a dataset example."""

    photo: object
    label_name: str

    def image(self):
        return self.photo


# --------------------------------------------------------------------------------------------
# Training rows: one repeat each (set up, untimed warm-up, timed steps, release)
# --------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every row of a run shares: the inputs, the device and the config."""

    cfg: BenchConfig
    device: object
    processor: object
    class_names: list
    photos: list
    samples: list
    generate_cap: int  # new tokens a generate row runs to (longest answer + 1)
    trl_micro: dict = field(default_factory=dict)  # the TRL row's micro-batch once one fitted


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


def out_of_memory(row: dict, error, device) -> dict:
    return {**row, "error": f"out of memory: {str(error).splitlines()[0]}", "peak_gib": peak_gib(device)}


def decoder_layers(causal_lm):
    return causal_lm.model.language_model.layers


def vision_layers(causal_lm):
    return causal_lm.model.vision_tower.encoder.layers


def attention_kernel(choice: str) -> tuple[str | None, str]:
    """(implementation, why): the attention lever's kernel, or None and the reason it is skipped."""
    if choice != "auto":
        return choice, "asked for (--attention)"
    for implementation, module in ATTENTION_KERNELS.items():
        if importlib.util.find_spec(module) is not None:
            return implementation, f"{module} installed"
    return None, f"none of {', '.join(ATTENTION_KERNELS.values())} installs here"


def train_row_project(model, ctx: Context, *, name: str, cap_gib: float | None = None, fused_norms: bool = True,
                      lora_r: int | None = None, compile_layers: bool = False, attention: str | None = None,
                      expandable_segments: bool = False, fused_lora: bool = False, **overrides) -> tuple[object, dict]:
    """One repeat of the fine-tune step's Trainer: one warm-up optimizer step, then ``timed_steps``
    steps. ``lora_r`` (alpha the same) replaces the bench's rank; ``compile_layers`` compiles each
    decoder layer (regional torch.compile); ``attention`` switches the attention kernel;
    ``expandable_segments``: the allocator's (MemoryCap); ``fused_lora``: LoRA's update as one addmm
    (bench/fused_lora.py); ``overrides`` are FinetuneConfig fields."""
    import torch

    from bench import fused_lora as fused_lora_lever
    from components import finetune, modeling

    cfg, device = ctx.cfg, ctx.device
    modeling.fuse_rms_norms(model, enabled=fused_norms and device.type == "cuda")
    ft = finetune_config(lora_r or cfg.lora_r, cfg.batch_size, cfg.seed, **overrides)
    preset, micro, recompute_every = finetune.memory_plan(ft, device)
    row = {"row": name, "kind": "train", "loop": "project", "memory_preset": preset, "micro_batch_size": micro,
           "batch_size": ft.batch_size, "recompute_every": recompute_every, "lora_r": ft.lora_r,
           "memory_cap_gib": cap_gib, "fused_norms": fused_norms and device.type == "cuda",
           "expandable_segments": expandable_segments and device.type == "cuda", "fused_lora": fused_lora}
    # What the fine-tune step cannot run as configured (levers measured here only): never a preset.
    row["bench_levers"] = [lever for lever, on in (
        ("reference norms", not fused_norms and device.type == "cuda"), ("LoRA's update as one addmm", fused_lora),
        ("decoder MLPs compiled", compile_layers), ("attention kernel", bool(attention)),
        ("expandable segments", row["expandable_segments"])) if on]
    reset_memory(device)
    before = model.config._attn_implementation
    if attention:
        row["attention"] = attention
        try:
            model.set_attn_implementation(attention)
        except (ImportError, ValueError) as error:  # this model or install cannot use it
            return model, {**row, "skipped": f"{attention}: {str(error).splitlines()[0]}"}
    torch.manual_seed(cfg.seed)
    peft_model, targets = finetune.attach_lora(model, ft, recompute_every)
    row["lora_layers"] = len(targets)
    if fused_lora:
        fused_lora_lever.fuse_lora_adds(peft_model)
    causal_lm = peft_model.get_base_model()
    if compile_layers:
        # Inductor fuses each MLP's elementwise work (activation, gating, LoRA adds); CPU runs trace
        # only (the eager backend). Why the MLP and not the whole layer: docs/benchmarks.md, round 4.
        row["compile_backend"] = "inductor" if device.type == "cuda" else "eager"
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for layer in decoder_layers(causal_lm):
            layer.mlp.compile(backend=row["compile_backend"])
    try:
        with MemoryCap(device, cap_gib, expandable_segments):
            row.update(time_project_steps(peft_model, ctx, ft, (preset, micro, recompute_every)))
        if compile_layers:  # a count near the layer count means recompiling per layer
            row["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    except torch.OutOfMemoryError as error:
        row = out_of_memory(row, error, device)
    except (RuntimeError, ValueError) as error:
        if not (compile_layers or attention):
            raise
        # A lever this software stack cannot run (a compiler or kernel error) is a result, not a crash;
        # the row keeps the first line, the log the whole traceback.
        traceback.print_exc()
        row = {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}
    finally:
        for layer in decoder_layers(causal_lm):
            layer.mlp._compiled_call_impl = None  # what nn.Module.compile set
        model = release(peft_model, device)
        if attention:
            model.set_attn_implementation(before)
    return model, row


def time_project_steps(peft_model, ctx: Context, ft, plan: tuple[str, int, int]) -> dict:
    cfg, device = ctx.cfg, ctx.device
    seconds, losses = time_trainer_steps(ft, peft_model, ctx.processor, ctx.samples, ctx.class_names, plan,
                                         world_size=1, timed_steps=cfg.timed_steps)
    timed = cfg.timed_steps * ft.batch_size
    return dict(samples_per_s=timed / seconds, seconds=seconds, timed_samples=timed, losses=losses, **peaks(device))


def time_trainer_steps(ft, peft_model, processor, samples, class_names, plan: tuple[str, int, int],
                       world_size: int, timed_steps: int) -> tuple[float, list[float]]:
    """(seconds of the timed steps, per-step losses) of the fine-tune step's own Trainer
    (components/answer_trainer.py) over 1 + ``timed_steps`` optimizer steps of ``samples``; the
    first step is the warm-up (kernels, allocator, autotuning, compilation). Also bench_scaling's."""
    from bench import recipe
    from components import answer_trainer

    steps = 1 + timed_steps
    marks: list[float] = []  # marks[i]: end of optimizer step i (marks[0]: start)
    cuda = next(peft_model.parameters()).device.type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        ft = dataclasses.replace(ft, output_dir=f"{out}/adapter", max_steps=steps, log_every_steps=1,
                                 save_every_steps=10**6, checkpoint_every_minutes=0)
        trainer = answer_trainer.make_trainer(ft, peft_model, processor, samples[: steps * ft.batch_size],
                                              class_names, plan, world_size,
                                              callbacks=[recipe.clock(marks, cuda, micro_batches=False)])
        try:
            trainer.train()  # frees its optimizer state and collects garbage at the end
        finally:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            del trainer
    return marks[-1] - marks[1], losses


def train_row_recipe(model, ctx: Context) -> tuple[object, dict]:
    """One repeat of the recipe's Trainer loop over ``recipe_micro_batches`` micro-batches of 1."""
    import torch

    from bench import recipe
    from components import finetune, modeling

    cfg, device, samples = ctx.cfg, ctx.device, ctx.samples
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
        tensors = recipe.sample_tensors(ctx.processor, [s.photo for s in samples[:n]],
                                        [s.label_name for s in samples[:n]], ctx.class_names)
        with tempfile.TemporaryDirectory() as out:
            result = recipe.train(peft_model, tensors, out, max_steps=math.ceil(n / recipe.RECIPE_GRAD_ACCUM),
                                  learning_rate=ft.learning_rate, grad_accum_steps=min(n, recipe.RECIPE_GRAD_ACCUM),
                                  seed=cfg.seed)
        marks = result["marks"]  # marks[i]: end of micro-batch i (marks[0]: start)
        seconds = marks[-1] - marks[2]  # micro-batches 3.. n; the optimizer step falls inside
        row.update(samples_per_s=(len(marks) - 3) / seconds, seconds=seconds, timed_samples=len(marks) - 3,
                   losses=result["losses"], **peaks(device))
    except torch.OutOfMemoryError as error:
        row = out_of_memory(row, error, device)
    finally:
        model = release(peft_model, device)
    return model, row


def trl_micro_batches(ctx: Context) -> list[int]:
    """Per-device batches the TRL row tries, largest first: the whole step, then halves."""
    if "fits" in ctx.trl_micro:
        return [ctx.trl_micro["fits"]]
    micro, sizes = ctx.cfg.batch_size, []
    while micro >= 1 and ctx.cfg.batch_size % micro == 0:
        sizes.append(micro)
        micro //= 2
    return sizes


def train_row_trl(model, ctx: Context) -> tuple[object, dict]:
    """One repeat of TRL's SFTTrainer at its best (bench/trl_peer.py): the first optimizer step is
    the warm-up, then ``timed_steps`` steps; per-device batch 16, or the largest that fits."""
    import torch

    from bench import trl_peer
    from components import finetune, modeling

    cfg, device, samples = ctx.cfg, ctx.device, ctx.samples
    ft = finetune_config(cfg.lora_r, cfg.batch_size, cfg.seed)
    liger = trl_peer.liger_available()
    row = {"row": "peer: TRL SFTTrainer", "kind": "train", "loop": "trl.SFTTrainer", "batch_size": cfg.batch_size,
           "recompute_every": 1, "lora_r": ft.lora_r, "liger": liger}
    for micro in trl_micro_batches(ctx):
        reset_memory(device)
        torch.manual_seed(cfg.seed)
        peft_model, targets = finetune.attach_lora(model, ft, recompute_every=0)  # the trainer recomputes
        modeling.fuse_rms_norms(model, enabled=False)  # transformers' own modules (Liger's, if installed)
        accum = cfg.batch_size // micro
        row.update(micro_batch_size=micro, lora_layers=len(targets))
        try:
            with tempfile.TemporaryDirectory() as out:
                result = trl_peer.train(peft_model, ctx.processor, [s.photo for s in samples],
                                        [s.label_name for s in samples], ctx.class_names, out,
                                        max_steps=1 + cfg.timed_steps, learning_rate=ft.learning_rate,
                                        micro_batch_size=micro, grad_accum_steps=accum, liger=liger,
                                        workers=2 if device.type == "cuda" else 0, seed=cfg.seed)
            marks = result["marks"]  # marks[i]: end of optimizer step i; step 1 is the warm-up
            seconds = marks[-1] - marks[1]
            timed = (len(marks) - 2) * cfg.batch_size
            row.update(samples_per_s=timed / seconds, seconds=seconds, timed_samples=timed,
                       losses=result["losses"], **peaks(device))
            row.pop("error", None)
            ctx.trl_micro["fits"] = micro
            return release(peft_model, device), row
        except torch.OutOfMemoryError as error:
            row = out_of_memory(row, error, device)
            model = release(peft_model, device)
    return model, row


# --------------------------------------------------------------------------------------------
# Evaluation rows
# --------------------------------------------------------------------------------------------


def eval_row(model, ctx: Context, *, name: str, mode: str, batch_size: int | None = None,
             max_new_tokens: int | None = None, batches: int | None = None, fused_norms: bool = True,
             static_cache: bool = False, compile_vision: bool = False) -> dict:
    """Images/s of ``evaluate``'s generate or score path, preprocessing included: one warm-up
    batch (its seconds kept: a compiling row pays the compile there), then ``batches`` timed
    ones. ``batch_size`` None: the card's default (evaluate). ``compile_vision``: each vision
    encoder layer compiled (Inductor; every image has the same patch count, so one shape)."""
    import torch

    from components import evaluate, modeling, prompting

    cfg, device, photos = ctx.cfg, ctx.device, ctx.photos
    batch_size = batch_size or evaluate.default_batch_size(device)
    max_new_tokens = (max_new_tokens or ctx.generate_cap) if mode == "generate" else None
    modeling.fuse_rms_norms(model, enabled=fused_norms and device.type == "cuda")
    model.eval()
    row = {"row": name, "kind": "eval", "mode": mode, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
           "static_cache": static_cache, "compile_vision": compile_vision}
    compiled = list(vision_layers(model)) if compile_vision else []
    for layer in compiled:
        layer.compile(backend="inductor" if device.type == "cuda" else "eager")
    batches = batches or cfg.eval_batches
    reset_memory(device)
    dtype = modeling.compute_dtype(device)
    if mode == "score":
        run_batch = evaluate.CandidateScorer(model, evaluate.answer_token_ids(ctx.processor, ctx.class_names),
                                             ctx.processor.tokenizer.pad_token_id, device)
    else:
        gen_config = evaluate.generation_config(ctx.processor.tokenizer, max_new_tokens)
        # Random weights rarely say <turn|>: make every row run to the cap, as an untuned baseline does.
        gen_config.min_new_tokens = max_new_tokens
        if static_cache:
            # A static KV cache; on CUDA transformers then compiles the decoding step (CUDA graphs).
            gen_config.cache_implementation = "static"

        def run_batch(batch):
            return evaluate.generate_answers(model, ctx.processor.tokenizer, batch, gen_config)

    def encode(i):
        chunk = [photos[(i * batch_size + j) % len(photos)] for j in range(batch_size)]
        return prompting.encode_prompt_batch(ctx.processor, chunk, ctx.class_names)

    try:
        # As evaluate.run: inference mode, bf16 autocast on CUDA, the next batch encoded on a thread.
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            start = time.perf_counter()
            run_batch(evaluate._to_device(encode(0), device, dtype))  # warm-up
            sync(device)
            row["warmup_s"] = time.perf_counter() - start
            start = time.perf_counter()
            for batch in prompting.prefetched(encode, range(1, batches + 1)):
                run_batch(evaluate._to_device(batch, device, dtype))
            sync(device)
        seconds = time.perf_counter() - start
        row.update(images_per_s=batches * batch_size / seconds, seconds=seconds, timed_images=batches * batch_size,
                   **peaks(device))
    except torch.OutOfMemoryError as error:
        row = out_of_memory(row, error, device)
    except (RuntimeError, ValueError) as error:
        if not (static_cache or compile_vision):
            raise
        traceback.print_exc()
        row = {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}
    for layer in compiled:
        layer._compiled_call_impl = None  # what nn.Module.compile set
    modeling.fuse_rms_norms(model, enabled=device.type == "cuda")
    reset_memory(device)
    return row


# --------------------------------------------------------------------------------------------
# The rows, their selection and the interleaved repeats
# --------------------------------------------------------------------------------------------


@dataclass
class RowSpec:
    """One row: how to time one repeat of it, and what it runs per repeat (for the plan)."""

    id: str  # what --rows names
    groups: tuple[str, ...]  # and the groups it belongs to
    measure: Callable  # (model, Context) -> (model, measured dict)
    kind: str  # train or eval
    per_repeat: int  # samples (train) or images (eval) run per repeat, warm-up included
    steps: str  # what one repeat runs, in words
    mfu: str  # ROUGH_MFU key, for the time estimate
    phase: str = "main"  # "bf16": timed on the unquantised base, before it is quantised
    compiles: bool = False  # pays torch.compile on its first repeat


def _train(fn, **kwargs):
    return lambda model, ctx: fn(model, ctx, **kwargs)


def _eval(**kwargs):
    return lambda model, ctx: (model, eval_row(model, ctx, **kwargs))


def _attention_row(model, ctx: Context):
    kernel, why = attention_kernel(ctx.cfg.attention)
    if kernel is None:
        return model, {"row": "lever: attention kernel", "kind": "train", "loop": "project", "skipped": why}
    return train_row_project(model, ctx, name=f"lever: attention {kernel}", attention=kernel)


def row_specs(cfg: BenchConfig) -> list[RowSpec]:
    """Every row the bench knows, in the order a round runs them."""
    b, t = cfg.batch_size, cfg.timed_steps
    step = f"1 warm-up step + {t} step(s) of {b}"
    specs = [
        RowSpec("recipe", ("train", "peers"), lambda m, c: train_row_recipe(m, c), "train", cfg.recipe_micro_batches,
                f"{cfg.recipe_micro_batches} micro-batches of 1, first 2 untimed", "recipe"),
        RowSpec("trl", ("train", "peers"), lambda m, c: train_row_trl(m, c), "train", b * (1 + t),
                f"1 warm-up step + {t} step(s) of {b}", "trl"),
        RowSpec("default", ("train",), _train(train_row_project, name="project default"), "train", b * (1 + t),
                step, "project"),
    ]
    def preset_args(preset: str) -> dict:  # the preset's cap and its rank (the 24 GB preset is for r=16)
        return dict(cap_gib=PRESET_CARDS_GIB[preset], memory_preset=preset,
                    lora_r=16 if preset == "24gb" else cfg.lora_r)

    for preset in PRESET_CARDS_GIB:
        specs.append(RowSpec(f"preset-{preset}", ("train", "presets"),
                             _train(train_row_project, name=f"preset {preset}", **preset_args(preset)),
                             "train", b * (1 + t), step, "small-micro" if preset == "24gb" else "project"))
    # Configurations that keep activations (for cards over 100 GB), as the step runs them (fused
    # norms; with the reference norms until round 9, docs/benchmarks.md); then one lever at a time.
    for micro, recompute in ((8, "every-2"), (4, "off")):
        specs.append(RowSpec(f"keep-m{micro}-{recompute}", ("train", "levers", "keep"),
                             _train(train_row_project, name=f"keep: micro-batch {micro}, recompute {recompute}",
                                    micro_batch_size=micro, gradient_checkpointing=recompute),
                             "train", b * (1 + t), step, "project"))
    specs += [
        RowSpec("lever-reference-norms", ("train", "levers"),
                _train(train_row_project, name="lever: default, reference norms", fused_norms=False), "train",
                b * (1 + t), step, "project"),
        RowSpec("lever-fused-lora", ("train", "levers"),
                _train(train_row_project, name="lever: default, LoRA's update as one addmm", fused_lora=True), "train",
                b * (1 + t), step, "project"),
        RowSpec("lever-compile", ("train", "levers"),
                _train(train_row_project, name="lever: default, decoder MLPs compiled", compile_layers=True),
                "train", b * (1 + t), step + "; compiles on the first repeat", "project", compiles=True),
        RowSpec("lever-attention", ("train", "levers"), _attention_row, "train", b * (1 + t), step, "project"),
        RowSpec("lever-24gb-compile", ("train", "levers"),
                _train(train_row_project, name="lever: preset 24gb, decoder MLPs compiled", compile_layers=True,
                       **preset_args("24gb")), "train", b * (1 + t), step + "; compiles on the first repeat",
                "small-micro", compiles=True),
        RowSpec("lever-24gb-expandable", ("train", "levers"),
                _train(train_row_project, name="lever: preset 24gb, expandable segments", expandable_segments=True,
                       **preset_args("24gb")), "train", b * (1 + t), step, "small-micro"),
    ]
    return specs + eval_specs(cfg)


def eval_specs(cfg: BenchConfig) -> list[RowSpec]:
    from bench import recipe

    n = cfg.eval_batches
    recipe_eval = dict(mode="generate", batch_size=recipe.RECIPE_EVAL_BATCH, fused_norms=False)
    batches = f"1 warm-up + {n} batches"
    default = 128  # the images a default-batch row runs per batch on the H200 (for the estimate only)
    specs = [
        RowSpec("recipe-generate", ("eval", "peers"), _eval(name="recipe generate", **recipe_eval), "eval",
                recipe.RECIPE_EVAL_BATCH * (1 + n), f"{batches} of {recipe.RECIPE_EVAL_BATCH}", "recipe-eval"),
        RowSpec("generate", ("eval",), _eval(name="project generate (default)", mode="generate"), "eval",
                default * (1 + n), f"{batches} of the card's default", "eval"),
        RowSpec("score", ("eval",), _eval(name="project score (default)", mode="score"), "eval",
                default * (1 + n), f"{batches} of the card's default", "eval"),
    ]
    for size in [int(x) for x in filter(None, cfg.eval_batch_sizes.split(","))]:
        for mode in ("generate", "score"):
            specs.append(RowSpec(f"{mode}-b{size}", ("eval",),
                                 _eval(name=f"project {mode} (batch {size})", mode=mode, batch_size=size), "eval",
                                 size * (1 + n), f"{batches} of {size}", "eval"))
    specs += [
        RowSpec("generate-static", ("eval", "levers"),
                _eval(name="lever: generate, static cache", mode="generate", static_cache=True), "eval",
                default * (1 + n), f"{batches} of the card's default; compiles on CUDA", "eval", compiles=True),
        RowSpec("lever-generate-compile-vision", ("eval", "levers"),
                _eval(name="lever: generate, vision encoder layers compiled", mode="generate", compile_vision=True),
                "eval", default * (1 + n), f"{batches} of the card's default; compiles in the first warm-up", "eval",
                compiles=True),
        RowSpec("recipe-generate-128", ("extra",), _eval(name="recipe generate, 128 tokens", max_new_tokens=recipe.RECIPE_MAX_NEW_TOKENS,
                                                          batches=1, **recipe_eval), "eval",
                recipe.RECIPE_EVAL_BATCH * 2, f"1 warm-up + 1 batch of {recipe.RECIPE_EVAL_BATCH}, 128 tokens", "long-eval"),
    ]
    # The unquantised base (bf16 on CUDA, fp32 on CPU), timed before the model is quantised.
    for micro in (2, 4):
        specs.append(RowSpec(f"bf16-m{micro}", ("bf16",),
                             _train(train_row_project, name=f"bf16 base, micro-batch {micro}, no recompute",
                                    micro_batch_size=micro, gradient_checkpointing="off"),
                             "train", cfg.batch_size * (1 + cfg.timed_steps),
                             f"1 warm-up step + {cfg.timed_steps} step(s) of {cfg.batch_size}", "project",
                             phase="bf16"))
    for mode in ("generate", "score"):
        specs.append(RowSpec(f"bf16-{mode}", ("bf16",), _eval(name=f"{mode}, bf16 base", mode=mode), "eval",
                             default * (1 + n), f"{batches} of the card's default", "eval", phase="bf16"))
    return specs


def select_rows(specs: list[RowSpec], rows: str) -> list[RowSpec]:
    """The specs ``--rows`` names (ids or groups; 'all': every row), in round order."""
    wanted = set(filter(None, (x.strip() for x in rows.split(","))))
    groups = {g for s in specs for g in s.groups}
    unknown = wanted - groups - {s.id for s in specs} - {"all"}
    if unknown or not wanted:
        raise ValueError(f"--rows {rows!r}: unknown {', '.join(sorted(unknown)) or '(none given)'}; row ids: "
                         f"{', '.join(s.id for s in specs)}; groups: all, {', '.join(sorted(groups))}")
    return [s for s in specs if "all" in wanted or s.id in wanted or wanted & set(s.groups)]


MEASURED = ("samples_per_s", "images_per_s", "seconds", "timed_samples", "timed_images", "losses", "peak_gib",
            "peak_reserved_gib", "alloc_retries", "wall_s", "warmup_s", "gpu_samples", "sm_mhz_median", "sm_mhz_min",
            "temperature_c_max", "power_w_median", "clock_event_reasons")


def rate_key(kind: str) -> str:
    return "samples_per_s" if kind == "train" else "images_per_s"


def aggregate(spec: RowSpec, repeats: list[dict]) -> dict:
    """A row from its repeats: the settings, every repeat's measurements, and the median rate
    with its spread (min, max, (max - min) / median). A row that failed once reports the error."""
    row = {k: v for k, v in repeats[0].items() if k not in MEASURED}
    row["id"] = spec.id
    row["repeats"] = [{k: r[k] for k in MEASURED if k in r} for r in repeats]
    failed = [r for r in repeats if "error" in r or "skipped" in r]
    if failed:
        row.update({k: failed[0][k] for k in ("error", "skipped") if k in failed[0]})
    key = rate_key(spec.kind)
    rates = [r[key] for r in repeats if key in r]
    if rates and not failed:
        median = statistics.median(rates)
        row[key] = median
        row["seconds"] = statistics.median(r["seconds"] for r in repeats)
        row["spread"] = {"min": min(rates), "max": max(rates), "relative": (max(rates) - min(rates)) / median}
    peaks_seen = [r["peak_gib"] for r in repeats if r.get("peak_gib") is not None]
    reserved = [r["peak_reserved_gib"] for r in repeats if r.get("peak_reserved_gib") is not None]
    row["peak_gib"] = max(peaks_seen) if peaks_seen else None
    row["peak_reserved_gib"] = max(reserved) if reserved else None
    retries = [r["alloc_retries"] for r in repeats if "alloc_retries" in r]
    if retries:
        row["alloc_retries"] = max(retries)
    return row


def run_rounds(specs: list[RowSpec], model, ctx, repeats: int, record: Callable[[list[dict], int], None]):
    """Time every spec ``repeats`` times, interleaved: round r runs each spec once, in order. A
    row that errs or is skipped is not run again. ``record(rows, round)`` after each round."""
    measured: dict[str, list[dict]] = {s.id: [] for s in specs}
    for round_index in range(repeats):
        for spec in specs:
            done = measured[spec.id]
            if any("error" in m or "skipped" in m for m in done):
                continue
            started = time.perf_counter()
            with GpuClocks(ctx.device) as clocks:
                model, m = spec.measure(model, ctx)
            m["wall_s"] = time.perf_counter() - started
            m.update(clocks.summary)
            done.append(m)
            log({"id": spec.id, "repeat": round_index + 1, **m})
        record([aggregate(s, measured[s.id]) for s in specs if measured[s.id]], round_index)
    return model


# --------------------------------------------------------------------------------------------
# The time estimate
# --------------------------------------------------------------------------------------------


def rough_seconds(spec: RowSpec, flops_per_sample: float, first: bool) -> float:
    """Rough GPU seconds of one repeat of ``spec`` (an evaluation image: a third of a training
    sample's 6N, the forward pass)."""
    flops = flops_per_sample if spec.kind == "train" else flops_per_sample / 3
    work = spec.per_repeat * flops / (PEAK_BF16_FLOPS * ROUGH_MFU[spec.mfu])
    return ROUGH_SETUP_S + work + (ROUGH_COMPILE_S if first and spec.compiles else 0.0)


def plan_lines(specs: list[RowSpec], flops_per_sample: float, repeats: int) -> list[str]:
    lines = [f"{'row':<24} {'per repeat':<58} {'est. s':>8}  (rough GPU seconds: all {repeats} repeats)"]
    total = 0.0
    for spec in specs:
        seconds = sum(rough_seconds(spec, flops_per_sample, r == 0) for r in range(repeats))
        total += seconds
        lines.append(f"{spec.id:<24} {spec.steps:<58} {seconds:8.0f}")
    lines.append(f"{'total (model build not included)':<83} {total:8.0f}")
    return lines


def meta_flops_per_sample(cfg: BenchConfig) -> float:
    """Model FLOPs per training sample from the model's shapes alone (no weights), for --plan."""
    import torch

    from bench import real_size
    from components import modeling, prompting, random_model
    from components.prepare_dataset import OXFORD_PET_CLASSES

    if cfg.variant:
        processor = random_model.stand_in_processor(cfg.variant)
        config = random_model.variant_config(cfg.variant, processor.tokenizer)
    else:
        from transformers import AutoConfig

        processor, config = modeling.load_processor(cfg.model_dir), AutoConfig.from_pretrained(cfg.model_dir)
    from transformers import Gemma4ForConditionalGeneration

    with torch.device("meta"):
        counts = real_size.parameter_counts(Gemma4ForConditionalGeneration(config))
    names = list(OXFORD_PET_CLASSES)
    probe = prompting.encode_training_batch(processor, random_photos(1, cfg.seed), [names[0]], names)
    return model_flops_per_sample(counts, int(probe["attention_mask"].sum()), int(probe["pixel_values"].shape[1]))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def model_flops_per_sample(counts: dict, tokens: int, patches: int) -> float:
    return 6 * (counts.get("language_model", 0) * tokens + counts.get("vision", 0) * patches)


def log(row: dict) -> None:
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k not in ("losses", "repeats")}
    print(json.dumps(shown), flush=True)


def build(cfg: BenchConfig, device, quantization: str):
    """(model, processor): the real-size random-init model or the model folder's, on ``device``."""
    from bench import real_size
    from components import modeling, random_model

    if cfg.variant:
        processor = random_model.stand_in_processor(cfg.variant)
        config = random_model.variant_config(cfg.variant, processor.tokenizer)
        return real_size.build_model(config, device, quantization), processor
    model = modeling.load_model(cfg.model_dir, device, quantization)
    model.requires_grad_(False)
    return model, modeling.load_processor(cfg.model_dir)


def describe_model(cfg: BenchConfig, model, processor, class_names, built_s: float) -> dict:
    from bench import real_size
    from components import evaluate, prompting

    counts = real_size.parameter_counts(model)
    probe = prompting.encode_training_batch(processor, random_photos(1, cfg.seed), [class_names[0]], class_names)
    tokens = int(probe["attention_mask"].sum())
    patches = int(probe["pixel_values"].shape[1])
    candidates = evaluate.answer_token_ids(processor, class_names)
    return {"source": cfg.variant or cfg.model_dir, "parameters": counts, "parameters_total": sum(counts.values()),
            "sample_tokens": tokens, "image_patches": patches,
            "image_soft_tokens": int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image|>")).sum()),
            "generate_cap_new_tokens": max(len(c) for c in candidates) + 1,  # longest answer (name + <turn|>) + 1
            "build_seconds": built_s, "model_flops_per_sample": model_flops_per_sample(counts, tokens, patches)}


def run(cfg: BenchConfig) -> dict:
    import torch

    from bench import real_size
    from components import modeling
    from components.prepare_dataset import OXFORD_PET_CLASSES

    specs = select_rows(row_specs(cfg), cfg.rows)
    if cfg.plan:
        lines = plan_lines(specs, meta_flops_per_sample(cfg), cfg.repeats)
        print("\n".join(lines))
        return {"plan": lines}
    device = modeling.pick_device(cfg.device)
    if cfg.variant and device.type != "cuda":
        raise ValueError(f"--variant {cfg.variant} builds a real-size model and needs a CUDA GPU "
                         "(use --model-dir with the tiny model for a CPU smoke run)")
    quantization = modeling.resolve_quantization(cfg.quantization, device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    class_names = list(OXFORD_PET_CLASSES)
    result = {"config": dataclasses.asdict(cfg), "environment": environment(device), "rows": []}
    output, began = Path(cfg.output), time.perf_counter()
    bf16_first = any(s.phase == "bf16" for s in specs)
    built = time.perf_counter()
    model, processor = build(cfg, device, "none" if bf16_first else quantization)
    result["model"] = describe_model(cfg, model, processor, class_names, time.perf_counter() - built)
    print(json.dumps(result["model"]), flush=True)
    photos = random_photos(cfg.batch_size * (cfg.timed_steps + 1), cfg.seed)
    ctx = Context(cfg, device, processor, class_names, photos, [Sample(p, random.choice(class_names)) for p in photos],
                  result["model"]["generate_cap_new_tokens"])
    print("\n".join(plan_lines(specs, result["model"]["model_flops_per_sample"], cfg.repeats)), flush=True)

    for phase in ("bf16", "main"):
        phase_specs = [s for s in specs if s.phase == phase]
        if phase == "main" and bf16_first and quantization == "nf4":
            real_size.quantize_nf4_(model)  # the bf16-base rows are done: quantise in place
            reset_memory(device)
        base = ("bf16" if device.type == "cuda" else "fp32") if phase == "bf16" or quantization == "none" else quantization
        first = len(result["rows"])

        def record(rows, round_index, first=first, base=base, phase_specs=phase_specs):
            result["rows"][first:] = [{**row, "base": base, "phase": phase} for row in rows]
            result["summary"] = summarize(result)
            write_json_atomic(output, result)  # after every round: a run cut off keeps what it measured
            if round_index == 0 and cfg.repeats > 1:
                walls = {r["id"]: r["repeats"][0]["wall_s"] for r in rows}
                print(f"round 1 of {phase} rows took {sum(walls.values()):.0f} s; the next {cfg.repeats - 1} should "
                      f"take about {(cfg.repeats - 1) * sum(walls.values()):.0f} s (less the first repeats' "
                      f"compilation); per row: {json.dumps({k: round(v) for k, v in walls.items()})}", flush=True)

        if phase_specs:
            model = run_rounds(phase_specs, model, ctx, cfg.repeats, record)
    result["wall_seconds"] = time.perf_counter() - began
    result["summary"] = summarize(result)
    write_json_atomic(output, result)
    print(render_markdown(result))
    return result


# --------------------------------------------------------------------------------------------
# Derived figures (from the medians) and the table
# --------------------------------------------------------------------------------------------


def derive_presets(rows: dict, card_gib: float | None) -> dict:
    """For each card, the fastest project-loop row (median) on the quantised base whose peak
    reserved memory fits it, that trains at the card's rank and that the fine-tune step can run
    as configured (no bench-only lever); the card the bench ran on counts when over 100 GB."""
    presets = {}
    for card, (gib, rank) in CARDS.items():
        if gib is None:
            gib = card_gib if card_gib and card_gib > 100 else None
        fits = [r for r in rows.values() if r["kind"] == "train" and r.get("loop") == "project" and r["phase"] == "main"
                and r["lora_r"] == rank and gib is not None and not r.get("bench_levers")
                and (r.get("peak_reserved_gib") is None or r["peak_reserved_gib"] <= gib)]
        best = max(fits, key=lambda r: r["samples_per_s"], default=None)
        presets[card] = None if best is None else {
            "row": best["id"], "samples_per_s": best["samples_per_s"], "peak_reserved_gib": best.get("peak_reserved_gib"),
            "micro_batch_size": best["micro_batch_size"], "recompute_every": best["recompute_every"], "card_gib": gib}
    return presets


def check_goals(summary: dict, rows: dict) -> dict:
    """Issue 16's goals from this run's medians: the project default against the recipe."""
    measured = {"train_speedup": summary.get("train_speedup", {}).get("project default"),
                "generate_speedup": summary.get("eval_speedup", {}).get("project generate (default)"),
                "project_job_minutes": summary.get("project_job_minutes")}
    goals = {}
    for name, value in measured.items():
        if value is not None:
            met = value <= GOALS[name] if name.endswith("minutes") else value >= GOALS[name]
            goals[name] = {"goal": GOALS[name], "measured": value, "met": met}
    return goals


def summarize(result: dict) -> dict:
    """Ratios against the recipe, the recipe job's wall time, presets, TRL vs the project's loop
    and the goals, all from this run's medians."""
    rows = {r["row"]: r for r in result["rows"] if rate_key(r["kind"]) in r}
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
    default_eval = rows.get("project generate (default)", {}).get("images_per_s")
    if recipe_train and recipe_eval:
        summary["recipe_job_minutes"] = job_minutes(recipe_train, recipe_eval)
    if project_train and default_eval:
        summary["project_job_minutes"] = job_minutes(project_train, default_eval)
    trl = rows.get("peer: TRL SFTTrainer", {}).get("samples_per_s")
    if trl and project_train:
        summary["trl_vs_project"] = {"trl": trl, "project": project_train, "ratio": trl / project_train,
                                     "within": TRL_MOVE_WITHIN, "move_to_trl": trl >= (1 - TRL_MOVE_WITHIN) * project_train}
    by_id = {r["id"]: r for r in rows.values()}
    summary["presets"] = derive_presets(by_id, result["environment"].get("gpu_memory_gib"))
    summary["goals"] = check_goals(summary, rows)
    return summary


def recompute_label(every: int) -> str:
    return {0: "no", 1: "every layer"}.get(every, f"every {every}th layer" if every > 2 else "every 2nd layer")


def rate_cell(r: dict) -> str:
    """Median (min-max, n) of a row's rate, or why there is none."""
    if "error" in r or "skipped" in r:
        return (r.get("error") or f"skipped: {r['skipped']}")[:48]
    spread = r["spread"]
    return f"{r[rate_key(r['kind'])]:.2f} ({spread['min']:.2f}-{spread['max']:.2f}, n={len(r['repeats'])})"


def render_markdown(result: dict) -> str:
    env, model, summary = result["environment"], result["model"], result.get("summary", {})
    lines = [f"**{model['source']}**, {model['parameters_total'] / 1e9:.2f} B parameters, "
             f"{model['sample_tokens']}-token samples ({model['image_soft_tokens']} soft tokens), "
             f"{env.get('gpu', env['device'])}, {env['date']}, medians of {result['config']['repeats']} interleaved repeats",
             "", "| training | loop | micro x accum | recompute | r | cap | samples/s median (min-max, n) | vs recipe | MFU (6N) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in result["rows"] if r["kind"] == "train"):
        if "skipped" in r:
            lines.append(f"| {r['row']} | {r['loop']} | - | - | - | - | {rate_cell(r)} | - | - | - |")
            continue
        accum = r["batch_size"] // r["micro_batch_size"]
        cap = f"{r['memory_cap_gib']} GiB" if r.get("memory_cap_gib") else "-"
        speedup = summary.get("train_speedup", {}).get(r["row"])
        mfu = summary.get("mfu", {}).get(r["row"])
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        peak += f" ({r['alloc_retries']} allocator retries)" if r.get("alloc_retries") else ""
        lines.append(f"| {r['row']} ({r.get('base', '')}) | {r['loop']} | {r['micro_batch_size']} x {accum} | "
                     f"{recompute_label(r['recompute_every'])} | {r['lora_r']} | {cap} | {rate_cell(r)} | "
                     f"{'-' if speedup is None else f'{speedup:.2f}x'} | {'-' if mfu is None else f'{mfu:.1%}'} | {peak} |")
    lines += ["", "| evaluation | mode | batch | new tokens | images/s median (min-max, n) | vs recipe | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in (r for r in result["rows"] if r["kind"] == "eval"):
        speedup = summary.get("eval_speedup", {}).get(r["row"])
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['row']} ({r.get('base', '')}) | {r['mode']} | {r['batch_size']} | {r['max_new_tokens'] or '-'} | "
                     f"{rate_cell(r)} | {'-' if speedup is None else f'{speedup:.2f}x'} | {peak} |")
    for key, label in (("recipe_job_minutes", "recipe job (2,100 training samples + 400 eval images), recipe"),
                       ("project_job_minutes", "same job, project defaults")):
        if key in summary:
            lines.append(f"\n{label}: {summary[key]:.1f} min")
    if "trl_vs_project" in summary:
        t = summary["trl_vs_project"]
        lines.append(f"\nTRL SFTTrainer / project default: {t['ratio']:.2f} (move to TRL if >= {1 - t['within']:.2f}: "
                     f"{'yes' if t['move_to_trl'] else 'no'})")
    for card, best in summary.get("presets", {}).items():
        if best:
            lines.append(f"preset for {card}: {best['row']} ({best['samples_per_s']:.2f} samples/s, "
                         f"micro-batch {best['micro_batch_size']}, {recompute_label(best['recompute_every'])} recomputed)")
    for name, goal in summary.get("goals", {}).items():
        lines.append(f"goal {name} {goal['goal']}: {goal['measured']:.2f} ({'met' if goal['met'] else 'missed'})")
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
