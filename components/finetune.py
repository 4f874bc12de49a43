"""Fine-tune step: QLoRA (or LoRA over an unquantised base) on one device, with checkpoint/resume.

One readable recipe:
  1. load the staged base (nf4 4-bit on CUDA by default, fp32 on CPU) and its processor;
  2. put LoRA on every linear layer of the language model and the vision tower;
  3. train with transformers.Trainer (components/answer_trainer.py) on (image, class name)
     pairs with loss only on the answer and its closing <turn|>, --batch-size samples per
     optimizer step, split into micro-batches by the GPU's memory preset and over several GPUs
     as data-parallel processes the step launches (torchrun);
  4. checkpoint every N optimizer steps and every M minutes into a folder outside the adapter
     output, in Trainer's format, written by a background thread; on start, resume from the
     newest complete one;
  5. write the adapter, the processor and the metrics (last); delete the checkpoints.

    gemma-pets finetune --model-dir weights/ --dataset-dir data/ --output-dir adapter/
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import resource
import shutil
import signal
import threading
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from components.artifacts import (ADAPTER_WEIGHTS, CHECKPOINT_HYPERPARAMETERS, CHECKPOINT_STATE, DATASET_MANIFEST,
                                  TRAIN_METRICS)
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
# How a step is split
# --------------------------------------------------------------------------------------------


def total_steps(num_samples: int, cfg: FinetuneConfig) -> int:
    steps = cfg.epochs * math.ceil(num_samples / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def samples_before(step: int, num_samples: int, cfg: FinetuneConfig) -> int:
    """Samples trained on before optimizer step ``step`` (an epoch's last step may be short)."""
    per_epoch = math.ceil(num_samples / cfg.batch_size)
    return step // per_epoch * num_samples + min(step % per_epoch * cfg.batch_size, num_samples)


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
    if cfg.batch_size % (micro * world_size):
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the micro-batch ({micro}) times the "
                        f"processes ({world_size}): every process takes whole micro-batches of every step")
    return name, micro, recompute_every


# --------------------------------------------------------------------------------------------
# Loss: logits only where labels are.
# --------------------------------------------------------------------------------------------


def answer_loss(model, batch: dict):
    """Summed cross-entropy over answer tokens, and how many there are, through the model's own
    forward (so data-parallel wrappers see it). The LM head runs only on positions that predict
    an answer token (``logits_to_keep`` as a mask): with Gemma's 262k-entry vocabulary the full
    [batch, seq, vocab] logits would dominate memory."""
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = targets != -100
    predicts = F.pad(keep, (0, 1))  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


# --------------------------------------------------------------------------------------------
# Checkpoints: transformers.Trainer's checkpoint format, written on a background thread
# --------------------------------------------------------------------------------------------


def checkpoint_root(cfg: FinetuneConfig) -> Path:
    """The folder the checkpoint-N checkpoints go in (see --checkpoint-dir)."""
    if not cfg.checkpoint_dir:
        output = Path(cfg.output_dir).absolute()
        return output.with_name(output.name + CHECKPOINTS_SUFFIX)
    if cfg.checkpoint_dir.startswith("gs://"):
        from components import gcs

        return Path(gcs.fuse_path(cfg.checkpoint_dir))
    return Path(cfg.checkpoint_dir)


def latest_checkpoint(root: Path) -> Path | None:
    """Newest checkpoint whose trainer state exists (a folder without it was cut off mid-write)."""
    if not root.is_dir():
        return None
    return max(_complete_checkpoints(root), key=_step_of, default=None)


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def _checkpoint_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)]


def _complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in _checkpoint_folders(root) if (p / CHECKPOINT_STATE).is_file()]


def rng_state(distributed: bool) -> dict:
    """This process's RNG states, as Trainer saves (and on resume restores) them."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return state


def snapshot(model, optimizer, scheduler, trainer_state, rngs: list[dict], hyperparameters: dict) -> dict:
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
        "adapter_config": copy.deepcopy(model.peft_config["default"]),
        "optimizer": {"state": {i: {k: to_host(v) for k, v in s.items()} for i, s in optim["state"].items()},
                      "param_groups": copy.deepcopy(optim["param_groups"])},
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": rngs,
        "hyperparameters": hyperparameters,
        "trainer_state": dataclasses.asdict(trainer_state),  # a deep copy
        "step": trainer_state.global_step,
    }


def write_checkpoint(root: Path, snap: dict, keep: int) -> Path:
    """Write ``snap`` as checkpoint-N, in the files and names of Trainer's checkpoints (so
    ``Trainer.train(resume_from_checkpoint=...)`` resumes from it), such that a reader never takes
    a partial one as complete.

    No folder rename: on Cloud Storage FUSE a rename copies object by object and can be cut off
    half-way; each file appears whole when closed, and the trainer state, written last, marks the rest.
    """
    import torch
    from safetensors.torch import save_file

    final = root / f"checkpoint-{snap['step']}"
    if final.exists():
        shutil.rmtree(final)  # a cut-off earlier write of the same step
    final.mkdir(parents=True)
    save_file(snap["adapter"], final / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    snap["adapter_config"].save_pretrained(final)
    torch.save(snap["optimizer"], final / "optimizer.pt")
    torch.save(snap["scheduler"], final / "scheduler.pt")
    for rank, rng in enumerate(snap["rng"]):
        torch.save(rng, final / ("rng_state.pth" if len(snap["rng"]) == 1 else f"rng_state_{rank}.pth"))
    write_json_atomic(final / CHECKPOINT_HYPERPARAMETERS, snap["hyperparameters"])
    write_json_atomic(final / CHECKPOINT_STATE, snap["trainer_state"])  # last: marks the checkpoint complete
    # The newest ``keep`` complete checkpoints stay; older ones and cut-off writes go.
    kept = sorted(_complete_checkpoints(root), key=_step_of)[-keep:]
    for stale in _checkpoint_folders(root):
        if stale not in kept:
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
        # without its trainer state, and the resume ignores it.
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
    for stale in _checkpoint_folders(root):
        shutil.rmtree(stale, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()


def resume_point(cfg: FinetuneConfig) -> Path | None:
    """The newest complete checkpoint, if any; a ValueError if other hyperparameters wrote it."""
    ckpt = latest_checkpoint(checkpoint_root(cfg))
    if ckpt is not None:
        saved = read_json(ckpt / CHECKPOINT_HYPERPARAMETERS)
        if saved != cfg.hyperparameters():
            raise ValueError(f"{ckpt} was written with other hyperparameters; use a new --output-dir or the same "
                             f"flags (saved: {saved})")
    return ckpt


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


def agree(preempted: bool, due: bool, device) -> tuple[bool, bool]:
    """(stop for SIGTERM, checkpoint now), the same in every process: a SIGTERM seen by any stops
    them all at the same step, and rank 0's clock decides when a checkpoint is due."""
    if not _distributed():
        return preempted, due
    import torch
    import torch.distributed as dist

    flags = torch.tensor([float(preempted), float(due and dist.get_rank() == 0)], device=device)
    dist.all_reduce(flags)
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
    return {"stopped_at_step": state["global_step"], "total_steps": state["max_steps"]}


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
            memory_plan(cfg, device, processes)  # a step that cannot be split fails here, not in the workers
            return launch_workers(cfg, processes)
    _, world_size, local_rank = distributed or (0, 1, 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if distributed else device.index or 0)
        torch.cuda.set_device(device)  # the Trainer's "cuda" is the current device
    plan = memory_plan(cfg, device, world_size)
    resume_from = resume_point(cfg)  # before the model: other hyperparameters fail at once
    try:
        return _train(cfg, class_names, device, quantization, plan, world_size, resume_from)
    finally:
        if _distributed():
            torch.distributed.destroy_process_group()


def _train(cfg: FinetuneConfig, class_names: list[str], device, quantization: str, plan: tuple[str, int, int],
           world_size: int, resume_from: Path | None) -> dict:
    """Train with transformers.Trainer (components/answer_trainer.py); rank 0 writes what is shared."""
    import torch

    from components import answer_trainer, modeling, shards

    examples = shards.load_examples(cfg.dataset_dir, "train", limit=cfg.train_limit)
    torch.manual_seed(cfg.seed)  # the same LoRA init in every process
    model, targets = attach_lora(modeling.load_model(cfg.model_dir, device, quantization), cfg, plan[2])
    trainer = answer_trainer.make_trainer(cfg, model, modeling.load_processor(cfg.model_dir), examples,
                                          class_names, plan, world_size)
    preset, micro_batch_size, recompute_every = plan
    setup = {"train_samples": len(examples), "device": str(device), "num_processes": world_size,
             "quantization": quantization, "gradient_checkpointing": recompute_every > 0,
             "recompute_every": recompute_every, "memory_preset": preset, "micro_batch_size": micro_batch_size,
             "adapted_modules": targets,
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "cloud_run_task_attempt": int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0"))}
    trainer.say(_start_message(cfg, setup, trainer.args.max_steps, resume_from))
    with on_sigterm(trainer.step_control.preempt):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.step_control.writer.wait()  # the last checkpoint is written whole before the adapter replaces it
    _barrier()
    if trainer.step_control.stopped:
        trainer.say(f"stopped after step {trainer.state.global_step} as asked (--stop-after-steps); rerun to resume")
        return {"stopped_at_step": trainer.state.global_step, "total_steps": trainer.args.max_steps}
    return _finish(trainer, cfg, setup)


def _start_message(cfg: FinetuneConfig, setup: dict, steps: int, resume_from: Path | None) -> str:
    if resume_from is not None:
        where = f"resuming from {resume_from} (attempt {setup['cloud_run_task_attempt']})"
    elif setup["cloud_run_task_attempt"] > 0:
        where = f"Cloud Run task attempt {setup['cloud_run_task_attempt']}: no complete checkpoint, starting over"
    else:
        where = "starting"
    return (f"{where}: training {len(setup['adapted_modules'])} LoRA-adapted linear layers "
            f"({setup['trainable_parameters']:,} trainable parameters) on {setup['num_processes']} x {setup['device']}, "
            f"{setup['quantization']}, {setup['train_samples']} samples, {steps} optimizer steps of {cfg.batch_size} "
            f"samples (memory preset {setup['memory_preset']}: micro-batch {setup['micro_batch_size']}, "
            f"recompute every {setup['recompute_every']} layers)")


def _finish(trainer, cfg: FinetuneConfig, setup: dict) -> dict:
    """The run's metrics; rank 0 writes the adapter, the processor and the metrics (last)."""
    output_dir = Path(cfg.output_dir)
    log = [{"step": e["step"], "loss": e["loss"], "lr": e["learning_rate"], "samples_per_s": e["samples_per_s"],
            "peak_memory_mb": e["peak_memory_mb"]} for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "final_loss": log[-1]["loss"] if log else None,
        "steps": trainer.state.global_step,
        "epochs": cfg.epochs,
        "samples_per_s": trainer.step_control.samples_per_s(trainer.state),
        "peak_memory_mb": peak_memory_mb(trainer.args.device),  # of rank 0's device
        **setup,
        "dataset_manifest_sha256": sha256_file(Path(cfg.dataset_dir) / DATASET_MANIFEST),
        "hyperparameters": cfg.hyperparameters(),
        "log": log,
    }
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
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
