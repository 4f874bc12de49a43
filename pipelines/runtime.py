"""Code the KFP components run inside their task, next to the step they call.

Kept out of the component bodies so each body stays a few lines of wiring, and so it can be
tested without KFP: lineage records read from the step outputs' manifests, metric publishing in
the shapes Vertex AI renders, the accuracy gate and its HTML report, and fetching the Hugging Face
token from Secret Manager on Vertex. Standard library plus ``components.files``; no torch.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Mapping

from components.artifacts import read as read_artifact
from components.artifacts import (DATASET_MANIFEST, EVAL_METRICS, EXPORT_METADATA, NO_CHAMPION,
                                  REGISTRATION, TRAIN_METRICS, WEIGHTS_MANIFEST, fmt, LineageError)
from components.files import read_json, sha256_file, write_bytes_atomic

HF_TOKEN_ENV = "HF_TOKEN"
SECRET_MANAGER_URL = "https://secretmanager.googleapis.com/v1"

UNKNOWN_CLASS = "Unknown"  # the extra predicted column of generate-mode confusion matrices
LINEAGE_KEYS = ("base_model_id", "base_model_revision", "weights_manifest_sha256",
                "dataset_manifest_sha256", "dataset_source", "dataset_revision", "num_classes",
                "hyperparameters", "project_version", "git_commit", "image")


def _pick(record: Mapping[str, Any], keys: tuple[str, ...], path: Path) -> Any:
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    raise LineageError(f"{path}: none of the keys {list(keys)} is set")


def weights_lineage(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Which base weights a model folder holds: staged weights (weights_manifest.json) or a merged
    export (export_metadata.json's ``base_model``, which carries the base's identity forward)."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / WEIGHTS_MANIFEST
    if manifest_path.is_file():
        manifest, path = read_json(manifest_path), manifest_path
    else:
        path = model_dir / EXPORT_METADATA
        export = read_artifact(path, f"model folder {model_dir} (neither {WEIGHTS_MANIFEST} nor "
                                f"{EXPORT_METADATA})")
        manifest = export.get("base_model") or {}
    return {"base_model_id": _pick(manifest, ("source",), path),
            "base_model_revision": str(manifest.get("revision") or ""),
            "weights_manifest_sha256": _pick(manifest, ("manifest_sha256",), path)}


def dataset_lineage(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The prepared dataset's identity: the hash of its manifest (which lists every shard's hash)."""
    manifest_path = Path(dataset_dir) / DATASET_MANIFEST
    manifest = read_artifact(manifest_path, "prepared dataset")
    source = manifest.get("source", "")
    if not isinstance(source, dict):  # prepare-dataset records {source, format, revision, ...}
        source = {"source": source}
    return {"dataset_manifest_sha256": sha256_file(manifest_path),
            "dataset_source": str(source.get("source") or ""),
            "dataset_revision": str(source.get("revision") or ""),
            "num_classes": len(manifest.get("class_names", []))}


def hyperparameters_lineage(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The fine-tune's hyperparameters as the fine-tune step recorded them."""
    path = Path(adapter_dir) / TRAIN_METRICS
    return {"hyperparameters": dict(_pick(read_artifact(path, "adapter"), ("hyperparameters",), path))}


def export_lineage(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Lineage a merged export carries itself (export_metadata.json): dataset and hyperparameters."""
    path = Path(export_dir) / EXPORT_METADATA
    export = read_artifact(path, "merged export")
    out: dict[str, Any] = {}
    if (export.get("dataset") or {}).get("manifest_sha256"):
        out["dataset_manifest_sha256"] = export["dataset"]["manifest_sha256"]
    hyper = export.get("hyperparameters") or {}
    if hyper.get("finetune"):  # the fine-tune's own record, as hyperparameters_lineage reads it
        out["hyperparameters"] = dict(hyper["finetune"])
    return out


def lineage(build: Mapping[str, str], model_dir: str | None = None,
            dataset_dir: str | None = None, adapter_dir: str | None = None) -> dict[str, Any]:
    """The lineage record put on an artifact, from the folders the task read or wrote."""
    record: dict[str, Any] = {}
    if model_dir is not None:
        record.update(weights_lineage(model_dir))
        if (Path(model_dir) / EXPORT_METADATA).is_file():
            record.update(export_lineage(model_dir))
    if dataset_dir is not None:
        record.update(dataset_lineage(dataset_dir))
    if adapter_dir is not None:
        record.update(hyperparameters_lineage(adapter_dir))
    for key in ("project_version", "git_commit", "image"):
        record[key] = str(build.get(key, ""))
    return record


def annotate(artifacts: list[Any], record: Mapping[str, Any]) -> None:
    """Copy a lineage record onto each KFP artifact's metadata (what Vertex ML Metadata keeps)."""
    for artifact in artifacts:
        artifact.metadata.update(record)


def load_metrics(evaluation_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(evaluation_dir) / EVAL_METRICS
    metrics = read_artifact(path, "evaluation")
    for key in ("accuracy", "macro_f1", "unknown_rate", "class_names", "confusion_matrix"):
        if key not in metrics:
            raise LineageError(f"{path}: key {key!r} is missing")
    return metrics


def square_confusion(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[int]]]:
    """(categories, matrix) in the square shape ClassificationMetrics needs.

    Generate-mode matrices have one more predicted column ("Unknown": the answer named no class)
    than true rows; an all-zero "Unknown" true row makes the matrix square without changing a count.
    """
    names = list(metrics["class_names"])
    matrix = [[int(v) for v in row] for row in metrics["confusion_matrix"]]
    if len(matrix) != len(names):
        raise LineageError(f"confusion_matrix has {len(matrix)} rows for {len(names)} classes")
    widths = {len(row) for row in matrix}
    if widths == {len(names)}:
        return names, matrix
    if widths == {len(names) + 1}:
        return names + [UNKNOWN_CLASS], matrix + [[0] * (len(names) + 1)]
    raise LineageError(f"confusion_matrix rows have widths {sorted(widths)} for "
                       f"{len(names)} classes (expected {len(names)} or {len(names) + 1})")


def write_metadata_file(artifacts: list[Any]) -> None:
    """Write each metrics artifact's metadata as a file at its path too. KFP keeps logged metrics
    in metadata only, and kfp.local's task cache (2.17.3, cache.py) treats an entry whose
    artifact has no file as a miss, so a task with a Metrics output would never be served from
    it. On Vertex the file is a harmless copy next to the metadata."""
    for artifact in artifacts:
        write_bytes_atomic(artifact.path, json.dumps(artifact.metadata, sort_keys=True).encode())


def publish_evaluation(evaluation_dir: str, metrics_artifact: Any,
                       confusion_artifact: Any) -> dict[str, Any]:
    """Log the evaluation's scalars and confusion matrix on the KFP artifacts Vertex renders."""
    metrics = load_metrics(evaluation_dir)
    for key in ("accuracy", "macro_f1", "unknown_rate", "top5_accuracy"):
        if metrics.get(key) is not None:
            metrics_artifact.log_metric(key, float(metrics[key]))
    if metrics.get("num_examples") is not None:
        metrics_artifact.log_metric("num_examples", float(metrics["num_examples"]))
    categories, matrix = square_confusion(metrics)
    confusion_artifact.log_confusion_matrix(categories, matrix)
    return metrics


# Columns of the gate reports: role -> heading (how each model was evaluated).
REPORT_COLUMNS = {"baseline": "baseline (untuned)", "tuned": "tuned (as trained)",
                  "merged": "merged (as served)", "champion": "champion (as served)"}


def _eval_setting(metrics: Mapping[str, Any]) -> str:
    """How a model was evaluated: quantisation and dtype, as the evaluate step recorded them."""
    return " ".join(str(metrics[k]) for k in ("quantization", "dtype") if metrics.get(k))


def confusion_svg(metrics: Mapping[str, Any], title: str) -> str:
    """The evaluation's confusion matrix as an SVG heatmap (generate mode: an Unknown column)."""
    from pipelines import charts

    names = list(metrics["class_names"])
    matrix = metrics["confusion_matrix"]
    extra = [UNKNOWN_CLASS] if matrix and len(matrix[0]) == len(names) + 1 else []
    return charts.heatmap(names, matrix, title, predicted_names=names + extra)


def publish_training_curve(adapter_dir: str, curve_artifact: Any, series_artifact: Any) -> dict:
    """The fine-tune's logged steps (train_metrics.json ``log``: loss per answer token and the
    learning rate every --log-every-steps steps) as a JSON series and an HTML page with the
    curves drawn, which the Vertex UI renders."""
    from pipelines import charts

    log = read_artifact(Path(adapter_dir) / TRAIN_METRICS, "adapter").get("log") or []
    series = {"step": [int(e["step"]) for e in log], "loss": [float(e["loss"]) for e in log],
              "learning_rate": [float(e["lr"]) for e in log]}
    write_bytes_atomic(series_artifact.path, json.dumps(series, indent=1).encode())
    charts_html = "<p>no step was logged</p>" if not log else (
        charts.line_chart(series["step"], series["loss"], "training loss (per answer token)", "loss")
        + "<br>" + charts.line_chart(series["step"], series["learning_rate"], "learning rate", "lr"))
    write_bytes_atomic(curve_artifact.path, (
        '<!doctype html><html><head><meta charset="utf-8"><title>Training curve</title></head>'
        f'<body style="font-family:sans-serif"><h2>Fine-tune: {len(log)} logged steps</h2>'
        f"{charts_html}</body></html>\n").encode())
    return series


def render_report(evaluations: Mapping[str, Mapping[str, Any]], decision: Mapping[str, Any],
                  lineage_record: Mapping[str, Any], title: str) -> str:
    """An HTML page: the evaluated models side by side, overall and per class, every check of the
    decision with its numbers, the lineage."""
    roles = [r for r in REPORT_COLUMNS if r in evaluations]
    head = "".join(f"<th>{REPORT_COLUMNS[r]}</th>" for r in roles)
    rows = [f"<tr><th>evaluated as</th>{''.join(f'<td>{html.escape(_eval_setting(evaluations[r]))}</td>' for r in roles)}</tr>"]
    for key in ("accuracy", "macro_f1", "unknown_rate", "num_examples"):
        rows.append(f"<tr><th>{key}</th>"
                    + "".join(f"<td>{fmt(evaluations[r].get(key), '.3f', '')}</td>" for r in roles) + "</tr>")
    per_class = []
    names = next((list(evaluations[r].get("class_names", [])) for r in reversed(roles)), [])
    for name in names:
        cells = "".join(f"<td>{fmt(evaluations[r].get('per_class', {}).get(name, {}).get('f1'), '.3f', '')}</td>"
                        for r in roles)
        per_class.append(f"<tr><th>{html.escape(str(name))}</th>{cells}</tr>")
    checks = "".join(f"<tr><th>{html.escape(c['check'])}</th><td>{'pass' if c['passed'] else 'FAIL'}</td>"
                     f"<td>{html.escape(c['detail'])}</td></tr>" for c in decision["checks"])
    verdict = "PASSED" if decision["passed"] else "HELD BACK (" + ", ".join(decision["failed"]) + ")"
    lineage_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v, sort_keys=True))}</td></tr>"
        for k, v in sorted(lineage_record.items()))
    challenger = "merged" if "merged" in evaluations else "tuned"
    picture = confusion_svg(evaluations[challenger], f"Confusion matrix, {REPORT_COLUMNS[challenger]}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>
<h2>{html.escape(title)}: {html.escape(verdict)}</h2>
<table><tr><th>check</th><th></th><th>numbers</th></tr>{checks}</table>
<table><tr><th></th>{head}</tr>{''.join(rows)}</table>
{picture}
<h3>Per-class F1</h3>
<table><tr><th>class</th>{head}</tr>{''.join(per_class)}</table>
<h3>Lineage</h3><table>{lineage_rows}</table>
</body></html>
"""


def gate(evaluation_dirs: Mapping[str, str | None], thresholds: Any, report_artifact: Any,
         build: Mapping[str, str], lineage_record: Mapping[str, Any], title: str) -> bool:
    """Decide (components.gate.decide) on the evaluations given by role (baseline, tuned[, merged
    [, champion]]; None: absent), write the HTML report and put the decision on its metadata."""
    from components import gate as rule

    evaluations = {role: load_metrics(path) for role, path in evaluation_dirs.items()
                   if path and not (Path(path) / NO_CHAMPION).is_file()}
    accuracy = {role: float(m["accuracy"]) for role, m in evaluations.items()}
    decision = rule.decide(accuracy["baseline"], accuracy["tuned"], thresholds,
                           merged=accuracy.get("merged"), champion=accuracy.get("champion"))
    record = {**lineage_record, **{k: str(build.get(k, "")) for k in ("project_version",
                                                                      "git_commit", "image")}}
    write_bytes_atomic(report_artifact.path,
                       render_report(evaluations, decision, record, title).encode())
    report_artifact.metadata.update(record)
    report_artifact.metadata.update(
        {f"gate_{k}": v for k, v in decision.items() if k != "checks" and v is not None})
    return bool(decision["passed"])


def export_status(decision: Mapping[str, Any]) -> str:
    """accepted; failed (the export does not score like the model that was evaluated: a broken
    merge or export); held_back (it does, but does not beat the base or the champion)."""
    if decision["passed"]:
        return "accepted"
    return "failed" if "export_matches_tuned" in decision["failed"] else "held_back"


def readable_path(uri: str) -> str:
    """A registry's artifact URI as a path a task can read (gs:// through Vertex's FUSE mount)."""
    from components import gcs

    return gcs.fuse_path(uri) if gcs.is_gcs(uri) else uri


def record_no_champion(evaluation_dir: str, registry: str) -> None:
    reason = "no registry configured" if not registry else f"{registry} has no champion yet"
    write_bytes_atomic(Path(evaluation_dir) / NO_CHAMPION,
                       json.dumps({"champion": None, "reason": reason}).encode())


def register(registry_name: str, serving_image: str, export: Any, merged_dir: str,
             record: Mapping[str, Any], registration: Any) -> dict[str, Any]:
    """Upload the accepted export as the registry's new champion (components.registry); write
    what happened to the registration artifact (its file and metadata)."""
    from components import registry as reg

    registry = reg.open_registry(registry_name, serving_image)
    if registry is None:
        outcome = {"registered": False, "reason": "no registry configured (parameter registry)"}
    else:
        metrics = {k: float(v) for k, v in load_metrics(merged_dir).items()
                   if k in ("accuracy", "macro_f1", "unknown_rate", "top5_accuracy") and v is not None}
        # Vertex serves from the export's gs:// URI; a folder registry copies the local folder
        source = export.uri if export.uri.startswith("gs://") else export.path
        version = registry.upload(source, reg.lineage_labels(record), metrics)
        outcome = {"registered": True, "registry": registry_name, "version": version.version_id,
                   "aliases": list(version.aliases), "artifact_uri": version.artifact_uri,
                   "labels": version.labels, "metrics": version.metrics}
    write_bytes_atomic(Path(registration.path) / REGISTRATION,
                       json.dumps(outcome, indent=2, sort_keys=True).encode())
    registration.metadata.update(outcome)
    return outcome


def load_hf_token(secret_name: str, endpoint: str = SECRET_MANAGER_URL,
                  session: Any = None) -> bool:
    """Put the Hugging Face token into this task's environment from Secret Manager.

    ``secret_name`` is a resource NAME ("projects/P/secrets/S[/versions/V]"), never a token. On
    Vertex the task's service account needs roles/secretmanager.secretAccessor on it. The value
    only lives in this process's environment, where the stage step reads HF_TOKEN; it is never
    logged, returned or written. A token already in the environment wins. True if one was loaded.
    """
    if not secret_name or os.environ.get(HF_TOKEN_ENV):
        return False
    parts = secret_name.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "projects" and parts[2] == "secrets":
        parts += ["versions", "latest"]
    if len(parts) != 6 or parts[0] != "projects" or parts[2] != "secrets" or parts[4] != "versions":
        raise ValueError(f"hf_token_secret {secret_name!r}: expected "
                         "projects/PROJECT/secrets/NAME[/versions/VERSION]")
    if session is None:
        import google.auth
        from google.auth.transport.requests import AuthorizedSession

        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
        session = AuthorizedSession(credentials)
    response = session.get(f"{endpoint}/{'/'.join(parts)}:access", timeout=60)
    if response.status_code != 200:
        # the body names the missing permission; it never contains the secret
        raise PermissionError(f"Secret Manager {'/'.join(parts)}: HTTP {response.status_code} "
                              f"{response.text[:300]}")
    data = response.json().get("payload", {}).get("data", "")
    token = base64.b64decode(data).decode().strip()
    if not token:
        raise ValueError(f"Secret Manager {'/'.join(parts)}: the secret version is empty")
    os.environ[HF_TOKEN_ENV] = token
    return True
