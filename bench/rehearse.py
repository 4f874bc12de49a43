"""Rehearse the whole DAG at a real size on one machine, and measure every step.

A random-init checkpoint of a published Gemma 4 size (``gemma-pets random-model``; E4B at full
depth, the 31B widths at as many layers as the disk holds) and synthetic pets at photo size run
through ``pipelines.local_run`` (kfp.local, the same component definitions as on Vertex): stage ->
prepare -> fine-tune (a few optimizer steps) -> evaluate baseline and tuned -> gate (forced open by
run parameters) -> merge-export -> evaluate merged. A sampler thread watches each task's process
tree (psutil, every ``--interval`` s) and records, per step: wall time, peak host RSS (summed over
the tree), peak GPU memory (nvidia-smi, per process), bytes read and written (/proc/<pid>/io,
storage and all read()/write() calls), and the size of every output artifact. Results go to
RUN_DIR/rehearsal.json and RUN_DIR/rehearsal.md; docs/rehearsal.md says how to read them.

    python -m bench.rehearse --variant gemma-4-e4b --run-dir runs/rehearse-e4b
    python -m bench.rehearse --variant gemma-4-31b --layers auto --run-dir runs/rehearse-31b
    python -m bench.rehearse --tiny --run-dir runs/rehearse-tiny        # CPU: the tiny stand-in

Sampling misses what a process does in its last interval and the I/O of processes shorter than
one interval; RSS summed over processes counts shared pages more than once.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from components import artifacts
from pipelines import local_run
from pipelines.submit import merge_parameters

GB = 1e9
# The rehearsal's run: the recipe's LoRA, a few optimizer steps at an lr whose s·B·A survives a
# bf16 merge (3 steps at the default 5e-5 does not: docs/merge.md), score-mode evaluations of a
# bounded number of images, the gate forced open (GATE_OPEN).
REAL_SIZE_PARAMETERS: dict[str, Any] = {
    "quantization": "auto",
    "finetune": {"lora_r": 64, "lora_alpha": 64, "learning_rate": 1e-3, "epochs": 1, "max_steps": 3,
                 "batch_size": 16, "max_length": 2048, "save_every_steps": 2},
    "evaluate": {"mode": "score", "batch_size": 0, "limit": 64},
    "merge_export": {"save_dtype": "bfloat16"},
}
TINY_PARAMETERS: dict[str, Any] = {"finetune": {"max_steps": 3}, "evaluate": {"limit": 16, "mode": "score"}}
# The gate forced open by run parameters: any difference passes (margin -1), no accuracy floor
# (random-init weights score at chance), and any merged-vs-tuned gap is accepted.
GATE_OPEN = {"gate": {"margin": -1.0, "min_accuracy": 0.0, "export_tolerance": 1.0}}
PHOTO_SIDE = 500  # px, square: 280 soft tokens, the 500x375 photos' 266 rounded up
DISK_HEADROOM = 0.85  # share of the free disk a plan may use


def model_bytes(variant: str, layers: int) -> int:
    """bf16 bytes of the variant at ``layers`` layers (shapes on the meta device)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from components import random_model

    processor = random_model.stand_in_processor(variant)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(random_model.variant_config(variant, processor.tokenizer, layers))
    return 2 * sum(p.numel() for p in model.parameters())


def disk_need(variant: str, layers: int) -> int:
    """The model, its bf16 export and the fine-tune's adapter + checkpoints (measured 3.8 GB at 31B
    widths and 12 layers: ~a quarter of the model, bounded by it here)."""
    return int(2.5 * model_bytes(variant, layers))


def plan_layers(variant: str, free_bytes: int) -> int:
    """The most layers (whole layer-type units) whose disk need fits the free disk."""
    from components import random_model

    text = random_model.load_variants()["variants"][variant]["text"]
    unit = len(text["layer_types_unit"])
    best = 0
    for units in range(1, text["layer_types_repeat"] + 1):
        if disk_need(variant, units * unit) <= DISK_HEADROOM * free_bytes:
            best = units * unit
    if not best:
        raise SystemExit(f"error: {free_bytes / GB:.1f} GB free is too little for one unit of {variant}")
    return best


class StepSampler(threading.Thread):
    """Per kfp.local task (found by its output file in the executor's command line): first and last
    time seen, peak RSS and GPU memory of its process tree, last I/O counters of each process."""

    def __init__(self, kfp_root: Path, interval: float):
        super().__init__(daemon=True)
        # The task's own output file: its command line also names its inputs, other tasks' folders.
        self.pattern = re.compile(re.escape(str(kfp_root)) + r"/[^/]+/([A-Za-z0-9_.-]+)/executor_output\.json")
        self.interval, self.stop = interval, threading.Event()
        self.steps: dict[str, dict[str, Any]] = {}
        self.owner: dict[int, str | None] = {}
        self.io: dict[int, tuple[str, tuple[int, int, int, int]]] = {}
        self.nvidia_smi = shutil.which("nvidia-smi")

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def task_of(self, proc) -> str | None:
        if proc.pid not in self.owner:
            match = self.pattern.search(" ".join(proc.cmdline())) if "executor_main" in " ".join(proc.cmdline()) else None
            parent = proc.parent()
            self.owner[proc.pid] = match.group(1) if match else (self.task_of(parent) if parent else None)
        return self.owner[proc.pid]

    def gpu_mib(self) -> dict[int, float]:
        if not self.nvidia_smi:
            return {}
        out = subprocess.run([self.nvidia_smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
        return {int(pid): float(mib) for pid, mib in (line.split(",") for line in out.splitlines() if "," in line)}

    def sample(self) -> None:
        import psutil

        now, gpu = time.monotonic(), self.gpu_mib()
        rss: dict[str, int] = {}
        gpu_by_task: dict[str, float] = {}
        for proc in psutil.Process().children(recursive=True):
            try:
                task = self.task_of(proc)
                if task is None:
                    continue
                rss[task] = rss.get(task, 0) + proc.memory_info().rss
                gpu_by_task[task] = gpu_by_task.get(task, 0.0) + gpu.get(proc.pid, 0.0)
                io = proc.io_counters()
                self.io[proc.pid] = (task, (io.read_bytes, io.write_bytes, io.read_chars, io.write_chars))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for task, value in rss.items():
            step = self.steps.setdefault(task, {"first": now, "peak_rss": 0, "peak_gpu_mib": 0.0})
            step["last"] = now
            step["peak_rss"] = max(step["peak_rss"], value)
            step["peak_gpu_mib"] = max(step["peak_gpu_mib"], gpu_by_task[task])

    def results(self) -> dict[str, dict[str, Any]]:
        totals: dict[str, list[int]] = {}
        for task, counters in self.io.values():
            totals.setdefault(task, [0, 0, 0, 0])
            totals[task] = [a + b for a, b in zip(totals[task], counters)]
        out = {}
        for task, step in self.steps.items():
            read, written, read_calls, write_calls = totals.get(task, [0, 0, 0, 0])
            out[task] = {"wall_s": round(step["last"] - step["first"] + self.interval, 1),
                         "peak_rss_gb": step["peak_rss"] / GB, "peak_gpu_gb": step["peak_gpu_mib"] * 2**20 / GB,
                         "read_gb": read / GB, "written_gb": written / GB,
                         "read_calls_gb": read_calls / GB, "write_calls_gb": write_calls / GB}
        return out


def folder_bytes(path: str | None) -> int:
    root = Path(path) if path else None
    if root is None or not root.exists():
        return 0
    return root.stat().st_size if root.is_file() else sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def build_inputs(args: argparse.Namespace, run_dir: Path) -> tuple[str, str, dict]:
    """The model and the raw pets, built once per run folder by the project's own commands."""
    inputs = run_dir / "inputs"
    if args.tiny:
        model, info = inputs / "tiny-gemma4", {"variant": "tiny stand-in", "layers": None}
        command = ["tiny-model", "--output-dir", str(model)]
        marker, side = model / artifacts.TINY_MODEL_INFO, local_run.DEMO_IMAGE_SIZE
    else:
        model = inputs / f"{args.variant}-{args.layers}l"
        info = {"variant": args.variant, "layers": args.layers}
        command = ["random-model", "--variant", args.variant, "--layers", str(args.layers), "--output-dir", str(model)]
        marker, side = model / artifacts.RANDOM_MODEL_INFO, PHOTO_SIDE
    started = time.monotonic()
    if not marker.is_file():
        subprocess.run([sys.executable, "-m", "components", *command], check=True)
    info["model_write_s"] = round(time.monotonic() - started, 1)
    pets = inputs / f"pets-c{args.num_classes}-n{args.images_per_class}-{side}px"
    if not (pets / "annotations").is_dir():
        subprocess.run([sys.executable, "-m", "components", "synthetic-pets", "--output-dir", str(pets),
                        "--num-classes", str(args.num_classes), "--images-per-class", str(args.images_per_class),
                        "--image-size", str(side)], check=True)
    info["model_gb"] = folder_bytes(str(model)) / GB
    return str(model.resolve()), str(pets.resolve()), info


def step_rows(spec: dict, records: dict, measured: dict, started: dict) -> list[dict]:
    """One row per pipeline task in the order they ran, measurements and artifact sizes joined."""
    layout = {name: info["component"].removeprefix("comp-") for name, info in local_run.task_layout(spec).items()}
    rows = []
    for name, record in records.items():
        row = {"step": name, "state": record["state"], **measured.get(layout.get(name, ""), {})}
        row["artifacts_gb"] = {out: folder_bytes(a["uri"]) / GB for out, a in record["outputs"].items()}
        rows.append(row)
    return sorted(rows, key=lambda r: started.get(layout.get(r["step"], ""), float("inf")))


def markdown(result: dict) -> str:
    head = result["model"]
    lines = [f"# Rehearsal: {head['variant']}, {head['layers'] or 'tiny'} layers, model {head['model_gb']:.1f} GB",
             "", f"Pipeline {result['status']} in {result['wall_seconds']} s on {result['machine']}.", "",
             "| step | state | wall s | peak RSS GB | peak GPU GB | read GB | written GB | artifacts GB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["steps"]:
        arts = ", ".join(f"{k} {v:.2f}" for k, v in row["artifacts_gb"].items()) or "-"
        cells = [row.get(k) for k in ("wall_s", "peak_rss_gb", "peak_gpu_gb", "read_gb", "written_gb")]
        text = ["-" if c is None else (f"{c:.2f}" if isinstance(c, float) else str(c)) for c in cells]
        lines.append(f"| {row['step']} | {row['state']} | " + " | ".join(text) + f" | {arts} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--variant", default="gemma-4-e4b", help="published config (not with --tiny)")
    parser.add_argument("--layers", default=None,
                        help="language-model layers: a number, 'auto' (the most the free disk holds) "
                             "or unset (the published depth)")
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-in on the CPU (tests the harness)")
    parser.add_argument("--num-classes", type=int, default=37)
    parser.add_argument("--images-per-class", type=int, default=8, help="half train, half eval")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter over the rehearsal's (e.g. finetune.max_steps=5)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    return parser.parse_args(argv)


def resolve_layers(args: argparse.Namespace, run_dir: Path) -> None:
    from components import random_model

    if args.tiny:
        args.layers = None
    elif args.layers == "auto":
        run_dir.mkdir(parents=True, exist_ok=True)
        args.layers = plan_layers(args.variant, shutil.disk_usage(run_dir).free)
    elif args.layers is None:
        text = random_model.load_variants()["variants"][args.variant]["text"]
        args.layers = len(text["layer_types_unit"]) * text["layer_types_repeat"]
    else:
        args.layers = int(args.layers)


def run(args: argparse.Namespace) -> dict:
    import platform

    run_dir = Path(args.run_dir).resolve()
    resolve_layers(args, run_dir)
    weights, pets, model_info = build_inputs(args, run_dir)
    parameters = merge_parameters(TINY_PARAMETERS if args.tiny else REAL_SIZE_PARAMETERS, GATE_OPEN)
    flags = ["--run-dir", str(run_dir), "--weights-source", weights, "--dataset-source", pets]
    for name, value in parameters.items():  # a step's dict as one STEP.KEY=VALUE per key
        items = value.items() if isinstance(value, dict) else [(None, value)]
        flags += [a for key, v in items for a in ("--param", f"{name}{'.' + key if key else ''}={v}")]
    for item in args.param:
        flags += ["--param", item]
    (run_dir / "kfp").mkdir(parents=True, exist_ok=True)
    sampler = StepSampler(run_dir / "kfp", args.interval)
    sampler.start()
    try:
        summary = local_run.run(local_run.parse_args(flags))
    finally:
        sampler.stop.set()
        sampler.join()
    import yaml

    records = json.loads((run_dir / local_run.RECORDS_FILE).read_text())
    spec = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    started = {task: step["first"] for task, step in sampler.steps.items()}
    steps = step_rows(spec, records, sampler.results(), started)
    result = {"model": model_info, "status": summary["status"], "error": summary["error"],
              "wall_seconds": summary["wall_seconds"], "machine": platform.node(), "parameters": summary["parameters"],
              "metrics": {k: summary[k] for k in ("baseline", "tuned", "merged", "gate")}, "steps": steps}
    (run_dir / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "rehearsal.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(markdown(result))
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
