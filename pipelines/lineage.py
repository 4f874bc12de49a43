"""Print the chain behind a pipeline's exported model: weights, data, hyperparameters, metrics, code.

    python -m pipelines.lineage RUN_DIR                       # a folder pipelines.local_run wrote
    python -m pipelines.lineage --job projects/P/locations/L/pipelineJobs/ID   # a Vertex AI run
    ... [--json]

It reads what the tasks recorded on their artifacts (artifact.metadata, i.e. Vertex ML Metadata
on Vertex, executor_output.json locally) and cross-checks it: the export must name the same
weights manifest and dataset manifest as the stage-weights and prepare-dataset artifacts of the
same run, else it fails. When the gate held the export back, the chain is the adapter's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pipelines import pipeline as dag
from components.artifacts import LineageError

RECORDS_FILE = "tasks.json"  # written by pipelines.local_run
_JOB_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/pipelineJobs/([^/]+)$")
_SUCCEEDED = {"SUCCEEDED", "CACHED"}
METRIC_KEYS = ("accuracy", "macro_f1", "unknown_rate")


def records_from_run_dir(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(run_dir) / RECORDS_FILE
    if not path.is_file():
        raise LineageError(f"{path} is missing: {run_dir} is not a folder written by "
                           "`python -m pipelines.local_run --run-dir ...` (or the run never "
                           "started)")
    return json.loads(path.read_text())


def records_from_job_dict(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Task records from a PipelineJob in its REST (JSON) shape: jobDetail.taskDetails."""
    display = {}
    spec = job.get("pipelineSpec") or {}

    def walk(dag_spec: dict[str, Any]) -> None:
        for key, task in dag_spec.get("tasks", {}).items():
            display[key] = task.get("taskInfo", {}).get("name", key)
            component = spec.get("components", {}).get(task["componentRef"]["name"], {})
            if "dag" in component:
                walk(component["dag"])

    walk(spec.get("root", {}).get("dag", {}))
    records: dict[str, dict[str, Any]] = {}
    for detail in job.get("jobDetail", {}).get("taskDetails", []):
        name = display.get(detail.get("taskName", ""), detail.get("taskName", ""))
        outputs = {}
        for output_name, listing in (detail.get("outputs") or {}).items():
            artifacts = listing.get("artifacts") or []
            if artifacts:
                outputs[output_name] = {"uri": artifacts[0].get("uri", ""),
                                        "schema_title": artifacts[0].get("schemaTitle", ""),
                                        "metadata": artifacts[0].get("metadata") or {}}
        state = detail.get("state", "")
        records[name] = {"task": detail.get("taskName", ""),
                         "state": "SUCCEEDED" if state in _SUCCEEDED else state or "NOT_RUN",
                         "outputs": outputs, "parameters": {}}
    return records


def records_from_job(resource_name: str, api_endpoint: str | None = None,
                     credentials: Any = None) -> dict[str, dict[str, Any]]:
    match = _JOB_NAME.match(resource_name)
    if not match:
        raise LineageError(f"--job {resource_name!r}: expected "
                           "projects/PROJECT/locations/REGION/pipelineJobs/ID")
    import google.auth
    from google.cloud import aiplatform
    from google.protobuf import json_format

    if credentials is None:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
    project, location, _ = match.groups()
    aiplatform.init(project=project, location=location, credentials=credentials,
                    api_endpoint=api_endpoint, api_transport="rest")
    job = aiplatform.PipelineJob.get(resource_name, project=project, location=location,
                                     credentials=credentials)
    return records_from_job_dict(json_format.MessageToDict(job.gca_resource._pb))


def _output(records: dict[str, Any], task: str, name: str) -> dict[str, Any] | None:
    record = records.get(task)
    if not record or record.get("state") not in _SUCCEEDED:
        return None
    return record.get("outputs", {}).get(name)


def _plain(value: Any) -> Any:
    """Metadata passes through protobuf Struct, which makes every number a float: 8.0 -> 8."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _decision(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """A gate's decision from its report's gate_* metadata; None if the gate did not run."""
    if not report:
        return None
    return {k.removeprefix("gate_"): v for k, v in report["metadata"].items()
            if k.startswith("gate_")}


def chain(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The lineage of the run's final model, cross-checked; raises LineageError on a mismatch."""
    weights = _output(records, dag.STAGE_WEIGHTS, "weights")
    dataset = _output(records, dag.PREPARE_DATASET, "dataset")
    if weights is None or dataset is None:
        raise LineageError("the run has no staged weights or prepared dataset: it failed "
                           "before the model could exist")
    export = _output(records, dag.MERGE_EXPORT, "export")
    adapter = _output(records, dag.FINETUNE, "adapter")
    model, kind = (export, "export") if export else (adapter, "adapter")
    if model is None:
        raise LineageError("the run produced neither an export nor an adapter")
    meta, w_meta, d_meta = model["metadata"], weights["metadata"], dataset["metadata"]
    for key, upstream, task in (("weights_manifest_sha256", w_meta, dag.STAGE_WEIGHTS),
                                ("dataset_manifest_sha256", d_meta, dag.PREPARE_DATASET)):
        if meta.get(key) != upstream.get(key):
            raise LineageError(f"{kind} records {key} {meta.get(key)!r} but the run's {task} "
                               f"artifact has {upstream.get(key)!r}: the chain is broken")

    metrics = {}
    for label, task in (("baseline", dag.EVALUATE_BASELINE), ("tuned", dag.EVALUATE_TUNED),
                        ("merged", dag.EVALUATE_MERGED)):
        found = _output(records, task, "metrics")
        metrics[label] = ({k: found["metadata"].get(k) for k in METRIC_KEYS}
                          if found else None)
    gate, export_gate = (_decision(_output(records, task, "report"))
                         for task in (dag.GATE, dag.ACCEPT_EXPORT))
    commits = sorted({r["metadata"].get("git_commit") for r in (model, weights, dataset)
                      if r["metadata"].get("git_commit")})
    return _plain({
        "model": {"kind": kind, "uri": model["uri"],
                  "held_back_by_gate": any(g and g.get("passed") is False
                                           for g in (gate, export_gate))},
        "weights": {"id": w_meta.get("base_model_id"), "revision": w_meta.get("base_model_revision"),
                    "manifest_sha256": w_meta.get("weights_manifest_sha256"),
                    "uri": weights["uri"]},
        "dataset": {"manifest_sha256": d_meta.get("dataset_manifest_sha256"),
                    "source": d_meta.get("dataset_source"),
                    "revision": d_meta.get("dataset_revision"),
                    "num_classes": d_meta.get("num_classes"), "uri": dataset["uri"]},
        "hyperparameters": meta.get("hyperparameters") or {},
        "metrics": metrics,
        "gate": gate,
        "export_gate": export_gate,
        "code": {"project_version": meta.get("project_version"),
                 "git_commit": meta.get("git_commit"), "image": meta.get("image"),
                 "commits_seen": commits},
    })


def format_chain(lineage: dict[str, Any]) -> str:
    model, weights, data, code = (lineage["model"], lineage["weights"], lineage["dataset"],
                                  lineage["code"])
    held = " (the gate held the export back)" if model["held_back_by_gate"] else ""
    lines = [f"model          {model['kind']}{held}: {model['uri']}",
             f"base weights   {weights['id']} @ revision {weights['revision'] or '-'}",
             f"               manifest sha256 {weights['manifest_sha256']}",
             f"dataset        {data['source']} @ revision {data['revision'] or '-'}, "
             f"{data['num_classes']} classes",
             f"               manifest sha256 {data['manifest_sha256']}"]
    hyper = lineage["hyperparameters"]
    # the folders are this run's artifact paths, already shown above
    shown = {k: v for k, v in sorted(hyper.items()) if k not in ("model_dir", "dataset_dir")}
    lines.append("hyperparameters " + " ".join(f"{k}={v}" for k, v in shown.items()))
    for label, values in lineage["metrics"].items():
        text = ("not run" if values is None else
                " ".join(f"{k}={values[k]:.4f}" for k in METRIC_KEYS if values.get(k) is not None))
        lines.append(f"metrics {label:8} {text}")
    gate = lineage["gate"]
    if gate:
        lines.append(f"gate           {'passed' if gate.get('passed') else 'held back'}: "
                     f"tuned - baseline = {gate.get('accuracy_delta', 0):+.4f}, "
                     f"margin {gate.get('margin', 0):+.4f}")
    export_gate = lineage.get("export_gate")
    if export_gate:
        lines.append(f"export gate    {'accepted' if export_gate.get('passed') else 'failed'}: "
                     f"merged {export_gate.get('merged_accuracy', 0):.4f} vs tuned "
                     f"{export_gate.get('tuned_accuracy', 0):.4f}, tolerance "
                     f"{export_gate.get('export_tolerance', 0):.4f}")
    lines.append(f"code           gemma-pets {code['project_version']} @ {code['git_commit']}")
    lines.append(f"image          {code['image']}")
    if len(code["commits_seen"]) > 1:
        lines.append(f"warning        artifacts of this chain come from several commits: "
                     f"{', '.join(code['commits_seen'])} (cached tasks of older code?)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a local run folder (pipelines.local_run)")
    parser.add_argument("--job", default=None,
                        help="a Vertex AI pipeline job: projects/P/locations/L/pipelineJobs/ID")
    parser.add_argument("--api-endpoint", default=None,
                        help="Vertex AI API endpoint override (http://127.0.0.1:PORT for a fake)")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    args = parser.parse_args(argv)
    if bool(args.run_dir) == bool(args.job):
        parser.error("give either RUN_DIR or --job")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = (records_from_run_dir(args.run_dir) if args.run_dir
                   else records_from_job(args.job, args.api_endpoint))
        lineage = chain(records)
    except LineageError as err:
        raise SystemExit(f"error: {err}") from err
    print(json.dumps(lineage, indent=2) if args.json else format_chain(lineage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
