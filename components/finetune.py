"""Fine-tune step: QLoRA (or LoRA over an unquantised base) on one device, with checkpoint/resume.

One readable recipe:
  1. load the staged base (nf4 4-bit on CUDA by default, fp32 on CPU) and its processor;
  2. put LoRA on every linear layer of the language model and the vision tower;
  3. train on (image, class name) pairs with loss only on the answer and its closing <turn|>,
     --batch-size samples per optimizer step, split into micro-batches by the GPU's memory
     preset and over several GPUs as data-parallel processes the step launches (torchrun);
  4. checkpoint every N optimizer steps and every M minutes into a folder outside the adapter
     output, written by a background thread; on start, resume from the newest complete one;
  5. write the adapter, the processor and the metrics (last); delete the checkpoints.

    gemma-pets finetune --model-dir weights/ --dataset-dir data/ --output-dir adapter/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import threading
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from components.artifacts import ADAPTER_WEIGHTS, CHECKPOINT_STATE, DATASET_MANIFEST, TRAIN_METRICS
from components.cli import UserError, entrypoint, parse_config
from components.files import make_readable, read_json, sha256_file, write_json_atomic

CHECKPOINTS_SUFFIX = ".checkpoints"  # default checkpoint folder: <output-dir>.checkpoints, beside it
# On SIGTERM the platform kills the task about 10 s later (Cloud Run, Vertex): a checkpoint write
# already under way may finish within this many seconds; a new one is never started.
PREEMPT_WAIT_S = 5.0
# Fields a resume may change (every other field must match): where things go, how often they are
# saved, and how a step is split, which changes memory and speed but not the gradient.
RESUMABLE_CHANGES = ("output_dir", "checkpoint_dir", "stop_after_steps", "save_every_steps",
                     "checkpoint_every_minutes", "keep_checkpoints", "log_every_steps",
                     "micro_batch_size", "gradient_checkpointing", "memory_preset", "num_processes")


@dataclass(frozen=True)
class MemoryPreset:
    """How an optimizer step is split to fit a GPU, chosen from the GPU's memory."""

    min_gpu_gib: float  # smallest card (total memory, GiB) the preset is meant for
    micro_batch_size: int
    recompute_every: int  # recompute every n-th layer's activations in backward (0: none)
    note: str


RECOMPUTE_CHOICES = {"auto": None, "off": 0, "on": 1, "every-2": 2, "every-3": 3}
# Recomputing every layer lets the micro-batch grow to what the matmuls need, which beat keeping
# activations on every card measured: docs/benchmarks.md#memory-presets.
MEMORY_PRESETS = {
    "fast": MemoryPreset(75, 16, 1, "cards of 80 GB and more: micro-batch 16, every layer recomputed"),
    "40gb": MemoryPreset(38, 8, 1, "31B r=64 within 40 GB: micro-batch 8, every layer recomputed"),
    "24gb": MemoryPreset(0, 2, 1, "31B r=16 within 24 GB (L4): micro-batch 2, every layer recomputed"),
}


@dataclass
class FinetuneConfig:
    """QLoRA fine-tuning of Gemma 4 on a prepared image-classification dataset."""

    model_dir: str = field(metadata={"help": "staged base model folder (config.json, safetensors, processor)"})
    dataset_dir: str = field(metadata={"help": f"prepared dataset folder ({DATASET_MANIFEST} + Parquet shards)"})
    output_dir: str = field(metadata={"help": "where the adapter, processor and metrics go"})
    checkpoint_dir: str = field(
        default="",
        metadata={"help": "resume checkpoints: a stable folder per run and task, outside --output-dir, so a retry "
                          "finds them (gs:// is read through /gcs); empty: <output-dir>.checkpoints beside it; "
                          "deleted once the adapter is written"},
    )
    quantization: str = field(
        default="auto",
        metadata={"help": "nf4 (4-bit QLoRA, CUDA only), none (bf16 on CUDA / fp32 on CPU), auto: nf4 on CUDA",
                  "choices": ["auto", "nf4", "none"]},
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    epochs: int = field(default=3, metadata={"help": "passes over the training split"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of optimizer steps of linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on LoRA weights"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    batch_size: int = field(default=16, metadata={"help": "samples per optimizer step (the effective batch)"})
    micro_batch_size: int = field(
        default=0, metadata={"help": "samples per forward/backward, a divisor of --batch-size; 0: the memory preset's"},
    )
    memory_preset: str = field(
        default="auto",
        metadata={"help": "split of a step to fit GPU memory: " + "; ".join(f"{k}: {v.note}" for k, v in MEMORY_PRESETS.items())
                  + "; auto: the largest that suits the GPU", "choices": ["auto", *MEMORY_PRESETS]},
    )
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens; longer is an error"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps (the schedule uses it)"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training samples"})
    gradient_checkpointing: str = field(
        default="auto", metadata={"help": "recompute activations in backward: on (every layer), every-2/every-3 "
                                          "(every n-th layer), off; auto: as the memory preset says",
                                  "choices": list(RECOMPUTE_CHOICES)},
    )
    save_every_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    checkpoint_every_minutes: float = field(
        default=10.0, metadata={"help": "also checkpoint when this many minutes passed since the last one, so a "
                                        "kill loses at most that much work (0: by steps only)"},
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    log_every_steps: int = field(default=10, metadata={"help": "log loss, lr, samples/s every N steps"})
    stop_after_steps: int | None = field(
        default=None,
        metadata={"help": "checkpoint and stop after N optimizer steps in total (time-sliced jobs); rerun resumes"},
    )
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    num_processes: int = field(
        default=0,
        metadata={"help": "data-parallel processes, one per GPU, launched by the step itself (torchrun); "
                          "0: one per visible GPU (1 on CPU)"},
    )

    def __post_init__(self) -> None:
        _check_config(self)

    def hyperparameters(self) -> dict:
        """What defines the result: everything but where it is written and how often it is saved."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_CHANGES}


def _check_config(cfg: FinetuneConfig) -> None:
    """A ValueError naming the flag for a value no run could use."""
    for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "max_length",
                 "save_every_steps", "keep_checkpoints", "log_every_steps"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.checkpoint_every_minutes < 0:
        raise ValueError(f"--checkpoint-every-minutes must be >= 0, got {cfg.checkpoint_every_minutes}")
    if cfg.num_processes < 0:
        raise ValueError(f"--num-processes must be >= 0 (0: one per visible GPU), got {cfg.num_processes}")
    if cfg.micro_batch_size < 0 or (cfg.micro_batch_size and cfg.batch_size % cfg.micro_batch_size):
        raise ValueError(f"--micro-batch-size {cfg.micro_batch_size} must divide --batch-size {cfg.batch_size} "
                         "(or be 0 for the memory preset's)")
    if cfg.gradient_checkpointing not in RECOMPUTE_CHOICES:
        raise ValueError(f"--gradient-checkpointing must be one of {', '.join(RECOMPUTE_CHOICES)}, "
                         f"got {cfg.gradient_checkpointing!r}")
    if cfg.memory_preset not in ("auto", *MEMORY_PRESETS):
        raise ValueError(f"--memory-preset must be auto or one of {', '.join(MEMORY_PRESETS)}, got {cfg.memory_preset!r}")
    for name in ("max_steps", "train_limit", "stop_after_steps"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {cfg.learning_rate}")


# --------------------------------------------------------------------------------------------
# Data order: a fixed permutation per epoch, so a data position is just (epoch, step in epoch).
# --------------------------------------------------------------------------------------------


def epoch_windows(num_samples: int, epoch: int, cfg: FinetuneConfig, micro_batch_size: int,
                  rank: int = 0, world_size: int = 1) -> list[list[list[int]]]:
    """Sample indices of one epoch as optimizer steps -> micro-batches -> samples, for ``rank``.

    Steps are cut from the permutation by --batch-size alone, so the data position (epoch, step
    in epoch) and each step's samples do not depend on how a step is split into micro-batches or
    across processes: rank r takes the r-th contiguous share of every step (possibly empty in a
    short last step).
    """
    import torch

    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
    steps = [order[i : i + cfg.batch_size] for i in range(0, num_samples, cfg.batch_size)]
    shares = []
    for step in steps:
        size = math.ceil(len(step) / world_size)
        share = step[rank * size : (rank + 1) * size]
        shares.append([share[i : i + micro_batch_size] for i in range(0, len(share), micro_batch_size)])
    return shares


def total_steps(num_samples: int, cfg: FinetuneConfig) -> int:
    steps = cfg.epochs * math.ceil(num_samples / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def memory_plan(cfg: FinetuneConfig, device, world_size: int = 1) -> tuple[str, int, int]:
    """(preset name, micro-batch size, recompute every n-th layer (0: none)) for ``device``.

    On CUDA the preset comes from the card's total memory unless named; explicit
    --micro-batch-size / --gradient-checkpointing override the preset's. On CPU there is no
    memory pressure worth recomputing for: whole steps up to 8 samples, no recomputation.
    """
    import torch

    if device.type == "cuda":
        name = cfg.memory_preset
        if name == "auto":
            gib = torch.cuda.get_device_properties(device).total_memory / 2**30
            name = max((p for p in MEMORY_PRESETS.items() if p[1].min_gpu_gib <= gib), key=lambda p: p[1].min_gpu_gib)[0]
        preset = MEMORY_PRESETS[name]
        micro, recompute_every = preset.micro_batch_size, preset.recompute_every
    else:
        name, micro, recompute_every = "cpu", 8, 0
    per_process = math.ceil(cfg.batch_size / world_size)  # each process's share of a step
    micro = cfg.micro_batch_size or math.gcd(per_process, micro)  # a divisor of the share
    if cfg.gradient_checkpointing != "auto":
        recompute_every = RECOMPUTE_CHOICES[cfg.gradient_checkpointing]
    return name, micro, recompute_every


# --------------------------------------------------------------------------------------------
# Loss: logits only where labels are.
# --------------------------------------------------------------------------------------------


def answer_loss_sum(causal_lm, batch: dict):
    """Summed cross-entropy over answer tokens, and how many there are.

    The LM head runs only on positions that predict an answer token: with Gemma's 262k-entry
    vocabulary the full [batch, seq, vocab] logits tensor would dominate memory.
    """
    import torch.nn.functional as F

    from components import modeling

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = causal_lm.model(**inputs, use_cache=False).last_hidden_state
    # Position t predicts token t + 1.
    targets = labels[:, 1:]
    keep = targets != -100
    logits = modeling.output_logits(causal_lm, hidden[:, :-1][keep])
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_root(cfg: FinetuneConfig) -> Path:
    """The folder the step-N checkpoints go in (see --checkpoint-dir)."""
    if not cfg.checkpoint_dir:
        output = Path(cfg.output_dir).absolute()
        return output.with_name(output.name + CHECKPOINTS_SUFFIX)
    if cfg.checkpoint_dir.startswith("gs://"):
        from components import gcs

        return Path(gcs.fuse_path(cfg.checkpoint_dir))
    return Path(cfg.checkpoint_dir)


def latest_checkpoint(root: Path) -> Path | None:
    """Newest checkpoint whose state file exists (a folder without it was cut off mid-write)."""
    if not root.is_dir():
        return None
    return max(_complete_checkpoints(root), key=lambda p: int(p.name.split("-")[1]), default=None)


def _complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / CHECKPOINT_STATE).is_file()]


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(model, optimizer, scheduler, state: dict, rngs: list[dict]) -> dict:
    """What a checkpoint holds (``rngs``: every process's RNG state), copied to host memory so
    training goes on while it is written; the copy is training's only pause for a checkpoint
    (docs/benchmarks.md#checkpoints)."""
    import copy

    import torch
    from peft import get_peft_model_state_dict

    def to_host(value):
        return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else copy.deepcopy(value)

    optim = optimizer.state_dict()
    return {
        "adapter": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": {"state": {i: {k: to_host(v) for k, v in s.items()} for i, s in optim["state"].items()},
                      "param_groups": copy.deepcopy(optim["param_groups"])},
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": rngs,
        "state": copy.deepcopy(state),
    }


def write_checkpoint(root: Path, snap: dict, keep: int) -> Path:
    """Write ``snap`` as checkpoint step-N so that a reader never takes a partial one as complete.

    No folder rename: on Cloud Storage FUSE a rename copies object by object and can be cut off
    half-way; each file appears whole when closed, and the state file, written last, marks the rest.
    """
    import torch
    from safetensors.torch import save_file

    final = root / f"step-{snap['state']['global_step']:06d}"
    if final.exists():
        shutil.rmtree(final)  # a cut-off earlier write of the same step
    final.mkdir(parents=True)
    save_file(snap["adapter"], final / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    torch.save(snap["optimizer"], final / "optimizer.pt")
    torch.save(snap["scheduler"], final / "scheduler.pt")
    for rank, rng in enumerate(snap["rng"]):
        torch.save(rng, final / rng_file(rank))
    write_json_atomic(final / CHECKPOINT_STATE, snap["state"])
    # The newest ``keep`` complete checkpoints stay; older ones and cut-off writes go.
    kept = sorted(_complete_checkpoints(root), key=lambda p: p.name)[-keep:]
    for stale in root.iterdir():
        if re.fullmatch(r"step-\d+", stale.name) and stale not in kept:
            shutil.rmtree(stale, ignore_errors=True)
    return final


class CheckpointWriter:
    """Writes snapshots on a background thread, one at a time (a new one waits for the last)."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snap: dict) -> None:
        self.wait()
        # A daemon thread: a process that exits (SIGTERM) leaves a write in flight unfinished,
        # without its state file, and the resume ignores it.
        self._thread = threading.Thread(target=self._write, args=(snap,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, snap: dict) -> None:
        try:
            write_checkpoint(self.root, snap, self.keep)
        except BaseException as error:  # raised in the training thread by the next wait()
            self._error = error

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight (up to ``timeout`` s); True when none is left."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint write to {self.root} failed: {error}") from error
        return self._thread is None or not self._thread.is_alive()


def delete_checkpoints(root: Path) -> None:
    """After the adapter is written: the checkpoints are spent (the folder too, once empty)."""
    if not root.is_dir():
        return
    for stale in root.iterdir():
        if re.fullmatch(r"step-\d+", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore a checkpoint; a rank the checkpoint has no RNG state for (the run had fewer
    processes) gets a fresh seed derived from the step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / ADAPTER_WEIGHTS))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = read_json(ckpt / CHECKPOINT_STATE)
    if (ckpt / rng_file(rank)).is_file():
        set_rng_state(torch.load(ckpt / rng_file(rank), weights_only=False))
    else:
        torch.manual_seed(state["global_step"] * 1000 + rank)
    return state


# --------------------------------------------------------------------------------------------
# Several processes: one per GPU, launched by the step itself
# --------------------------------------------------------------------------------------------


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) inside a torchrun worker of a multi-process run, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    return None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum_(tensors) -> None:
    """Sum ``tensors`` over all processes in place, in one collective (no-op in one process)."""
    if not _distributed() or not tensors:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(reduced)


def agree(preempted: bool, due: bool, device) -> tuple[bool, bool]:
    """(stop for SIGTERM, checkpoint now), the same in every process: a SIGTERM seen by any stops
    them all at the same step, and rank 0's clock decides when a checkpoint is due."""
    if not _distributed():
        return preempted, due
    import torch
    import torch.distributed as dist

    flags = torch.tensor([float(preempted), float(due and dist.get_rank() == 0)], device=device)
    all_reduce_sum_([flags])
    return bool(flags[0].item()), bool(flags[1].item())


def all_gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` in one process)."""
    if not _distributed():
        return [obj]
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@contextlib.contextmanager
def on_sigterm(handler: Callable[[], None]) -> Iterator[None]:
    """Call ``handler`` on SIGTERM inside the block; Python delivers signals to the main thread
    only, so elsewhere (a test's thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch_workers(cfg: FinetuneConfig, processes: int) -> dict:
    """Run this step as ``processes`` data-parallel workers under torchrun, forwarding SIGTERM
    (Cloud Run and Vertex signal only the container's first process) so they stop together."""
    import subprocess

    from components.cli import to_argv

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "components.finetune", *to_argv(dataclasses.replace(cfg, num_processes=processes))]
    print(f"launching {processes} worker processes: {' '.join(command[:6])} ...", flush=True)
    worker = subprocess.Popen(command)
    with on_sigterm(lambda: worker.send_signal(signal.SIGTERM)):
        code = worker.wait()
    output_dir = Path(cfg.output_dir)
    if code != 0:
        raise SystemExit(f"finetune: {processes} worker processes exited with {code}; complete checkpoints in "
                         f"{checkpoint_root(cfg)} let a rerun resume")
    if (output_dir / TRAIN_METRICS).is_file():
        return read_json(output_dir / TRAIN_METRICS)
    state = read_json(latest_checkpoint(checkpoint_root(cfg)) / CHECKPOINT_STATE)  # stopped early (--stop-after-steps)
    return {"stopped_at_step": state["global_step"], "total_steps": state["total_steps"]}


def attach_lora(model, cfg: FinetuneConfig, recompute_every: int):
    """The PEFT model with LoRA on every linear layer of the language model and vision tower,
    and the adapted layers' names. ``recompute_every`` n > 0 recomputes every n-th layer."""
    from peft import LoraConfig, get_peft_model

    from components import modeling

    if recompute_every:
        # Non-reentrant checkpointing recomputes each layer with the same arguments, KV-shared
        # layers' shared key/value states included (tests/test_finetune.py checks the gradients).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=recompute_every)
        model.enable_input_require_grads()
    targets = modeling.lora_target_modules(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    return get_peft_model(model, lora), targets


def encode_step(processor, micro_batches, class_names, cfg: FinetuneConfig) -> list[dict]:
    """Model inputs with labels for each micro-batch (lists of examples) of one optimizer step."""
    from components import prompting

    return [
        prompting.encode_training_batch(processor, [ex.image() for ex in micro], [ex.label_name for ex in micro],
                                        class_names, max_length=cfg.max_length)
        for micro in micro_batches
    ]


def train_step(causal_lm, batches: list[dict], device, optimizer, scheduler, trainable, max_grad_norm: float) -> float:
    """One optimizer step over encoded micro-batches; returns the step's loss per answer token."""
    import torch

    from components import modeling

    # Normalise by the answer tokens of the whole optimizer step, on all processes, so the
    # gradient is the same however the step is split into micro-batches and processes.
    counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))], device=device)
    all_reduce_sum_([counts])
    n_tokens = counts.item()
    dtype = modeling.compute_dtype(device)
    step_loss = torch.zeros(1, device=device)
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        # bf16 autocast on CUDA: PEFT keeps LoRA weights in fp32 (small updates are not rounded
        # away), whose matmuls would otherwise miss the bf16 tensor cores (docs/benchmarks.md#autocast).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss_sum, _ = answer_loss_sum(causal_lm, batch)
        (loss_sum / n_tokens).backward()
        step_loss += loss_sum.detach()
    if _distributed():
        # Every process holds the same adapter; summing the gradients once per optimizer step
        # keeps them identical (a process with no samples in a short last step adds zeros).
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_sum_([p.grad for p in trainable] + [step_loss])
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss.item() / n_tokens  # one host sync per step, not per micro-batch


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_inputs(cfg: FinetuneConfig):
    """Everything cheap, before the model (and any GPU time) is touched: (class names, device,
    quantization), or a UserError naming the flag."""
    from components import modeling, shards

    if checkpoint_root(cfg).absolute().is_relative_to(Path(cfg.output_dir).absolute()):
        raise UserError(f"--checkpoint-dir {checkpoint_root(cfg)} is inside --output-dir {cfg.output_dir}: the "
                        "adapter artifact must hold only the adapter and its processor files")
    modeling.check_model_dir(cfg.model_dir)
    try:
        manifest = shards.read_manifest(cfg.dataset_dir)
    except ValueError as err:  # a manifest.json that is not one (FileNotFoundError names the file)
        raise UserError(f"--dataset-dir {cfg.dataset_dir}: {err}") from None
    if not manifest["splits"].get("train", {}).get("num_examples"):
        raise UserError(f"--dataset-dir {cfg.dataset_dir}: the train split is empty")
    device, quantization = modeling.checked_device(cfg.device, cfg.quantization)
    return manifest["class_names"], device, quantization


def run(cfg: FinetuneConfig) -> dict:
    import torch

    output_dir = Path(cfg.output_dir)
    class_names, device, quantization = check_inputs(cfg)

    if (output_dir / TRAIN_METRICS).is_file():
        done = read_json(output_dir / TRAIN_METRICS)
        if done.get("hyperparameters") == cfg.hyperparameters():
            print(f"{output_dir} already holds a finished run with these hyperparameters; nothing to do")
            return done

    distributed = distributed_env()
    if distributed is None:
        processes = cfg.num_processes or (torch.cuda.device_count() if device.type == "cuda" else 1)
        if device.type == "cuda" and device.index is not None:
            processes = 1  # a named GPU (--device cuda:N) means that one GPU
        if processes > 1:
            return launch_workers(cfg, processes)
    rank, world_size, local_rank = distributed or (0, 1, 0)
    if distributed:
        # NCCL between GPUs, gloo between CPU processes (the tests' 2-process run).
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    try:
        return _train(cfg, output_dir, class_names, device, quantization, rank, world_size)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _train(cfg: FinetuneConfig, output_dir: Path, class_names: list[str], device, quantization: str,
           rank: int, world_size: int) -> dict:
    """The training loop of one process (of ``world_size``); rank 0 writes what is shared."""
    from tqdm import tqdm

    run = _setup(cfg, class_names, device, quantization, rank, world_size)
    _resume(run)
    writer = CheckpointWriter(checkpoint_root(cfg), cfg.keep_checkpoints)
    progress = tqdm(total=run.steps, initial=run.state["global_step"], desc="finetune", unit="step",
                    mininterval=2, disable=rank != 0)
    run.model.train()
    run.started, run.last_saved = time.perf_counter(), time.monotonic()
    # Cloud Run and Vertex stop a task with SIGTERM and kill it about 10 s later: finish the
    # current step and exit without starting a (multi-GB) checkpoint write; the retry resumes.
    preempted: list[bool] = []
    with on_sigterm(lambda: preempted.append(True)):
        for batches in _encoded_steps(run):
            loss = train_step(run.causal_lm, batches, device, run.optimizer, run.scheduler, run.trainable,
                              cfg.max_grad_norm)
            _advance(run)
            _report(run, loss, progress)
            if _checkpoint_or_stop(run, writer, bool(preempted)):
                progress.close()
                run.say(f"stopped after step {run.state['global_step']} as asked (--stop-after-steps); "
                        "rerun to resume")
                return {"stopped_at_step": run.state["global_step"], "total_steps": run.steps}
        writer.wait()  # spent once the adapter is written, but let it finish before deleting
    progress.close()
    return _finish(run, output_dir)


@dataclass
class _Run:
    """One process's training run: what the loop, the checkpoints and the final write share."""

    cfg: FinetuneConfig
    rank: int
    world_size: int
    device: Any
    quantization: str
    class_names: list[str]
    examples: list
    processor: Any
    model: Any  # the PEFT model
    targets: list[str]  # the LoRA-adapted layers
    trainable: list
    optimizer: Any
    scheduler: Any
    plan: tuple[str, int, int]  # memory_plan's (preset, micro-batch size, recompute every)
    steps: int
    state: dict  # the data position and log a checkpoint saves
    attempt: int = field(default_factory=lambda: int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0")))
    started: float = 0.0  # perf_counter at the first step of this run
    last_saved: float = 0.0  # monotonic time of the last checkpoint (or the start)
    samples_this_run: int = 0

    @property
    def causal_lm(self):
        return self.model.get_base_model()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.cfg.batch_size)

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message)


def _setup(cfg: FinetuneConfig, class_names: list[str], device, quantization: str, rank: int,
           world_size: int) -> _Run:
    """Data, base model with LoRA, optimizer and schedule of one process, at step 0."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from components import modeling, shards

    plan = memory_plan(cfg, device, world_size)
    examples = shards.load_examples(cfg.dataset_dir, "train", limit=cfg.train_limit)
    if not examples:
        raise ValueError(f"--dataset-dir {cfg.dataset_dir}: the train split is empty")
    steps = total_steps(len(examples), cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same LoRA init in every process
    processor = modeling.load_processor(cfg.model_dir)
    model, targets = attach_lora(modeling.load_model(cfg.model_dir, device, quantization), cfg, plan[2])
    if world_size > 1:
        torch.manual_seed(cfg.seed * 1000 + rank)  # but each process its own dropout masks
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * steps), steps)
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "samples_seen": 0, "log": [], "total_steps": steps}
    return _Run(cfg, rank, world_size, device, quantization, class_names, examples, processor, model, targets,
                trainable, optimizer, scheduler, plan, steps, state)


def _resume(run: _Run) -> None:
    """Continue from the newest complete checkpoint, if any, and say what is trained how."""
    cfg, root = run.cfg, checkpoint_root(run.cfg)
    ckpt = latest_checkpoint(root)
    if ckpt is not None:
        saved = read_json(ckpt / CHECKPOINT_STATE)
        if saved.get("hyperparameters") != cfg.hyperparameters():
            raise ValueError(
                f"{ckpt} was written with other hyperparameters; use a new --output-dir or the same flags "
                f"(saved: {saved.get('hyperparameters')})"
            )
        run.state = load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, run.rank)
        run.say(f"resuming from {ckpt} (step {run.state['global_step']} of {run.steps}, attempt {run.attempt})")
    elif run.attempt > 0:
        run.say(f"Cloud Run task attempt {run.attempt}: no complete checkpoint in {root}, starting over")
    run.state["hyperparameters"] = cfg.hyperparameters()  # a resume checks them against its own
    run.state["total_steps"] = run.steps
    preset, micro_batch_size, recompute_every = run.plan
    run.say(f"training {len(run.targets)} LoRA-adapted linear layers "
            f"({sum(p.numel() for p in run.trainable):,} trainable parameters) on {run.world_size} x "
            f"{run.device.type}, {run.quantization}, {len(run.examples)} samples, {run.steps} optimizer steps "
            f"of {cfg.batch_size} samples (memory preset {preset}: micro-batch {micro_batch_size}, "
            f"recompute every {recompute_every} layers)")


def _encoded_steps(run: _Run) -> Iterator[list[dict]]:
    """Each remaining optimizer step's encoded micro-batches, from the resumed data position on.
    The next step's images are decoded and preprocessed on a CPU thread while this one trains
    (docs/design.md says why not torch's DataLoader)."""
    from components import prompting

    windows: dict[int, list] = {}

    def encode(position: tuple[int, int]) -> list[dict]:
        epoch, index = position
        if epoch not in windows:
            windows.clear()  # one epoch's order at a time
            windows[epoch] = epoch_windows(len(run.examples), epoch, run.cfg, run.plan[1], run.rank, run.world_size)
        window = [[run.examples[i] for i in micro] for micro in windows[epoch][index]]
        return encode_step(run.processor, window, run.class_names, run.cfg)

    def positions() -> Iterator[tuple[int, int]]:
        epoch, index = run.state["epoch"], run.state["step_in_epoch"]
        for _ in range(run.steps - run.state["global_step"]):
            yield epoch, index
            epoch, index = (epoch, index + 1) if index + 1 < run.steps_per_epoch else (epoch + 1, 0)

    return prompting.prefetched(encode, positions())


def _advance(run: _Run) -> None:
    """Move the data position past the step just taken."""
    state, batch_size = run.state, run.cfg.batch_size
    # Samples in this step over all processes (the last step of an epoch may be short).
    n_samples = min(batch_size, len(run.examples) - state["step_in_epoch"] * batch_size)
    run.samples_this_run += n_samples
    state["samples_seen"] += n_samples
    state["global_step"] += 1
    state["step_in_epoch"] += 1
    if state["step_in_epoch"] == run.steps_per_epoch:
        state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0


def _report(run: _Run, loss: float, progress) -> None:
    """Progress bar every step; a log entry every --log-every-steps and at the end."""
    rate = run.samples_this_run / (time.perf_counter() - run.started)
    lr = run.scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    step = run.state["global_step"]
    if step % run.cfg.log_every_steps == 0 or step >= run.steps:
        entry = {"step": step, "loss": loss, "lr": lr, "samples_per_s": rate,
                 "peak_memory_mb": peak_memory_mb(run.device)}
        run.state["log"].append(entry)
        if run.rank == 0:
            progress.write(json.dumps(entry))


def _checkpoint_or_stop(run: _Run, writer: CheckpointWriter, preempted: bool) -> bool:
    """Checkpoint when due; exit at once on SIGTERM; True when --stop-after-steps stops here."""
    cfg, step = run.cfg, run.state["global_step"]
    finished = step >= run.steps
    stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps
    due = (step % cfg.save_every_steps == 0 or stopping
           or 0 < cfg.checkpoint_every_minutes * 60 <= time.monotonic() - run.last_saved)
    preempt_now, save_now = agree(preempted, due and not finished, run.device)
    if preempt_now and not finished:
        done = writer.wait(PREEMPT_WAIT_S)  # a write in flight may finish; none is started
        raise SystemExit(f"SIGTERM after step {step}: no new checkpoint started"
                         f"{'' if done else ' (the one in flight is left incomplete)'}; a rerun resumes "
                         f"from {latest_checkpoint(writer.root)}")
    if save_now:
        rngs = all_gather_objects(rng_state())  # every process's, for rank 0 to write
        if run.rank == 0:
            writer.submit(snapshot(run.model, run.optimizer, run.scheduler, run.state, rngs))
        run.last_saved = time.monotonic()
    if stopping and not finished:
        writer.wait()
        _barrier()
        return True
    return False


def _finish(run: _Run, output_dir: Path) -> dict:
    """The run's metrics; rank 0 writes the adapter, the processor and the metrics (last)."""
    cfg, state = run.cfg, run.state
    preset, micro_batch_size, recompute_every = run.plan
    metrics = {
        "final_loss": state["log"][-1]["loss"] if state["log"] else None,
        "steps": state["global_step"],
        "epochs": cfg.epochs,
        "train_samples": len(run.examples),
        "samples_per_s": run.samples_this_run / max(time.perf_counter() - run.started, 1e-9),
        "peak_memory_mb": peak_memory_mb(run.device),  # of rank 0's device
        "device": str(run.device),
        "num_processes": run.world_size,
        "quantization": run.quantization,
        "gradient_checkpointing": recompute_every > 0,
        "recompute_every": recompute_every,
        "memory_preset": preset,
        "micro_batch_size": micro_batch_size,
        "adapted_modules": run.targets,
        "trainable_parameters": sum(p.numel() for p in run.trainable),
        "cloud_run_task_attempt": run.attempt,
        "dataset_manifest_sha256": sha256_file(Path(cfg.dataset_dir) / DATASET_MANIFEST),
        "hyperparameters": cfg.hyperparameters(),
        "log": state["log"],
    }
    if run.rank == 0:
        run.model.save_pretrained(output_dir)
        run.processor.save_pretrained(output_dir)
        make_readable(output_dir)
        write_json_atomic(output_dir / TRAIN_METRICS, metrics)  # last: marks the adapter folder complete
        delete_checkpoints(checkpoint_root(cfg))
        print(f"wrote adapter to {output_dir}: final loss {metrics['final_loss']}, "
              f"{metrics['samples_per_s']:.2f} samples/s")
    _barrier()
    return metrics


@entrypoint
def main(argv: list[str] | None = None) -> int:
    run(parse_config(FinetuneConfig, argv))  # run checks its inputs before loading the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
