"""Render, create/update and execute the Cloud Run Job that runs ``gemma-pets finetune`` on a GPU.

    python -m deploy.cloud_run_job render  --project P --bucket B \\
        --model-path weights/gemma --dataset-path datasets/pets --output-path runs/r1/finetune
    python -m deploy.cloud_run_job create  ...same flags...   # fails if the job exists
    python -m deploy.cloud_run_job update  ...same flags...   # fails if it does not
    python -m deploy.cloud_run_job deploy  ...same flags...   # either
    python -m deploy.cloud_run_job execute --project P [--region R] [--wait]

Anything after ``--`` is appended to the finetune command line (e.g. ``-- --epochs 1``).

The spec is deploy/cloud_run_job.yaml with its placeholders filled from the flags and checked
against Cloud Run's documented limits before anything is sent; ``create|update|deploy`` then run
``gcloud run jobs replace``, ``execute`` runs ``gcloud run jobs execute``. ``--dry-run`` prints
the gcloud command lines instead of running them. The job needs no secret (fine-tuning reads
staged weights); ``--hf-token-secret`` adds one by Secret Manager name and pinned version only:
this tool never reads or prints a token value.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = Path(__file__).with_name("cloud_run_job.yaml")
# Where cloudbuild.yaml pushes the image with its default substitutions (_REPOSITORY, _IMAGE).
IMAGE_REPOSITORY = "gemma-pets"
IMAGE_NAME = "trainer"
# The template's placeholder values; none may survive rendering.
PLACEHOLDERS = ("PROJECT_ID", "REGION", "SERVICE_ACCOUNT", "IMAGE", "BUCKET", "MODEL_PATH",
                "DATASET_PATH", "OUTPUT_PATH")
# Where the seed's fine-tune ran on an RTX PRO 6000 (Cloud Run offers GPUs in a few regions only:
# https://cloud.google.com/run/docs/configuring/jobs/gpu).
DEFAULT_REGION = "europe-west4"
PLACEHOLDER_RE = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(PLACEHOLDERS) + r")(?![A-Za-z0-9_])")
ACCELERATOR_KEY = "run.googleapis.com/accelerator"
# finetune flags this tool sets itself from --model-path/--dataset-path/--output-path.
PATH_FLAGS = ("--model-dir", "--dataset-dir", "--output-dir")
# Env names that must come from Secret Manager (valueFrom), never as a literal `value`.
SECRET_ENV_RE = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)

# --- Cloud Run limits, from the docs each constant names --------------------------------------
# https://cloud.google.com/run/docs/configuring/task-timeout: tasks run "up to 168 hours (7
# days)"; the page (2026-12) adds "for tasks using GPUs, the maximum available timeout is 12 hours
# (preview)" (it said 1 hour before). Values up to 168 h are accepted, with a warning past 12 h:
# the API, not this tool, has the last word on a limit that keeps moving.
MAX_TASK_TIMEOUT_S = 168 * 3600
DOCUMENTED_GPU_TASK_TIMEOUT_S = 12 * 3600
# The seed's job ran 360 minutes per attempt; retries resume from checkpoints.
DEFAULT_TASK_TIMEOUT_S = 6 * 3600
# https://cloud.google.com/run/docs/configuring/max-retries: "an integer from 0 to 10".
MAX_RETRIES_LIMIT = 10
# https://cloud.google.com/run/docs/configuring/jobs/cpu: vCPU -> (min, max) memory in GiB for
# instances of up to 8 vCPU, the most a non-GPU or L4 instance gets.
CPU_MEMORY_GIB = {1: (0.125, 4), 2: (0.125, 8), 4: (2, 16), 6: (4, 24), 8: (4, 32)}


@dataclasses.dataclass(frozen=True)
class GpuType:
    min_cpu: int
    min_memory_gib: float
    default_cpu: int
    default_memory: str
    max_cpu: int | None  # None: the docs give no maximum for this type
    # finetune flags the card needs (set unless given after --), and the largest LoRA rank it fits
    finetune_args: tuple[tuple[str, str], ...] = ()
    max_lora_r: int | None = None


# https://cloud.google.com/run/docs/configuring/jobs/gpu: "For L4 GPUs, you must use a minimum
# of 4 CPU and 16 GiB of memory"; "For NVIDIA RTX PRO 6000 Blackwell GPU, you must use a minimum
# of 20 CPU and 80 GiB of memory" (Preview). Defaults: the L4 at its 8 vCPU / 32 GiB ceiling
# (weights load through host memory; gcsfuse stages written files in memory), the RTX at its floor
# (what the seed's job ran with). 31B at LoRA r=64 needs more than the L4's 24 GB: there it runs
# finetune's "24gb" memory preset, measured at r=16 (components/finetune.py MEMORY_PRESETS,
# docs/benchmarks.md); the RTX PRO 6000 (96 GB) takes the defaults ("fast" preset, r=64).
GPU_TYPES = {
    "nvidia-rtx-pro-6000": GpuType(min_cpu=20, min_memory_gib=80, default_cpu=20,
                                   default_memory="80Gi", max_cpu=None),
    "nvidia-l4": GpuType(min_cpu=4, min_memory_gib=16, default_cpu=8, default_memory="32Gi",
                         max_cpu=8, max_lora_r=16,
                         finetune_args=(("--memory-preset", "24gb"), ("--lora-r", "16"),
                                        ("--lora-alpha", "16"))),
}

PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")          # GCP project ID rules
REGION_RE = re.compile(r"^[a-z]+(-[a-z]+)+[0-9]+$")                   # e.g. us-central1
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")        # GCS bucket name rules
JOB_NAME_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")      # Cloud Run resource names
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")                     # Secret Manager secret IDs
SECRET_VERSION_RE = re.compile(r"^[1-9][0-9]*$")  # pinned: "latest" would change under a job
SERVICE_ACCOUNT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9.-]+\.iam\.gserviceaccount\.com$")
DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
MEMORY_RE = re.compile(r"^(\d+)(Mi|Gi)$")


def project_version(pyproject: Path = REPO_ROOT / "pyproject.toml") -> str:
    """The version cloudbuild.yaml tags the image with (read from the same file)."""
    return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]


def default_image(project: str, region: str, version: str | None = None) -> str:
    return (f"{region}-docker.pkg.dev/{project}/{IMAGE_REPOSITORY}/{IMAGE_NAME}:"
            f"{version or project_version()}")


def parse_duration(text: str, flag: str) -> int:
    """Seconds in "3600", "3600s", "90m", "1h30m" or "7d"."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = DURATION_RE.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"{flag} {text!r}: expected seconds or a duration like 45m, 1h, 1h30m, 7d")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_memory_gib(text: str, flag: str) -> float:
    match = MEMORY_RE.match(text)
    if not match:
        raise ValueError(f"{flag} {text!r}: expected a size like 16384Mi or 32Gi")
    value = int(match.group(1))
    return value if match.group(2) == "Gi" else value / 1024


def to_mount_path(bucket: str, value: str, flag: str) -> str:
    """``/gcs/<bucket>/<path>`` for "path", "gs://<bucket>/path" or "/gcs/<bucket>/path"."""
    path = value
    for prefix in ("gs://", "/gcs/"):
        if value.startswith(prefix):
            given_bucket, _, path = value[len(prefix):].partition("/")
            if given_bucket != bucket:
                raise ValueError(f"{flag} {value!r} is in bucket {given_bucket!r}, but the job "
                                 f"mounts --bucket {bucket!r} only")
            break
    path = path.strip("/")
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"{flag} {value!r}: expected a folder inside the bucket, e.g. "
                         f"runs/r1 or gs://{bucket}/runs/r1")
    return f"/gcs/{bucket}/{path}"


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """Everything the rendered spec depends on; checked against Cloud Run's limits on creation."""

    project: str
    region: str
    bucket: str
    model_path: str
    dataset_path: str
    output_path: str
    image: str = ""  # "" -> cloudbuild's tag for this version (default_image)
    job_name: str = "gemma-pets-finetune"
    gpu_type: str = "nvidia-rtx-pro-6000"
    cpu: int | None = None  # None -> the GPU type's default
    memory: str = ""  # "" -> the GPU type's default
    max_retries: int = MAX_RETRIES_LIMIT
    task_timeout_s: int = DEFAULT_TASK_TIMEOUT_S
    hf_token_secret: str = ""  # "" -> no secret and no HF_TOKEN in the job
    hf_token_secret_version: str = ""  # required with a secret: a version number
    service_account: str = ""  # "" -> the project's default compute service account
    mount_options: str = ""  # gcsfuse flags; none needed: the steps rename no folders (files.atomic_dir)
    finetune_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (PROJECT_RE, self.project, "--project", "a project ID like my-project-123"),
            (REGION_RE, self.region, "--region", "a region like us-central1"),
            (BUCKET_RE, self.bucket, "--bucket", "a bucket name (no gs://), like my-bucket"),
            (JOB_NAME_RE, self.job_name, "--job-name",
             "lowercase letters, digits and dashes, starting with a letter, at most 63"),
        ]
        for pattern, value, flag, expected in checks:
            if not pattern.match(value):
                raise ValueError(f"{flag} {value!r}: expected {expected}")
        self._check_secret()
        if self.service_account and not SERVICE_ACCOUNT_RE.match(self.service_account):
            raise ValueError(f"--service-account {self.service_account!r}: expected an email "
                             "like trainer@my-project.iam.gserviceaccount.com")
        if self.image and (any(c.isspace() for c in self.image) or "/" not in self.image):
            raise ValueError(f"--image {self.image!r}: expected a registry path like "
                             "us-central1-docker.pkg.dev/my-project/gemma-pets/trainer:0.1.0")
        if self.gpu_type not in GPU_TYPES:
            raise ValueError(f"--gpu-type {self.gpu_type!r}: expected one of {sorted(GPU_TYPES)}")
        gpu = GPU_TYPES[self.gpu_type]
        cpu, memory = self.resolved_cpu, self.resolved_memory
        memory_gib = parse_memory_gib(memory, "--memory")
        if cpu < gpu.min_cpu or memory_gib < gpu.min_memory_gib:
            raise ValueError(f"--cpu {cpu} --memory {memory}: {self.gpu_type} needs at least "
                             f"{gpu.min_cpu} vCPU and {gpu.min_memory_gib:g}Gi")
        if gpu.max_cpu is not None and cpu > gpu.max_cpu:
            raise ValueError(f"--cpu {cpu}: {self.gpu_type} instances have at most {gpu.max_cpu} vCPU")
        if cpu in CPU_MEMORY_GIB:
            low, high = CPU_MEMORY_GIB[cpu]
            if not low <= memory_gib <= high:
                raise ValueError(f"--memory {memory}: with --cpu {cpu} Cloud Run allows "
                                 f"{low:g}Gi to {high:g}Gi")
        elif cpu <= 8:
            raise ValueError(f"--cpu {cpu}: up to 8 vCPU Cloud Run allows {sorted(CPU_MEMORY_GIB)}")
        if not 0 <= self.max_retries <= MAX_RETRIES_LIMIT:
            raise ValueError(f"--max-retries {self.max_retries}: Cloud Run allows 0 to "
                             f"{MAX_RETRIES_LIMIT}")
        if not 1 <= self.task_timeout_s <= MAX_TASK_TIMEOUT_S:
            raise ValueError(f"--task-timeout {self.task_timeout_s}s: Cloud Run allows 1s to 168h")
        for flag, value in (("--model-path", self.model_path),
                            ("--dataset-path", self.dataset_path),
                            ("--output-path", self.output_path)):
            to_mount_path(self.bucket, value, flag)
        for arg in self.finetune_args:
            if arg.split("=")[0] in PATH_FLAGS:
                raise ValueError(f"finetune argument {arg!r}: set it with --model-path, "
                                 "--dataset-path or --output-path instead")
        self._check_finetune_fits(gpu)

    def _check_secret(self) -> None:
        if not self.hf_token_secret:
            if self.hf_token_secret_version:
                raise ValueError("--hf-token-secret-version without --hf-token-secret")
            return
        if not SECRET_RE.match(self.hf_token_secret):
            raise ValueError(f"--hf-token-secret {self.hf_token_secret!r}: expected a Secret "
                             "Manager secret name (letters, digits, _ and -)")
        if not SECRET_VERSION_RE.match(self.hf_token_secret_version):
            raise ValueError(f"--hf-token-secret-version {self.hf_token_secret_version!r}: "
                             "expected a version number such as 3 (pinned, not latest)")

    def _check_finetune_fits(self, gpu: GpuType) -> None:
        """Refuse finetune flags that contradict what the card needs, saying why."""
        given, needed = finetune_flag_values(self.finetune_args), dict(gpu.finetune_args)
        preset = given.get("--memory-preset")
        if preset and needed.get("--memory-preset", preset) != preset:
            raise ValueError(f"finetune argument --memory-preset {preset}: {self.gpu_type} has "
                             f"24 GB; 31B fits it with --memory-preset {needed['--memory-preset']}")
        rank = given.get("--lora-r")
        if gpu.max_lora_r and rank and rank.isdigit() and int(rank) > gpu.max_lora_r:
            raise ValueError(f"finetune argument --lora-r {rank}: {self.gpu_type} has 24 GB, which "
                             f"fits Gemma 4 31B at LoRA r<={gpu.max_lora_r} (finetune's 24gb "
                             "preset); use --gpu-type nvidia-rtx-pro-6000 for a larger rank")

    @property
    def resolved_cpu(self) -> int:
        return self.cpu if self.cpu is not None else GPU_TYPES[self.gpu_type].default_cpu

    @property
    def resolved_memory(self) -> str:
        return self.memory or GPU_TYPES[self.gpu_type].default_memory

    @property
    def resolved_image(self) -> str:
        return self.image or default_image(self.project, self.region)

    @property
    def resolved_finetune_args(self) -> list[str]:
        """The flags after --, then the GPU type's flags that they did not set."""
        given = finetune_flag_values(self.finetune_args)
        added = [part for flag, value in GPU_TYPES[self.gpu_type].finetune_args
                 if flag not in given for part in (flag, value)]
        return [*self.finetune_args, *added]


def finetune_flag_values(args: tuple[str, ...]) -> dict[str, str]:
    """{"--flag": "value"} of "--flag value" and "--flag=value" pairs in finetune arguments."""
    values = {}
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--"):
            values[flag] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return values


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _task_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["template"]["spec"]


def render_job(settings: JobSettings, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The template with every placeholder replaced by ``settings``; validated before return."""
    job = copy.deepcopy(template if template is not None else load_template())
    job["metadata"]["name"] = settings.job_name
    job["metadata"]["namespace"] = settings.project
    job["metadata"].setdefault("labels", {})["cloud.googleapis.com/location"] = settings.region
    task = _task_spec(job)
    task["maxRetries"] = settings.max_retries
    task["timeoutSeconds"] = settings.task_timeout_s
    if settings.service_account:
        task["serviceAccountName"] = settings.service_account
    else:
        task.pop("serviceAccountName", None)
    task.setdefault("nodeSelector", {})[ACCELERATOR_KEY] = settings.gpu_type
    (container,) = task["containers"]
    container["image"] = settings.resolved_image
    container["args"] = [
        "finetune",
        "--model-dir", to_mount_path(settings.bucket, settings.model_path, "--model-path"),
        "--dataset-dir", to_mount_path(settings.bucket, settings.dataset_path, "--dataset-path"),
        "--output-dir", to_mount_path(settings.bucket, settings.output_path, "--output-path"),
        *settings.resolved_finetune_args,
    ]
    env = [e for e in container.get("env", []) if e["name"] != "HF_TOKEN"]
    if settings.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": settings.hf_token_secret, "key": settings.hf_token_secret_version}}})
    if env:
        container["env"] = env
    else:
        container.pop("env", None)
    limits = container["resources"]["limits"]
    limits["cpu"] = str(settings.resolved_cpu)
    limits["memory"] = settings.resolved_memory
    limits["nvidia.com/gpu"] = "1"
    (mount,) = container["volumeMounts"]
    mount["mountPath"] = f"/gcs/{settings.bucket}"
    (volume,) = task["volumes"]
    attributes = volume["csi"]["volumeAttributes"]
    attributes["bucketName"] = settings.bucket
    if settings.mount_options:
        attributes["mountOptions"] = settings.mount_options
    else:
        attributes.pop("mountOptions", None)
    validate_job(job)
    return job


def validate_job(job: dict[str, Any]) -> None:
    """Checks that hold for any spec this tool sends, whatever produced it."""
    leftover = sorted({m.group(1) for s in _strings(job) for m in PLACEHOLDER_RE.finditer(s)})
    if leftover:
        raise ValueError(f"job spec still has placeholder(s) {leftover} from {TEMPLATE_PATH}")
    task = _task_spec(job)
    if task.get("nodeSelector", {}).get(ACCELERATOR_KEY) not in GPU_TYPES:
        raise ValueError(f"job spec: nodeSelector {ACCELERATOR_KEY} must be one of "
                         f"{sorted(GPU_TYPES)}")
    if not 1 <= int(task["timeoutSeconds"]) <= MAX_TASK_TIMEOUT_S:
        raise ValueError(f"job spec: timeoutSeconds {task['timeoutSeconds']} is not 1..{MAX_TASK_TIMEOUT_S}")
    if not 0 <= int(task["maxRetries"]) <= MAX_RETRIES_LIMIT:
        raise ValueError(f"job spec: maxRetries {task['maxRetries']} is not 0..{MAX_RETRIES_LIMIT}")
    for container in task["containers"]:
        if container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") != "1":
            raise ValueError("job spec: Cloud Run attaches exactly one GPU: limits nvidia.com/gpu '1'")
        for env in container.get("env", []):
            if SECRET_ENV_RE.search(env["name"]) and "value" in env:
                raise ValueError(f"job spec: env {env['name']} holds a literal value; secrets "
                                 "must come from Secret Manager (valueFrom.secretKeyRef)")


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def dump_job(job: dict[str, Any]) -> str:
    return yaml.safe_dump(job, sort_keys=False, default_flow_style=False)


# --- gcloud -----------------------------------------------------------------------------------

def _location_flags(project: str, region: str) -> list[str]:
    return ["--project", project, "--region", region]


def replace_command(gcloud: str, spec_path: str, project: str, region: str) -> list[str]:
    return [gcloud, "run", "jobs", "replace", spec_path, *_location_flags(project, region)]


def exists_command(gcloud: str, job_name: str, project: str, region: str) -> list[str]:
    # `list` with a filter rather than `describe`: a missing job is an empty answer, and any
    # non-zero exit is then a real error (auth, API disabled), never taken for "not found".
    return [gcloud, "run", "jobs", "list", *_location_flags(project, region),
            f"--filter=metadata.name={job_name}", "--format=value(metadata.name)"]


def execute_command(gcloud: str, job_name: str, project: str, region: str, wait: bool) -> list[str]:
    return [gcloud, "run", "jobs", "execute", job_name, *_location_flags(project, region),
            *(["--wait"] if wait else [])]


def _run(command: list[str], capture: bool = False) -> str:
    try:
        done = subprocess.run(command, check=False, text=True,
                              stdout=subprocess.PIPE if capture else None)
    except FileNotFoundError as err:
        raise SystemExit(f"error: cannot run {command[0]!r} ({err}); install the Google Cloud "
                         "CLI or pass --gcloud PATH") from err
    if done.returncode != 0:
        raise SystemExit(f"error: `{shlex.join(command)}` exited with {done.returncode}")
    return done.stdout or ""


def job_exists(gcloud: str, job_name: str, project: str, region: str) -> bool:
    listed = _run(exists_command(gcloud, job_name, project, region), capture=True)
    return job_name in listed.split()


# --- CLI --------------------------------------------------------------------------------------

def _add_location_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, help="Google Cloud project ID")
    parser.add_argument("--region", default=DEFAULT_REGION,
                        help=f"Cloud Run region with the GPU type (default {DEFAULT_REGION})")
    parser.add_argument("--job-name", default=JobSettings.job_name, help="Cloud Run job name")
    parser.add_argument("--gcloud", default="gcloud", help="gcloud executable")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the gcloud commands instead of running them")


def _add_spec_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bucket", required=True,
                        help="Cloud Storage bucket mounted at /gcs/<bucket> (weights, data, outputs)")
    parser.add_argument("--model-path", required=True,
                        help="staged base weights: folder in the bucket (or gs://bucket/...)")
    parser.add_argument("--dataset-path", required=True, help="prepared dataset folder in the bucket")
    parser.add_argument("--output-path", required=True,
                        help="adapter + checkpoints folder in the bucket; retries resume from it")
    parser.add_argument("--image", default="",
                        help="trainer image (default: cloudbuild.yaml's tag for this version, "
                             "<region>-docker.pkg.dev/<project>/gemma-pets/trainer:<version>)")
    parser.add_argument("--gpu-type", default=JobSettings.gpu_type, choices=sorted(GPU_TYPES))
    parser.add_argument("--cpu", type=int, default=None, help="vCPU (default: per GPU type)")
    parser.add_argument("--memory", default="", help="memory like 32Gi (default: per GPU type)")
    parser.add_argument("--max-retries", type=int, default=JobSettings.max_retries,
                        help="retries per task, 0..10; each resumes from the last checkpoint")
    parser.add_argument("--task-timeout", default=f"{DEFAULT_TASK_TIMEOUT_S // 3600}h",
                        help="per attempt, e.g. 45m, 6h or 2d (up to 168h); retries resume "
                             "from the last checkpoint")
    parser.add_argument("--hf-token-secret", default="",
                        help="Secret Manager secret to expose as HF_TOKEN (default: none; "
                             "fine-tuning reads staged weights)")
    parser.add_argument("--hf-token-secret-version", default="",
                        help="the secret's version number (required with --hf-token-secret)")
    parser.add_argument("--service-account", default="",
                        help="service account the job runs as (needs storage.objectUser on the "
                             "bucket, and secretAccessor on the secret if one is given)")
    parser.add_argument("--mount-options", default=JobSettings.mount_options,
                        help="gcsfuse flags for the bucket volume, comma-separated")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.cloud_run_job",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="print (or --output) the filled-in job spec")
    _add_location_flags(render)
    _add_spec_flags(render)
    render.add_argument("--output", default="", help="write the spec here instead of stdout")
    for name, text in (("create", "create the job (error if it exists)"),
                       ("update", "replace the job's spec (error if it does not exist)"),
                       ("deploy", "create the job, or replace its spec if it exists")):
        sub = commands.add_parser(name, help=text)
        _add_location_flags(sub)
        _add_spec_flags(sub)
    execute = commands.add_parser("execute", help="start an execution of the job")
    _add_location_flags(execute)
    execute.add_argument("--wait", action="store_true",
                         help="wait for the execution to finish (may be hours)")
    return parser


def settings_from_args(args: argparse.Namespace, finetune_args: list[str]) -> JobSettings:
    return JobSettings(
        project=args.project, region=args.region, bucket=args.bucket,
        model_path=args.model_path, dataset_path=args.dataset_path, output_path=args.output_path,
        image=args.image, job_name=args.job_name, gpu_type=args.gpu_type, cpu=args.cpu,
        memory=args.memory, max_retries=args.max_retries,
        task_timeout_s=parse_duration(args.task_timeout, "--task-timeout"),
        hf_token_secret=args.hf_token_secret,
        hf_token_secret_version=args.hf_token_secret_version,
        service_account=args.service_account, mount_options=args.mount_options,
        finetune_args=tuple(finetune_args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    finetune_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, finetune_args = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "execute":
        if finetune_args:
            raise SystemExit("error: finetune arguments after -- belong to render/create/update/"
                             "deploy; an execution runs the job's spec")
        settings = None
    else:
        try:
            settings = settings_from_args(args, finetune_args)
            job = render_job(settings)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        if not settings.service_account:
            print("warning: no --service-account: the job runs as the project's default compute "
                  "service account", file=sys.stderr)
        if settings.task_timeout_s > DOCUMENTED_GPU_TASK_TIMEOUT_S:
            print(f"warning: --task-timeout {args.task_timeout} is over the "
                  f"{DOCUMENTED_GPU_TASK_TIMEOUT_S // 3600}h Cloud Run documents for GPU tasks "
                  "(https://cloud.google.com/run/docs/configuring/task-timeout); if the deploy is "
                  "refused, lower it: retries resume from checkpoints", file=sys.stderr)

    if args.command == "render":
        text = dump_job(job)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    if args.command == "execute":
        command = execute_command(args.gcloud, args.job_name, args.project, args.region, args.wait)
        if args.dry_run:
            print(shlex.join(command))
        else:
            _run(command)
        return 0

    if args.dry_run:
        sys.stdout.write(dump_job(job))
        if args.command != "deploy":
            print(shlex.join(exists_command(args.gcloud, args.job_name, args.project, args.region)))
        print(shlex.join(replace_command(args.gcloud, "<spec.yaml>", args.project, args.region)))
        return 0
    if args.command in ("create", "update"):
        exists = job_exists(args.gcloud, args.job_name, args.project, args.region)
        if args.command == "create" and exists:
            raise SystemExit(f"error: job {args.job_name!r} already exists in {args.project}/"
                             f"{args.region}; use `update` (or `deploy`) to change it")
        if args.command == "update" and not exists:
            raise SystemExit(f"error: job {args.job_name!r} does not exist in {args.project}/"
                             f"{args.region}; use `create` (or `deploy`)")
    fd, spec_path = tempfile.mkstemp(prefix=f"{args.job_name}.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dump_job(job))
        _run(replace_command(args.gcloud, spec_path, args.project, args.region))
    finally:
        os.unlink(spec_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
