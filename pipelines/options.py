"""Compile-time options of the pipeline: container image, resource presets, build identity.

Accelerator type/count and CPU/memory limits are baked into the compiled YAML by KFP (they are
not runtime parameters), so they are chosen here, at compile time, through a named preset.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

PIPELINE_NAME = "gemma-pets-finetune"
PROJECT_DISTRIBUTION = "gemma-pets"
IMAGE_ENV = "GEMMA_PETS_IMAGE"
IMAGE_REPOSITORY = "us-central1-docker.pkg.dev/PROJECT/gemma-pets/trainer"
# The image kfp.local runs under is the local venv, not a container: say so in lineage. The name
# contains "python" so kfp.local does not warn that a non-Python image runs in a subprocess.
LOCAL_IMAGE = "local-python-venv"
REPO_ROOT = Path(__file__).resolve().parent.parent


def project_version() -> str:
    try:
        return metadata.version(PROJECT_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        import components

        return components.__version__


def default_image() -> str:
    """The trainer image, tagged by the project version; $GEMMA_PETS_IMAGE overrides it."""
    return os.environ.get(IMAGE_ENV) or f"{IMAGE_REPOSITORY}:{project_version()}"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD of the checkout compiling the pipeline, "+dirty" when tracked files have changes.

    Read at compile time: the task containers have no git checkout. "unknown" outside git.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, check=True, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclasses.dataclass(frozen=True)
class Resources:
    """Limits of one task. accelerator_type "" means a CPU-only task."""

    cpu_limit: str
    memory_limit: str
    accelerator_type: str = ""
    accelerator_count: int = 0

    def __post_init__(self) -> None:
        if bool(self.accelerator_type) != (self.accelerator_count > 0):
            raise ValueError(f"accelerator_type {self.accelerator_type!r} and accelerator_count "
                             f"{self.accelerator_count} must be set together")


# Vertex AI machines carry 1, 2, 4 or 8 of these GPUs (a2/a3 highgpu-Ng, g2-standard, g4-standard:
# https://cloud.google.com/vertex-ai/docs/training/configure-compute).
GPU_COUNTS = (1, 2, 4, 8)
# Memory limit strings KFP accepts that the presets use, in bytes.
MEMORY_UNITS = {"G": 10**9, "Gi": 2**30}


@dataclasses.dataclass(frozen=True)
class Machine:
    """A Compute Engine machine type a preset's GPU task is sized for."""

    name: str
    vcpus: int
    memory_gib: float

    def allocatable(self) -> tuple[float, float]:
        """(vCPU, GiB) left for the task. Vertex AI Pipelines picks "the closest match" to the
        limits (https://cloud.google.com/vertex-ai/docs/pipelines/machine-types) and documents no
        reserve, so GKE's node reservations stand in for it (kube-reserved CPU and memory plus
        100 MiB eviction threshold: https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes).
        Limits above this push Vertex to a larger machine, or fail."""
        cpu_steps = ((1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025))
        memory_steps = ((4, 0.25), (4, 0.2), (8, 0.1), (112, 0.06), (float("inf"), 0.02))
        return (self.vcpus - _tiered(self.vcpus, cpu_steps),
                self.memory_gib - _tiered(self.memory_gib, memory_steps) - 100 / 1024)


def _tiered(total: float, steps) -> float:
    """Sum of rate x amount over consecutive tiers of ``total``."""
    reserved, left = 0.0, total
    for size, rate in steps:
        reserved += rate * min(left, size)
        left -= min(left, size)
    return reserved


def memory_gib(limit: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Gi|G)", limit).groups()
    return int(number) * MEMORY_UNITS[unit] / 2**30


@dataclasses.dataclass(frozen=True)
class Preset:
    """Resources for the GPU tasks (fine-tune, evaluations, merge) and the CPU tasks."""

    name: str
    description: str
    gpu_task: Resources
    cpu_task: Resources
    machine: Machine | None = None  # what gpu_task is sized for (with its accelerator)

    def __post_init__(self) -> None:
        if self.machine is None:
            return
        cpu, gib = self.machine.allocatable()
        if float(self.gpu_task.cpu_limit) > cpu or memory_gib(self.gpu_task.memory_limit) > gib:
            raise ValueError(f"preset {self.name}: cpu {self.gpu_task.cpu_limit} / memory "
                             f"{self.gpu_task.memory_limit} is more than {self.machine.name} leaves "
                             f"a task ({cpu:.2f} vCPU, {gib:.1f} GiB), so Vertex would pick a "
                             "larger machine")


# Vertex AI picks the machine that matches the limits, so the numbers are sized to what the
# machine that carries the accelerator leaves a task (Machine.allocatable).
PRESETS: dict[str, Preset] = {
    "31b-qlora": Preset(
        name="31b-qlora",
        description="Gemma 4 31B, 4-bit QLoRA: the NF4 base (~18 GB) plus activations fit one "
                    "H100 80GB; 170 GB RAM leaves room to load the bf16 shards (~62 GB) for the "
                    "merge.",
        gpu_task=Resources(cpu_limit="12", memory_limit="170G",
                           accelerator_type="NVIDIA_H100_80GB", accelerator_count=1),
        cpu_task=Resources(cpu_limit="8", memory_limit="32G"),
        machine=Machine("a3-highgpu-1g", vcpus=26, memory_gib=234),
    ),
    "31b-rtx-pro-6000": Preset(
        name="31b-rtx-pro-6000",
        description="Gemma 4 31B, 4-bit QLoRA on one RTX PRO 6000 96GB (the GPU the seed's job "
                    "ran on; g4-standard-48): same recipe as 31b-qlora, room for the bf16 merge.",
        gpu_task=Resources(cpu_limit="44", memory_limit="170G",
                           accelerator_type="NVIDIA_RTX_PRO_6000", accelerator_count=1),
        cpu_task=Resources(cpu_limit="8", memory_limit="32G"),
        machine=Machine("g4-standard-48", vcpus=48, memory_gib=180),
    ),
    "e4b": Preset(
        name="e4b",
        description="Gemma 4 E4B: bf16 weights ~16 GB, QLoRA/LoRA on one L4 24GB.",
        gpu_task=Resources(cpu_limit="11", memory_limit="44G",
                           accelerator_type="NVIDIA_L4", accelerator_count=1),
        cpu_task=Resources(cpu_limit="4", memory_limit="16G"),
        machine=Machine("g2-standard-12", vcpus=12, memory_gib=48),
    ),
    "e2b": Preset(
        name="e2b",
        description="Gemma 4 E2B: bf16 weights ~10 GB, LoRA on one L4 24GB.",
        gpu_task=Resources(cpu_limit="7", memory_limit="30G",
                           accelerator_type="NVIDIA_L4", accelerator_count=1),
        cpu_task=Resources(cpu_limit="4", memory_limit="16G"),
        machine=Machine("g2-standard-8", vcpus=8, memory_gib=32),
    ),
    "cpu-smoke": Preset(
        name="cpu-smoke",
        description="No accelerator: the tiny stand-in model on Vertex, to test the wiring cheaply.",
        gpu_task=Resources(cpu_limit="8", memory_limit="32G"),
        cpu_task=Resources(cpu_limit="4", memory_limit="16G"),
    ),
}
DEFAULT_PRESET = "31b-qlora"


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What is fixed when the pipeline is compiled (everything else is a runtime parameter)."""

    image: str
    preset: Preset
    project_version: str
    git_commit: str
    finetune_retries: int = 2
    finetune_gpus: int | None = None  # None: the preset's accelerator count

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image {self.image!r}: must be a non-empty image reference "
                             "without spaces (flag --image or $GEMMA_PETS_IMAGE)")
        if not 0 <= self.finetune_retries <= 10:
            raise ValueError(f"--finetune-retries {self.finetune_retries}: must be in 0..10")
        if self.finetune_gpus is not None:
            if not self.preset.gpu_task.accelerator_type:
                raise ValueError(f"--finetune-gpus {self.finetune_gpus}: preset {self.preset.name} has no "
                                 "accelerator; choose a GPU preset")
            if self.finetune_gpus not in GPU_COUNTS:
                raise ValueError(f"--finetune-gpus {self.finetune_gpus}: Vertex AI machines carry "
                                 f"{', '.join(map(str, GPU_COUNTS[:-1]))} or {GPU_COUNTS[-1]} "
                                 f"{self.preset.gpu_task.accelerator_type} GPUs")

    @property
    def finetune_task(self) -> Resources:
        """The fine-tune task's limits: the preset's GPU task, with ``finetune_gpus`` GPUs."""
        if self.finetune_gpus is None:
            return self.preset.gpu_task
        return dataclasses.replace(self.preset.gpu_task, accelerator_count=self.finetune_gpus)

    @property
    def build(self) -> dict[str, str]:
        """Code identity recorded on every artifact (a constant input of every task)."""
        return {"project_version": self.project_version, "git_commit": self.git_commit,
                "image": self.image}


def compile_options(image: str | None = None, preset: str = DEFAULT_PRESET,
                    finetune_retries: int = 2, finetune_gpus: int | None = None) -> CompileOptions:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} (flag --preset): choose one of {', '.join(PRESETS)}")
    return CompileOptions(image=image or default_image(), preset=PRESETS[preset],
                          project_version=project_version(), git_commit=git_commit(),
                          finetune_retries=finetune_retries, finetune_gpus=finetune_gpus)
