"""Model registry with versions and aliases: Vertex AI Model Registry, or a folder with the same
operations and the same record (for `make demo` and kfp.local, no cloud).

A registry is named by one string (the pipeline's ``registry`` parameter):

* ``projects/P/locations/L/models/ID``: Vertex AI Model Registry. Every accepted export becomes a
  version of model ID (``Model.upload`` with ``parent_model``; the first upload creates ID),
  with the alias ``champion`` and as the default version; its labels carry the run's lineage and
  its version description the metrics. The serving container is the Model Garden vLLM image,
  which serves the export from ``$(AIP_STORAGE_URI)`` (the upload's ``artifact_uri``);
* a folder (local, or ``/gcs/...`` on Vertex): ``registry.json`` (versions with artifact URI,
  aliases, labels, metrics, time; the alias map) and ``versions/N/`` with a copy of each export.

The champion is the version holding the alias ``champion``; only the pipeline's gate moves it.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from components.artifacts import REGISTRY_RECORD
from components.files import link_or_copy, read_json, write_json_atomic

CHAMPION = "champion"
# Vertex AI Model Garden's vLLM serving image for Gemma 4 (the tag Google's Gemma 4 deployment
# scripts use); a pipeline parameter, so a dated tag can pin it.
DEFAULT_SERVING_IMAGE = ("us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/"
                         "pytorch-vllm-serve:gemma4")
# Vertex expands $(VAR) in container args; AIP_STORAGE_URI is where it copies artifact_uri.
SERVING_ARGS = ("python", "-m", "vllm.entrypoints.api_server", "--host=0.0.0.0", "--port=8080",
                "--model=$(AIP_STORAGE_URI)", "--max-model-len=8192")
VERTEX_MODEL = re.compile(r"^projects/([^/]+)/locations/([^/]+)/models/([a-z][a-z0-9_-]{0,62})$")


@dataclasses.dataclass(frozen=True)
class Version:
    version_id: str
    artifact_uri: str
    aliases: tuple[str, ...]
    labels: dict[str, str]
    metrics: dict[str, float]


def label_value(value: Any) -> str:
    """A Vertex label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", str(value).lower())[:63]


def lineage_labels(record: Mapping[str, Any]) -> dict[str, str]:
    """The run's lineage as registry labels (hashes shortened to 16 hex digits: label values
    hold 63 characters; the full values stay on the pipeline's artifacts)."""
    short = {"weights_manifest_sha256": "weights_sha256", "dataset_manifest_sha256": "dataset_sha256",
             "weights_source_fingerprint": "weights_source_fp",
             "dataset_source_fingerprint": "dataset_source_fp"}
    labels = {new: label_value(str(record[old])[:16]) for old, new in short.items() if record.get(old)}
    for key in ("base_model_id", "base_model_revision", "git_commit", "project_version",
                "pipeline_run"):
        if record.get(key):
            labels[key] = label_value(record[key])
    return labels


class LocalRegistry:
    """A folder registry: registry.json + versions/N/ (copies of the exports)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _record(self) -> dict[str, Any]:
        path = self.root / REGISTRY_RECORD
        return read_json(path) if path.is_file() else {"versions": [], "aliases": {}}

    def versions(self) -> list[Version]:
        record = self._record()
        return [Version(v["version_id"], v["artifact_uri"],
                        tuple(a for a, n in record["aliases"].items() if n == v["version_id"]),
                        v["labels"], v["metrics"]) for v in record["versions"]]

    def champion(self) -> Version | None:
        target = self._record()["aliases"].get(CHAMPION)
        return next((v for v in self.versions() if v.version_id == target), None)

    def upload(self, export_dir: str, labels: Mapping[str, str], metrics: Mapping[str, float],
               aliases: tuple[str, ...] = (CHAMPION,)) -> Version:
        record = self._record()
        version_id = str(len(record["versions"]) + 1)
        target = self.root / "versions" / version_id
        if target.exists():  # a copy left by an upload that died before the record was written
            shutil.rmtree(target)
        # Hard links where the export and the registry share a filesystem: a real-size export is
        # tens of GB and is never changed after it is written.
        shutil.copytree(export_dir, target / "model",
                        copy_function=lambda src, dst: link_or_copy(Path(src), Path(dst), hardlink=True))
        record["versions"].append({
            "version_id": version_id, "artifact_uri": str((target / "model").resolve()),
            "labels": dict(labels), "metrics": dict(metrics), "source_uri": str(export_dir),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        record["aliases"].update({alias: version_id for alias in aliases})
        write_json_atomic(self.root / REGISTRY_RECORD, record)  # last: the version exists only now
        return next(v for v in self.versions() if v.version_id == version_id)


class VertexRegistry:
    """Vertex AI Model Registry through the aiplatform SDK (google-cloud-aiplatform)."""

    def __init__(self, model: str, serving_image: str = DEFAULT_SERVING_IMAGE, **init: Any) -> None:
        match = VERTEX_MODEL.match(model)
        if not match:
            raise ValueError(f"registry {model!r}: expected projects/P/locations/L/models/ID "
                             "(ID: lowercase letters, digits, '_' or '-')")
        self.model, self.serving_image = model, serving_image
        self.project, self.location, self.model_id = match.groups()
        from google.cloud import aiplatform

        aiplatform.init(project=self.project, location=self.location, **init)

    def _get(self, version: str):
        from google.api_core import exceptions
        from google.cloud import aiplatform

        try:
            return aiplatform.Model(model_name=self.model, version=version)
        except exceptions.NotFound:
            return None

    def _version(self, model) -> Version:
        import json

        metrics = json.loads(model.version_description or "{}")
        return Version(str(model.version_id), model.uri, tuple(model.version_aliases),
                       dict(model.labels), metrics)

    def champion(self) -> Version | None:
        model = self._get(CHAMPION)
        return self._version(model) if model is not None else None

    def upload(self, export_uri: str, labels: Mapping[str, str], metrics: Mapping[str, float],
               aliases: tuple[str, ...] = (CHAMPION,)) -> Version:
        import json

        from google.cloud import aiplatform

        exists = self._get("default") is not None
        model = aiplatform.Model.upload(
            display_name=self.model_id, artifact_uri=export_uri,
            serving_container_image_uri=self.serving_image,
            serving_container_args=list(SERVING_ARGS), serving_container_ports=[8080],
            serving_container_predict_route="/generate", serving_container_health_route="/ping",
            parent_model=self.model if exists else None,
            model_id=None if exists else self.model_id,
            version_aliases=list(aliases), is_default_version=CHAMPION in aliases,
            version_description=json.dumps(dict(metrics), sort_keys=True),
            labels=dict(labels), project=self.project, location=self.location)
        return self._version(model)


def open_registry(name: str, serving_image: str = DEFAULT_SERVING_IMAGE, **init: Any):
    """The registry a ``registry`` parameter names; None for "" (no registry)."""
    if not name:
        return None
    if name.startswith("projects/"):
        return VertexRegistry(name, serving_image, **init)
    return LocalRegistry(name)
