"""The model registry: the folder registry's round trip, and Vertex AI Model Registry through the
aiplatform SDK against the fake Vertex REST endpoint (parent model, aliases, labels)."""

from __future__ import annotations

import json

import pytest
from google.auth.credentials import AnonymousCredentials

from components import registry as reg
from components.gate import Thresholds, decide
from tests.fake_vertex import FakeVertex

LABELS = {"git_commit": "abc123", "weights_sha256": "0123456789abcdef"}
MODEL = "projects/acme-ml/locations/us-central1/models/gemma-pets"


def make_export(path, text: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"text": text}))
    return path


def test_local_registry_round_trip(tmp_path):
    registry = reg.open_registry(str(tmp_path / "registry"))
    assert isinstance(registry, reg.LocalRegistry) and registry.champion() is None
    first = registry.upload(str(make_export(tmp_path / "run1", "one")), LABELS, {"accuracy": 0.9})
    assert (first.version_id, first.aliases) == ("1", ("champion",))
    # a fresh handle on the same folder reads the same record (what the next run sees)
    again = reg.LocalRegistry(tmp_path / "registry")
    assert again.champion() == first
    assert json.loads((tmp_path / "registry/versions/1/model/config.json").read_text()) == {"text": "one"}
    # Same filesystem: the version holds hard links to the export's files, not copies.
    assert (tmp_path / "registry/versions/1/model/config.json").samefile(tmp_path / "run1/config.json")
    second = again.upload(str(make_export(tmp_path / "run2", "two")), LABELS, {"accuracy": 0.95})
    assert again.champion() == second and second.version_id == "2"
    versions = again.versions()
    assert [(v.version_id, v.aliases, v.metrics["accuracy"]) for v in versions] == [
        ("1", (), 0.9), ("2", ("champion",), 0.95)]  # the alias moved; version 1 stays
    record = json.loads((tmp_path / "registry/registry.json").read_text())
    assert record["aliases"] == {"champion": "2"} and record["versions"][0]["labels"] == LABELS
    assert reg.open_registry("") is None


def test_vertex_upload_creates_then_versions_the_model_with_aliases():
    with FakeVertex() as fake:
        registry = reg.open_registry(MODEL, credentials=AnonymousCredentials(),
                                     api_endpoint=fake.endpoint, api_transport="rest")
        assert isinstance(registry, reg.VertexRegistry) and registry.champion() is None
        first = registry.upload("gs://acme/runs/1/export", LABELS, {"accuracy": 0.9})
        second = registry.upload("gs://acme/runs/2/export", LABELS, {"accuracy": 0.95})
        champion = registry.champion()
        uploads = [r.body for r in fake.recorded("POST", r"/models:upload$")]

    assert (first.version_id, second.version_id) == ("1", "2")
    assert champion.version_id == "2" and champion.artifact_uri == "gs://acme/runs/2/export"
    assert champion.metrics == {"accuracy": 0.95} and champion.labels == LABELS
    # the first upload creates the model under its id; the next one is a version of it
    assert uploads[0]["modelId"] == "gemma-pets" and "parentModel" not in uploads[0]
    assert uploads[1]["parentModel"] == MODEL and "modelId" not in uploads[1]
    model = uploads[1]["model"]
    assert set(model["versionAliases"]) == {"champion", "default"}  # default: is_default_version
    assert model["artifactUri"] == "gs://acme/runs/2/export" and model["labels"] == LABELS
    container = model["containerSpec"]
    assert container["imageUri"] == reg.DEFAULT_SERVING_IMAGE
    assert "--model=$(AIP_STORAGE_URI)" in container["args"]
    assert json.loads(model["versionDescription"]) == {"accuracy": 0.95}


def test_lineage_labels_fit_vertex_label_rules():
    labels = reg.lineage_labels({"weights_manifest_sha256": "A" * 64, "git_commit": "f" * 40 + "+dirty",
                                 "base_model_id": "google/gemma-4-31B-it", "num_classes": 37})
    assert labels == {"weights_sha256": "a" * 16, "git_commit": "f" * 40 + "-dirty",
                      "base_model_id": "google-gemma-4-31b-it"}
    assert all(len(v) <= 63 for v in labels.values())


T = Thresholds(margin=0.02, min_accuracy=0.2, export_tolerance=0.03)


@pytest.mark.parametrize("merged, champion, passes", [
    (0.92, 0.90, True),    # beats the champion by exactly the margin
    (0.9199, 0.90, False),  # by less
    (0.90, 0.90, False),   # ties it: the champion stays
    (0.85, 0.90, False),   # worse
    (0.92, None, True),    # no champion: base and floor only
])
def test_challenger_must_beat_the_champion_by_the_margin(merged, champion, passes):
    decision = decide(0.1, merged, T, merged=merged, champion=champion)
    assert decision["passed"] is passes
    assert ("beats_champion" in decision["failed"]) is (not passes)
    assert any(c["check"] == "beats_champion" for c in decision["checks"]) is (champion is not None)


def test_a_challenger_that_beats_the_champion_but_not_the_base_is_held_back():
    decision = decide(0.95, 0.93, T, merged=0.93, champion=0.5)
    assert decision["failed"] == ["beats_baseline"]


def test_bad_vertex_names_are_refused():
    with pytest.raises(ValueError, match="projects/P/locations/L/models/ID"):
        reg.open_registry("projects/acme/locations/us-central1/models/Bad Name")
