"""Data-parallel scaling of the fine-tune loop: samples/s on N GPUs over N x one GPU.

    python -m bench.bench_scaling --variant gemma-4-e4b --processes 1,2 --output runs/scaling-e4b.json
    python -m bench.bench_scaling --model-dir runs/tiny-gemma4 --device cpu --processes 1,2 ...  # smoke

For each process count the harness launches that many torchrun workers, as the fine-tune step
does. Each worker builds the model on its own GPU (a random-init real-size Gemma 4, or a model
folder), puts LoRA on it with the project's code and memory preset, and times ``timed_steps``
optimizer steps of ``per_process_batch`` samples per process after a warm-up step, through the
fine-tune step's Trainer (``answer_trainer.make_trainer``; its DDP gradient all-reduce is what is
being measured). Weak scaling: the per-GPU work is fixed and the global batch grows with N. Rank 0
writes each count's row; the summary gives efficiency = rate(N) / (N x rate(1)) and each GPU's
peak memory, and checks that every process ends with the same adapter.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from components.cli import UserError, entrypoint, parse_config, to_argv
from components.files import read_json, write_json_atomic


@dataclass
class ScalingConfig:
    """Time the project's data-parallel fine-tune loop on 1..N processes."""

    output: str = field(metadata={"help": "JSON file to write (a row per process count, efficiency)"})
    variant: str = field(default="", metadata={"help": "random-init real-size model, e.g. gemma-4-e4b"})
    model_dir: str = field(default="", metadata={"help": "or a model folder (the tiny stand-in, for a smoke run)"})
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu (gloo between CPU processes)"})
    quantization: str = field(default="auto", metadata={"help": "nf4 or none; auto: nf4 on CUDA",
                                                         "choices": ["auto", "nf4", "none"]})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    per_process_batch: int = field(default=16, metadata={"help": "samples per process in each optimizer step"})
    timed_steps: int = field(default=3, metadata={"help": "optimizer steps timed after one warm-up step"})
    processes: str = field(default="1,2", metadata={"help": "process counts to time, comma-separated, 1 first"})
    seed: int = field(default=0, metadata={"help": "seed of weights, images and LoRA init"})
    worker: bool = field(default=False, metadata={"help": "internal: run as one torchrun worker"})

    def __post_init__(self) -> None:
        if bool(self.variant) == bool(self.model_dir):
            raise ValueError("give exactly one of --variant and --model-dir")
        try:
            counts = [int(x) for x in self.processes.split(",")]
        except ValueError:
            raise ValueError(f"--processes {self.processes!r}: give comma-separated integers") from None
        if not counts or counts[0] != 1 or min(counts) < 1:
            raise ValueError(f"--processes {self.processes!r}: start with 1 (the baseline), all >= 1")
        for name in ("lora_r", "per_process_batch", "timed_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")


def worker(cfg: ScalingConfig) -> dict:
    """One process of an N-process run: build, train, time; rank 0 writes the row."""
    import torch
    import torch.distributed as dist

    from bench import bench_gpu, real_size
    from components import finetune, modeling, random_model
    from components.prepare_dataset import OXFORD_PET_CLASSES

    rank, world, local_rank = finetune.distributed_env() or (0, 1, 0)
    device = modeling.pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    quantization = modeling.resolve_quantization(cfg.quantization, device)
    try:
        torch.manual_seed(cfg.seed)  # the same weights and LoRA init in every process
        if cfg.variant:
            processor = random_model.stand_in_processor(cfg.variant)
            model = real_size.build_model(random_model.variant_config(cfg.variant, processor.tokenizer), device,
                                          quantization)
        else:
            processor = modeling.load_processor(cfg.model_dir)
            model = modeling.load_model(cfg.model_dir, device, quantization).requires_grad_(False)
        ft = bench_gpu.finetune_config(cfg.lora_r, cfg.per_process_batch * world, cfg.seed)
        preset, micro, recompute_every = plan = finetune.memory_plan(ft, device, world)
        peft_model, targets = finetune.attach_lora(model, ft, recompute_every)
        names = list(OXFORD_PET_CLASSES)
        photos = bench_gpu.random_photos(ft.batch_size * (1 + cfg.timed_steps), cfg.seed + 1)
        samples = [bench_gpu.Sample(p, names[i % len(names)]) for i, p in enumerate(photos)]
        # The fine-tune step's Trainer: under torchrun it wraps the model in DDP itself.
        seconds, losses = bench_gpu.time_trainer_steps(ft, peft_model, processor, samples, names, plan, world,
                                                       cfg.timed_steps)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        seconds = torch.tensor([seconds], dtype=torch.float64)
        peak = torch.tensor([bench_gpu.peak_gib(device) or 0.0], dtype=torch.float64)
        checksum = torch.tensor([float(sum(p.detach().double().sum() for p in trainable))], dtype=torch.float64)
        gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
        mine = torch.cat([seconds, peak, checksum])
        if world > 1:
            if device.type == "cuda":
                mine, gathered = mine.to(device), [g.to(device) for g in gathered]
            dist.all_gather(gathered, mine)
        else:
            gathered = [mine]
        per_rank = [g.cpu().tolist() for g in gathered]
        slowest = max(r[0] for r in per_rank)  # the step ends when the last process is done
        row = {"processes": world, "samples_per_s": cfg.per_process_batch * world * cfg.timed_steps / slowest,
               "seconds": slowest, "timed_samples": cfg.per_process_batch * world * cfg.timed_steps,
               "peak_gib_per_process": [r[1] for r in per_rank] if device.type == "cuda" else None,
               "adapters_in_sync": len({round(r[2], 6) for r in per_rank}) == 1, "losses": losses,
               "memory_preset": preset, "micro_batch_size": micro, "recompute_every": recompute_every,
               "lora_layers": len(targets), "device": device.type, "quantization": quantization}
        if rank == 0:
            write_json_atomic(Path(cfg.output), row)
        return row
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: ScalingConfig) -> dict:
    """Launch each process count, collect the rows, and compute the efficiencies."""
    from bench import bench_gpu
    from components import modeling

    device = modeling.pick_device(cfg.device)
    if cfg.variant and device.type != "cuda":
        raise ValueError(f"--variant {cfg.variant} builds a real-size model and needs CUDA GPUs")
    result = {"config": dataclasses.asdict(cfg), "environment": bench_gpu.environment(device), "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        for count in (int(x) for x in cfg.processes.split(",")):
            out = Path(scratch) / f"processes-{count}.json"
            argv = to_argv(dataclasses.replace(cfg, output=str(out), worker=True))
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
                       "-m", "bench.bench_scaling", *argv]
            code = subprocess.run(command).returncode
            if code != 0:
                result["rows"].append({"processes": count, "error": f"workers exited with {code}"})
            else:
                result["rows"].append(read_json(out))
            write_json_atomic(Path(cfg.output), result)
    base = result["rows"][0].get("samples_per_s")
    result["efficiency"] = {str(r["processes"]): r["samples_per_s"] / (r["processes"] * base)
                            for r in result["rows"] if base and "samples_per_s" in r}
    write_json_atomic(Path(cfg.output), result)
    for row in result["rows"]:
        shown = {k: v for k, v in row.items() if k not in ("losses",)}
        print(json.dumps(shown))
    print("efficiency (samples/s on N over N x one):", json.dumps(result["efficiency"]))
    return result


@entrypoint
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ScalingConfig, argv)
    try:
        worker(cfg) if cfg.worker else run(cfg)
    except ValueError as err:  # bad input found before any model is built: one line, exit 2
        raise UserError(str(err)) from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
