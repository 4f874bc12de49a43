"""Run the whole pipeline locally with kfp.local, on the embedded demo defaults or your inputs.

    python -m pipelines.local_run --run-dir demo-run                 # tiny model + synthetic pets
    python -m pipelines.local_run --run-dir runs/x --weights-source DIR --dataset-source DIR \\
        [--margin 0.02] [--param finetune.epochs=1 --param evaluate.limit=64 ...]

The same KFP component definitions as on Vertex run under kfp.local's SubprocessRunner in this
venv (no container, no pip installs). kfp 2.17.3's local orchestrator executes dsl.If: when the
gate says no, merge-export and evaluate-merged simply do not run. It runs tasks one at a time in
dependency order, so "baseline evaluation and fine-tuning in parallel" is sequential here; it
ignores accelerator/CPU/memory limits (Vertex settings) but honours retry policies with their
backoff, so the local compile uses --finetune-retries 0 by default (a local failure is fixed by
hand, not by waiting 60 s + 120 s for the same error).

Without --weights-source/--dataset-source it first builds the offline stand-ins in
``RUN_DIR/inputs`` (reused by later runs): the tiny random-init Gemma 4 and a synthetic
Oxford-IIIT-Pet-like set. Writes into RUN_DIR:

* ``pipeline.yaml``  the compiled spec that ran (local image, cpu-smoke resources);
* ``kfp/<pipeline>-<time>/<task>/...``  kfp.local's task folders: artifacts + executor_output.json;
* ``tasks.json``     per task: state, output artifacts (uri, type, metadata), output parameters;
* ``summary.json``   baseline / tuned / merged metrics, the gate decision, paths, lineage.

Prints a baseline-vs-tuned table. Exit status 1 if a task failed (summary.json says which), 2
on bad input (one ``error: ...`` line, before anything runs).
Steps run as subprocesses, so this module never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from components.artifacts import EVAL_METRICS
from components.cli import entrypoint, hub_id
from components.files import is_complete, read_json, write_json_atomic
from components.tiny_model import CPU_DEMO_FINETUNE  # a dict; the module imports no torch
from pipelines import options as pipeline_options
from pipelines import pipeline as dag
from pipelines.submit import SubmitError, check_parameters, load_parameters, merge_parameters

# Embedded demo defaults: the tiny model's CPU recipe (components.tiny_model.CPU_DEMO_FINETUNE:
# chance -> >= 90% on 8 synthetic classes in about a minute of CPU), 8 classes of 40 images at
# 64 px (the size the tiny model's vision path reads), half train half eval.
DEMO_NUM_CLASSES = 8
DEMO_IMAGES_PER_CLASS = 40
DEMO_IMAGE_SIZE = 64  # px
DEMO_PARAMETERS: dict[str, Any] = {
    "quantization": "none",  # NF4 needs CUDA; the demo runs on CPU
    "finetune": {**CPU_DEMO_FINETUNE,
                 "max_length": 512,  # tokens; the tiny model's prompts are ~100
                 "save_every_steps": 40},
    "evaluate": {"batch_size": 16},
    # The demo computes in fp32 on CPU; an fp32 export is verified against it at the step's fp32
    # bound (1e-3). A bf16 export of the tiny model, whose trained logits reach the +-30 softcap,
    # measured max |logit diff| 0.62-0.82 against the step's 0.5 bf16-export bound.
    "merge_export": {"save_dtype": "float32"},
}
CACHE_DIR = "kfp-cache"
REGISTRY_DIR = "registry"
RECORDS_FILE = "tasks.json"
SUMMARY_FILE = "summary.json"
METRIC_KEYS = ("accuracy", "macro_f1", "unknown_rate", "num_examples")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="folder for this run's outputs")
    parser.add_argument("--weights-source", default=None,
                        help="model to fine-tune (folder, gs:// or HF repo id; default: the tiny "
                             "stand-in built under RUN_DIR/inputs)")
    parser.add_argument("--dataset-source", default=None,
                        help="dataset (default: synthetic pets built under RUN_DIR/inputs)")
    parser.add_argument("--num-classes", type=int, default=DEMO_NUM_CLASSES,
                        help="classes of the synthetic set (only without --dataset-source)")
    parser.add_argument("--images-per-class", type=int, default=DEMO_IMAGES_PER_CLASS,
                        help="images per synthetic class, half train half eval "
                             "(only without --dataset-source)")
    parser.add_argument("--margin", type=float, default=None,
                        help="gate.margin: tuned accuracy must beat baseline by more than 0 and at least "
                             "this (default: the pipeline's); negative: accept a regression down "
                             "to it (wiring smoke tests)")
    parser.add_argument("--parameters", default=None,
                        help="JSON/YAML file of pipeline parameter values")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="one pipeline parameter (YAML scalar), or one key of a step's dict "
                             "as STEP.KEY=VALUE (finetune.epochs=1); overrides the demo defaults")
    parser.add_argument("--registry", default=None,
                        help=f"model registry: a folder (default RUN_DIR/{REGISTRY_DIR}: later "
                             "runs in RUN_DIR find its champion), projects/P/locations/L/models/ID "
                             "for Vertex AI Model Registry, or '' for none")
    parser.add_argument("--no-cache", action="store_true",
                        help="run every task (default: kfp.local's task cache in RUN_DIR/"
                             f"{CACHE_DIR}, keyed like Vertex's on the component and its inputs)")
    parser.add_argument("--finetune-retries", type=int, default=0,
                        help="retries of the fine-tune task (kfp.local honours them, with the "
                             "compiled 60 s doubling backoff); default 0")
    return parser.parse_args(argv)


def _python_module(*args: str) -> None:
    """Run ``python -m components <command>`` (a subprocess: keeps torch out of this process)."""
    subprocess.run([sys.executable, "-m", "components", *args], check=True)


def demo_inputs(run_dir: Path, num_classes: int, images_per_class: int) -> tuple[str, str]:
    """Build (or reuse) the tiny model and the synthetic set; their steps mark a folder complete
    last (files.atomic_dir), so one without the mark was cut off and is rebuilt. The synthetic
    set keeps one folder: asking for more images per class rewrites it in place (new files
    appear), as new images would land in a bucket prefix a scheduled run reads."""
    inputs = run_dir / "inputs"
    model = inputs / "tiny-gemma4"
    if not is_complete(model):
        print(f"building the tiny stand-in model in {model}", flush=True)
        _python_module("tiny-model", "--output-dir", str(model))
    pets, recipe_file = inputs / "synthetic-pets", inputs / "synthetic-pets.json"
    recipe = {"num_classes": num_classes, "images_per_class": images_per_class,
              "image_size": DEMO_IMAGE_SIZE}
    if not (is_complete(pets) and recipe_file.is_file() and read_json(recipe_file) == recipe):
        print(f"generating {num_classes} synthetic pet classes x {images_per_class} images in "
              f"{pets}", flush=True)
        _python_module("synthetic-pets", "--output-dir", str(pets), "--num-classes",
                       str(num_classes), "--images-per-class", str(images_per_class),
                       "--image-size", str(DEMO_IMAGE_SIZE), "--overwrite")
        write_json_atomic(recipe_file, recipe)
    return str(model.resolve()), str(pets.resolve())


def arguments_for(args: argparse.Namespace, spec: dict[str, Any], given: dict[str, Any], weights: str,
                  dataset: str) -> dict[str, Any]:
    """The run's arguments: the demo defaults, then ``given`` (--parameters, --param), then the flags."""
    registry = (str(Path(args.run_dir).resolve() / REGISTRY_DIR) if args.registry is None
                else args.registry)
    values = merge_parameters(DEMO_PARAMETERS, {"registry": registry}, given,
                              {} if args.margin is None else {"gate.margin": args.margin},
                              {"weights_source": weights, "dataset_source": dataset})
    return check_parameters(values, spec)


def task_layout(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """display name -> task key, component name and output artifact types, nested DAGs too."""
    layout: dict[str, dict[str, Any]] = {}

    def walk(dag_spec: dict[str, Any]) -> None:
        for key, task in dag_spec["tasks"].items():
            component_name = task["componentRef"]["name"]
            component = spec["components"][component_name]
            if "dag" in component:
                walk(component["dag"])
                continue
            outputs = component.get("outputDefinitions", {}).get("artifacts", {})
            layout[task["taskInfo"]["name"]] = {
                "task": key, "component": component_name,
                "artifact_types": {n: o["artifactType"]["schemaTitle"] for n, o in outputs.items()}}

    walk(spec["root"]["dag"])
    return layout


class CacheHits(logging.Filter):
    """Task key -> cache key prefix of the tasks kfp.local served from its cache this run.

    kfp.local (2.17.3, orchestrator/task_executor.py) logs "Task T cache hit (key=K...)" on the
    root logger and writes no task folder; a filter on the root logger sees the record even
    though kfp.local swaps the root logger's handlers while it runs."""

    PATTERN = re.compile(r"Task '?([\w.-]+)'? cache hit \(key=([0-9a-f]+)")

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if match := self.PATTERN.search(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())):
            self.hits[match.group(1)] = match.group(2)
        return True


def _cached_outputs(cache_root: Path, key_prefix: str) -> dict[str, Any]:
    """The outputs a cache entry recorded: {name: artifact dict or parameter value}."""
    (entry,) = cache_root.glob(f"{key_prefix}*.json")
    return json.loads(entry.read_text())


def collect_records(spec: dict[str, Any], kfp_run_dir: Path, cache_hits: dict[str, str] | None = None,
                    cache_root: Path | None = None) -> dict[str, dict[str, Any]]:
    """What each task produced, read back from kfp.local's executor_output.json files, or for a
    task served from the cache (state CACHED), from the cache entry it was served from.

    kfp.local puts a task's folder at <run>/<component name without "comp-">. No folder: the task
    did not run (the gate held it back, or an upstream task failed). A folder without executor
    output: it started and failed.
    """
    records = {}
    for name, info in task_layout(spec).items():
        if info["task"] in (cache_hits or {}):
            produced = _cached_outputs(cache_root, cache_hits[info["task"]])
            records[name] = {"task": info["task"], "state": "CACHED", "outputs": {
                k: {"uri": v["uri"], "metadata": v.get("metadata", {}),
                    "schema_title": v.get("schema_title", "")}
                for k, v in produced.items() if isinstance(v, dict) and "uri" in v},
                "parameters": {k: v for k, v in produced.items()
                               if not (isinstance(v, dict) and "uri" in v)}}
            continue
        task_root = kfp_run_dir / info["component"].removeprefix("comp-")
        output_file = task_root / "executor_output.json"
        record: dict[str, Any] = {"task": info["task"],
                                  "state": "FAILED" if task_root.is_dir() else "NOT_RUN",
                                  "outputs": {}, "parameters": {}}
        if output_file.is_file():
            produced = json.loads(output_file.read_text())
            record["state"] = "SUCCEEDED"
            record["parameters"] = produced.get("parameterValues", {})
            for artifact_name, listing in produced.get("artifacts", {}).items():
                (artifact,) = listing["artifacts"]
                record["outputs"][artifact_name] = {
                    "uri": artifact["uri"], "metadata": artifact.get("metadata", {}),
                    "schema_title": info["artifact_types"].get(artifact_name, "")}
        records[name] = record
    return records


def _metrics(records: dict[str, Any], task: str) -> dict[str, Any] | None:
    record = records.get(task, {})
    evaluation = record.get("outputs", {}).get("evaluation")
    if not evaluation:
        return None
    metrics_file = Path(evaluation["uri"]) / EVAL_METRICS
    if not metrics_file.is_file():  # evaluate-champion without a champion
        return None
    values = json.loads(metrics_file.read_text())
    return {**{k: values.get(k) for k in METRIC_KEYS}, "evaluation_dir": evaluation["uri"]}


def _uri(records: dict[str, Any], task: str, output: str) -> str | None:
    return records.get(task, {}).get("outputs", {}).get(output, {}).get("uri")


def _gate(records: dict[str, Any], task: str) -> dict[str, Any]:
    """A gate task's decision (its report's gate_* metadata) and its bool output; passed None:
    the gate did not run."""
    record = records.get(task, {})
    report = record.get("outputs", {}).get("report", {})
    decision = {k.removeprefix("gate_"): v for k, v in report.get("metadata", {}).items()
                if k.startswith("gate_")}
    return {"passed": record.get("parameters", {}).get("Output"),
            "status": report.get("metadata", {}).get("export_status"),
            "failed": decision.get("failed", []), "margin": decision.get("margin"),
            "accuracy_delta": decision.get("accuracy_delta"), "report": report.get("uri")}


def summarize(records: dict[str, Any], arguments: dict[str, Any], build: dict[str, str],
              run_dir: Path, kfp_run_dir: Path, wall_s: float, error: str | None) -> dict:
    gate, export_gate = _gate(records, dag.GATE), _gate(records, dag.ACCEPT_EXPORT)
    export_uri = _uri(records, dag.MERGE_EXPORT, "export")
    lineage_source = (records.get(dag.MERGE_EXPORT, {}).get("outputs", {}).get("export")
                      or records.get(dag.FINETUNE, {}).get("outputs", {}).get("adapter") or {})
    return {
        "status": "failed" if error else "succeeded",
        "error": error,
        "run_dir": str(run_dir),
        "pipeline_yaml": str(run_dir / "pipeline.yaml"),
        "kfp_run_dir": str(kfp_run_dir) if kfp_run_dir else None,
        "wall_seconds": round(wall_s, 1),
        "parameters": arguments,
        "build": build,
        "baseline": _metrics(records, dag.EVALUATE_BASELINE),
        "tuned": _metrics(records, dag.EVALUATE_TUNED),
        "merged": _metrics(records, dag.EVALUATE_MERGED),
        "gate": gate,
        "export_gate": export_gate,
        "export": {"path": export_uri,
                   "held_back": gate["passed"] is False or export_gate["passed"] is False,
                   "accepted": export_gate["passed"] is True},
        "artifacts": {"weights": _uri(records, dag.STAGE_WEIGHTS, "weights"),
                      "dataset": _uri(records, dag.PREPARE_DATASET, "dataset"),
                      "adapter": _uri(records, dag.FINETUNE, "adapter")},
        "lineage": lineage_source.get("metadata", {}),
        "champion": _champion(records),
        "tasks": {name: r["state"] for name, r in records.items()},
        "cached": [name for name, r in records.items() if r["state"] == "CACHED"],
    }


def _champion(records: dict[str, Any]) -> dict[str, Any]:
    """The champion before this run (re-evaluated here), and whether this run replaced it."""
    before = records.get(dag.EVALUATE_CHAMPION, {}).get("outputs", {}).get("evaluation", {})
    registration = records.get(dag.REGISTER, {}).get("outputs", {}).get("registration", {})
    registered = registration.get("metadata", {})
    return {"before": (before.get("metadata", {}).get("champion_version") or None),
            "metrics": _metrics(records, dag.EVALUATE_CHAMPION),
            "changed": bool(registered.get("registered")),
            "after": registered.get("version") if registered.get("registered") else None,
            "registration": registered or None}


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'':10}{'accuracy':>10}{'macro_f1':>10}{'unknown':>10}{'examples':>10}"]
    rows = {"baseline": summary.get("baseline"), "tuned": summary.get("tuned"),
            "merged": summary.get("merged"), "champion": summary["champion"]["metrics"]}
    for row, m in rows.items():
        if m is None:
            lines.append(f"{row:10}{'-':>10}{'-':>10}{'-':>10}{'-':>10}")
            continue
        lines.append(f"{row:10}{m['accuracy']:>10.3f}{m['macro_f1']:>10.3f}"
                     f"{m['unknown_rate']:>10.3f}{m['num_examples']:>10}")
    gate, export_gate = summary["gate"], summary["export_gate"]
    if gate["passed"] is None:
        lines.append("gate: not reached")
    else:
        verdict = "passed" if gate["passed"] else f"held the export back ({', '.join(gate['failed'])})"
        lines.append(f"gate: {verdict} (tuned - baseline = {gate['accuracy_delta']:+.3f}, "
                     f"margin {gate['margin']:+.3f})")
    if export_gate["passed"] is not None:
        verdict = ("accepted" if export_gate["passed"] else
                   f"{export_gate['status'].replace('_', ' ')} ({', '.join(export_gate['failed'])}),"
                   " not handed on")
        lines.append(f"export as served: {verdict}")
    lines.append(f"export: {summary['export']['path'] or 'none'}")
    champion = summary["champion"]
    if champion["changed"]:
        lines.append(f"champion: changed, {champion['before'] or 'none'} -> version "
                     f"{champion['after']} ({summary['merged']['accuracy']:.3f})")
    elif champion["registration"]:  # accepted, but no registry to put it in
        lines.append(f"champion: unchanged ({champion['registration'].get('reason')})")
    else:
        lines.append(f"champion: unchanged ({champion['before'] or 'none'}; the challenger was "
                     "held back)")
    lines.append(f"cached: {', '.join(summary['cached']) or 'none'}")
    return "\n".join(lines)


def check_flags(args: argparse.Namespace) -> None:
    """The flags' own checks (the parameters are checked against the compiled spec)."""
    for flag, value, least in (("--num-classes", args.num_classes, 2),  # 1 class: a trivial 100%
                               ("--images-per-class", args.images_per_class, 2)):  # train + eval
        if value < least:
            raise SubmitError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--weights-source", args.weights_source),
                        ("--dataset-source", args.dataset_source)):
        # a local path must exist; gs:// and owner/name Hugging Face ids are the steps' to check
        if value and "://" not in value and hub_id(value) is None and not Path(value).expanduser().exists():
            raise SubmitError(f"{flag} {value}: no such file or folder (a Hugging Face id has the "
                              "form owner/name)")
    if args.margin is not None and not -1.0 <= args.margin <= 1.0:
        raise SubmitError(f"--margin {args.margin}: an accuracy difference, must lie in [-1, 1]")


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.run_dir).resolve()
    check_flags(args)
    # compile first: it is what ran, and parameters are checked against it before any work
    options = pipeline_options.compile_options(image=pipeline_options.LOCAL_IMAGE,
                                               preset="cpu-smoke",
                                               finetune_retries=args.finetune_retries)
    pipeline_func = dag.build_pipeline(options)
    run_dir.mkdir(parents=True, exist_ok=True)
    from kfp import compiler, local

    compiler.Compiler().compile(pipeline_func, str(run_dir / "pipeline.yaml"))
    spec = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    given = load_parameters(args.parameters, args.param)
    # before the demo inputs are written; checked again below with the real sources and flags
    check_parameters(merge_parameters(DEMO_PARAMETERS, given, {"weights_source": "x", "dataset_source": "x"}), spec)

    def absolute(source: str | None) -> str | None:
        # tasks may run from another working directory: pass local paths absolute
        if source and "://" not in source and Path(source).expanduser().exists():
            return str(Path(source).expanduser().resolve())
        return source

    weights, dataset = absolute(args.weights_source), absolute(args.dataset_source)
    if not (weights and dataset):
        demo_weights, demo_dataset = demo_inputs(run_dir, args.num_classes, args.images_per_class)
        weights, dataset = weights or demo_weights, dataset or demo_dataset
    arguments = arguments_for(args, spec, given, weights, dataset)

    kfp_root = run_dir / "kfp"
    kfp_root.mkdir(exist_ok=True)
    before = set(kfp_root.iterdir())
    cache_root = run_dir / CACHE_DIR
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root),
               raise_on_error=True, enable_caching=not args.no_cache, cache_root=str(cache_root))
    started, error, hits = time.monotonic(), None, CacheHits()
    root_logger = logging.getLogger()
    # kfp.local logs cache hits at INFO outside its own logging context: without INFO on the
    # root logger the record is never made (no handler prints it; the filter only reads it)
    level = root_logger.level
    root_logger.setLevel(logging.INFO)
    root_logger.addFilter(hits)
    try:
        pipeline_func(**arguments)
    except RuntimeError as err:  # kfp.local: "Pipeline ... finished with status FAILURE ..."
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # drop kfp.local's terminal colours
    finally:
        root_logger.removeFilter(hits)
        root_logger.setLevel(level)
    wall_s = time.monotonic() - started
    # the run's folder; kfp_root/checkpoints (finetune's, keyed by the run) is not one
    created = sorted(p for p in set(kfp_root.iterdir()) - before
                     if p.is_dir() and p.name.startswith(pipeline_options.PIPELINE_NAME))
    kfp_run_dir = created[-1] if created else None
    records = collect_records(spec, kfp_run_dir, hits.hits, cache_root) if kfp_run_dir else {}
    write_json_atomic(run_dir / RECORDS_FILE, records)
    summary = summarize(records, arguments, options.build, run_dir, kfp_run_dir, wall_s, error)
    write_json_atomic(run_dir / SUMMARY_FILE, summary)
    return summary


def _main(argv: list[str] | None = None) -> int:
    summary = run(parse_args(argv))
    print()
    print(format_table(summary))
    print(f"summary: {Path(summary['run_dir']) / SUMMARY_FILE}")
    if summary["status"] != "succeeded":
        print(f"pipeline failed: {summary['error']}", file=sys.stderr)
        return 1
    return 0


main = entrypoint(_main, user_errors=(SubmitError,))


if __name__ == "__main__":
    sys.exit(main())
