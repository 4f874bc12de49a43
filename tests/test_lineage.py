"""Lineage of the exported model, from a real local run folder and from a (fake) Vertex AI job.

The local run is the real DAG under kfp.local with tiny settings (a minute or so on 2 cores),
the gate-passing run of tests/test_pipeline_local.py (conftest.passing_local_run).
The Vertex case serves that run's task records
in the v1 REST shape (jobDetail.taskDetails) from tests/fake_vertex.py and reads them back through
google-cloud-aiplatform's PipelineJob.get: both must give the same chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import google.auth
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials

from components.files import read_json, sha256_file
from pipelines import lineage
from pipelines import pipeline as dag
from tests.fake_vertex import FakeVertex

from tests.helpers import is_commit_of_this_checkout

JOB = "projects/acme-ml/locations/us-central1/pipelineJobs/gemma-pets-finetune-20260101000000"


@pytest.fixture
def run_dir(passing_local_run) -> Path:
    """The records of a gate-passing local run (conftest.passing_local_run, shared with
    tests/test_pipeline_local.py), as that run wrote them; its artifacts stay where it wrote them."""
    return passing_local_run.records


def chain_json(argv: list[str], capsys) -> dict:
    assert lineage.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_local_run_chain_names_the_exact_inputs_code_and_metrics(run_dir, capsys):
    chained = chain_json([str(run_dir)], capsys)
    summary = read_json(run_dir / "summary.json")
    assert chained["model"] == {"kind": "export", "uri": summary["export"]["path"],
                                "held_back_by_gate": False}
    weights_manifest = read_json(Path(summary["artifacts"]["weights"]) / "weights_manifest.json")
    assert chained["weights"]["manifest_sha256"] == weights_manifest["manifest_sha256"]
    assert chained["weights"]["id"] == weights_manifest["source"]
    dataset_dir = Path(summary["artifacts"]["dataset"])
    assert chained["dataset"]["manifest_sha256"] == sha256_file(dataset_dir / "manifest.json")
    assert chained["dataset"]["num_classes"] == 3
    hyper = chained["hyperparameters"]
    assert (hyper["lora_r"], hyper["max_steps"], hyper["quantization"]) == (4, 2, "none")
    for row in ("baseline", "tuned", "merged"):
        assert chained["metrics"][row]["accuracy"] == pytest.approx(summary[row]["accuracy"])
    assert chained["gate"]["passed"] is True and chained["gate"]["margin"] == -1
    assert chained["export_gate"]["passed"] is True
    assert chained["export_gate"]["merged_accuracy"] == pytest.approx(summary["merged"]["accuracy"])
    assert chained["code"]["git_commit"] == summary["build"]["git_commit"]
    assert is_commit_of_this_checkout(chained["code"]["git_commit"])
    assert chained["code"]["project_version"] == summary["build"]["project_version"]
    assert chained["code"]["image"] == "local-python-venv"

    assert lineage.main([str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"manifest sha256 {weights_manifest['manifest_sha256']}" in text
    assert "lora_r=4" in text and "gate           passed" in text


@pytest.mark.slow
def test_a_broken_chain_is_refused(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    records = read_json(run_dir / "tasks.json")
    records[dag.MERGE_EXPORT]["outputs"]["export"]["metadata"]["dataset_manifest_sha256"] = "0" * 64
    (copy / "tasks.json").write_text(json.dumps(records))
    with pytest.raises(SystemExit, match="export records dataset_manifest_sha256 '0000.*"
                                         "prepare-dataset artifact has"):
        lineage.main([str(copy)])


@pytest.mark.slow
def test_vertex_job_gives_the_same_chain(run_dir, monkeypatch, capsys):
    """The run's records, as Vertex returns a finished job's task details over REST."""
    records = read_json(run_dir / "tasks.json")
    spec = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    details = [{"taskId": str(i), "taskName": record["task"],
                "state": "SUCCEEDED" if record["state"] == "SUCCEEDED" else "SKIPPED",
                "outputs": {name: {"artifacts": [{"uri": artifact["uri"],
                                                  "schemaTitle": artifact["schema_title"],
                                                  "metadata": artifact["metadata"]}]}
                            for name, artifact in record["outputs"].items()}}
               for i, record in enumerate(records.values(), start=1)]
    monkeypatch.setattr(google.auth, "default",
                        lambda scopes=None, **_: (AnonymousCredentials(), "acme-ml"))
    with FakeVertex() as fake:
        fake.put_job(JOB, {"displayName": "pets", "pipelineSpec": spec,
                           "state": "PIPELINE_STATE_SUCCEEDED",
                           "jobDetail": {"taskDetails": details}})
        from_vertex = chain_json(["--job", JOB, "--api-endpoint", fake.endpoint], capsys)
        assert [r.path for r in fake.recorded("GET", "pipelineJobs")] == [f"/v1/{JOB}"]
    assert from_vertex == chain_json([str(run_dir)], capsys)


def test_not_a_run_folder_or_job_name_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match=r"tasks.json is missing: .* is not a folder written by"):
        lineage.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="--job 'pipelineJobs/1': expected projects/"):
        lineage.main(["--job", "pipelineJobs/1"])
    with pytest.raises(SystemExit):  # argparse: exactly one of RUN_DIR / --job
        lineage.main([])


def test_a_run_that_failed_early_has_no_chain(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({
        dag.STAGE_WEIGHTS: {"task": "stage-weights", "state": "FAILED", "outputs": {},
                            "parameters": {}}}))
    with pytest.raises(SystemExit, match="no staged weights or prepared dataset"):
        lineage.main([str(tmp_path)])
