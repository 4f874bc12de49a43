"""The whole DAG under kfp.local, as `make demo` runs it, on a tiny model and a small synthetic set.

Two runs (a minute or so each on 2 CPU cores): one whose gate passes (margin -1 and no accuracy
floor: any result passes, so the export path always runs; conftest.passing_local_run, shared with
tests/test_lineage.py) and one whose gate holds the export back (margin 1.0: tuned can never beat
baseline by a whole accuracy point). Both run as a subprocess of `python -m pipelines.local_run`
with a planted HF_TOKEN, which must appear in no output and no file. The exports are fp32 (the
demo's setting), verified by merge-export at its fp32 bound.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.files import read_json, sha256_file
from pipelines import local_run
from pipelines import pipeline as dag

from tests.helpers import PASSING, PLANTED, REPO, is_commit_of_this_checkout, run_pipeline


def assert_token_never_written(run_dir: Path, result: subprocess.CompletedProcess) -> None:
    assert PLANTED not in result.stdout and PLANTED not in result.stderr
    needle = PLANTED.encode()
    scanned = 0
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
            scanned += 1
    assert scanned > 20  # the run's artifacts really were there to scan


@pytest.mark.slow
def test_whole_dag_runs_and_exports_when_the_gate_passes(passing_local_run):
    run_dir, result = passing_local_run.run_dir, passing_local_run.result
    summary = read_json(passing_local_run.records / "summary.json")
    assert summary["status"] == "succeeded"
    assert set(summary["tasks"].values()) == {"SUCCEEDED"}
    assert set(summary["tasks"]) == {
        dag.RESOLVE_SOURCES, dag.STAGE_WEIGHTS, dag.PREPARE_DATASET, dag.EVALUATE_BASELINE,
        dag.FINETUNE, dag.EVALUATE_TUNED, dag.GATE, dag.MERGE_EXPORT, dag.EVALUATE_MERGED,
        dag.ACCEPT_EXPORT, dag.RESOLVE_CHAMPION, dag.EVALUATE_CHAMPION, dag.REGISTER}
    records = read_json(passing_local_run.records / "tasks.json")
    for row in ("baseline", "tuned", "merged"):
        metrics = summary[row]
        on_disk = read_json(Path(metrics["evaluation_dir"]) / "metrics.json")
        assert metrics["accuracy"] == on_disk["accuracy"]
        assert metrics["num_examples"] == 6  # 3 classes x 2 eval images
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["unknown_rate"] <= 1.0
    assert summary["gate"]["passed"] is True and summary["export"]["held_back"] is False
    delta = summary["tuned"]["accuracy"] - summary["baseline"]["accuracy"]
    assert summary["gate"]["accuracy_delta"] == pytest.approx(delta)
    export = Path(summary["export"]["path"])
    assert (export / "export_metadata.json").is_file()
    # The adapter artifact holds the adapter and its processor files only; the checkpoints lived
    # under the pipeline root, keyed by the run, and were deleted once the adapter was written.
    adapter = Path(records[dag.FINETUNE]["outputs"]["adapter"]["uri"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [p for p in adapter.rglob("*") if p.is_dir() or p.suffix == ".pt" or p.name == "trainer_state.json"]
    checkpoint_runs = list((run_dir / "kfp" / "checkpoints").iterdir())
    assert len(checkpoint_runs) == 1 and not list(checkpoint_runs[0].rglob("*"))
    assert list(export.glob("*.safetensors"))

    # the KFP metric artifacts carry what Vertex renders
    tuned = records[dag.EVALUATE_TUNED]["outputs"]
    tuned_file = read_json(Path(tuned["evaluation"]["uri"]) / "metrics.json")
    assert tuned["metrics"]["metadata"]["accuracy"] == pytest.approx(tuned_file["accuracy"])
    assert tuned["metrics"]["metadata"]["macro_f1"] == pytest.approx(tuned_file["macro_f1"])
    assert tuned["metrics"]["schema_title"] == "system.Metrics"
    matrix = tuned["confusion"]["metadata"]["confusionMatrix"]
    names = [spec["displayName"] for spec in matrix["annotationSpecs"]]
    assert names[:3] == tuned_file["class_names"] and len(matrix["rows"]) == len(names)
    report = Path(records[dag.GATE]["outputs"]["report"]["uri"]).read_text()
    assert all(name in report for name in tuned_file["class_names"]) and "PASSED" in report
    # the export was evaluated as served (fp32 export, unquantised) and accepted against tuned
    merged_file = read_json(Path(summary["merged"]["evaluation_dir"]) / "metrics.json")
    assert (merged_file["quantization"], merged_file["dtype"]) == ("none", "float32")
    assert merged_file["config"]["load_dtype"] == "saved"
    assert summary["export_gate"]["passed"] is True and summary["export"]["accepted"] is True
    served = Path(records[dag.ACCEPT_EXPORT]["outputs"]["report"]["uri"]).read_text()
    assert "tuned (as trained)" in served and "merged (as served)" in served

    # lineage on every artifact, equal to the files it names
    weights_manifest = read_json(Path(summary["artifacts"]["weights"]) / "weights_manifest.json")
    dataset_sha = sha256_file(Path(summary["artifacts"]["dataset"]) / "manifest.json")
    assert is_commit_of_this_checkout(summary["build"]["git_commit"])
    for name, record in records.items():
        for output, artifact in record["outputs"].items():
            meta = artifact["metadata"]
            assert meta["git_commit"] == summary["build"]["git_commit"], (name, output)
            assert meta["image"] == "local-python-venv", (name, output)
            if name not in (dag.PREPARE_DATASET, dag.EVALUATE_CHAMPION):  # no champion yet
                assert meta["weights_manifest_sha256"] == weights_manifest["manifest_sha256"]
            if name != dag.STAGE_WEIGHTS:
                assert meta["dataset_manifest_sha256"] == dataset_sha, (name, output)
    assert summary["lineage"]["hyperparameters"]["max_steps"] == 2

    table = result.stdout[result.stdout.rindex("accuracy"):]
    assert "baseline" in table and "tuned" in table and "merged" in table and "gate: passed" in table
    # the loss curve: the logged steps as a JSON series and an HTML page with the curve drawn
    finetune = records[dag.FINETUNE]["outputs"]
    series = read_json(finetune["loss_series"]["uri"])
    logged = read_json(Path(summary["artifacts"]["adapter"]) / "train_metrics.json")["log"]
    assert series["step"] == [e["step"] for e in logged] and len(series["loss"]) == len(logged)
    assert "<polyline" in Path(finetune["curve"]["uri"]).read_text()
    assert "<svg" in served and "Confusion matrix" in served

    # the accepted export became the champion of the run folder's registry
    registry = read_json(run_dir / "registry" / "registry.json")
    assert registry["aliases"] == {"champion": "1"}
    assert registry["versions"][0]["metrics"]["accuracy"] == summary["merged"]["accuracy"]
    assert registry["versions"][0]["labels"]["git_commit"] == summary["build"]["git_commit"].replace("+", "-")
    assert summary["champion"]["changed"] is True and summary["champion"]["before"] is None
    assert summary["cached"] == []  # a fresh run folder: nothing in its task cache
    assert_token_never_written(run_dir, result)

    # the same sources again: ingest and training come from the cache, the sources were
    # resolved anew, and the champion was evaluated on this run's shards
    again = run_pipeline(run_dir, passing_local_run.inputs, *PASSING)
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-2000:]
    second = read_json(run_dir / "summary.json")
    assert {dag.STAGE_WEIGHTS, dag.PREPARE_DATASET, dag.FINETUNE} <= set(second["cached"])
    for name in (dag.RESOLVE_SOURCES, dag.RESOLVE_CHAMPION, dag.EVALUATE_CHAMPION):
        assert second["tasks"][name] == "SUCCEEDED", name
    assert second["artifacts"]["dataset"] == summary["artifacts"]["dataset"]
    assert second["champion"]["before"] == "1"
    # the champion is the first run's export: on the same shards it scores what it scored then
    assert second["champion"]["metrics"]["accuracy"] == summary["merged"]["accuracy"]
    assert "cached: " in again.stdout and dag.PREPARE_DATASET in again.stdout


@pytest.mark.slow
def test_gate_holds_the_export_back(passing_local_run, tmp_path):
    """The passing run's inputs and parameters but a margin no tuned model can clear. Its task
    cache is copied over, so the steps up to the gate are served from it and the gate decides."""
    run_dir = tmp_path / "run"
    shutil.copytree(passing_local_run.run_dir / local_run.CACHE_DIR, run_dir / local_run.CACHE_DIR)
    result = run_pipeline(run_dir, passing_local_run.inputs, *PASSING, "--margin", "1.0")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "succeeded"
    assert dag.FINETUNE in summary["cached"] and dag.GATE not in summary["cached"]
    assert summary["gate"]["passed"] is False and summary["export"]["held_back"] is True
    assert summary["export"]["path"] is None and summary["merged"] is None
    assert summary["tasks"][dag.MERGE_EXPORT] == "NOT_RUN"
    assert summary["tasks"][dag.EVALUATE_MERGED] == "NOT_RUN"
    assert summary["tasks"][dag.EVALUATE_TUNED] == "CACHED"  # served from the passing run's cache
    kfp_run = Path(summary["kfp_run_dir"])
    assert not (kfp_run / "merge-export").exists() and not (kfp_run / "evaluate-3").exists()
    assert "gate: held the export back" in result.stdout
    lineage = subprocess.run([sys.executable, "-m", "pipelines.lineage", str(run_dir)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert lineage.returncode == 0, lineage.stderr
    assert "adapter (the gate held the export back)" in lineage.stdout
    assert_token_never_written(run_dir, result)


@pytest.mark.parametrize("argv, message", [
    (["--margin", "2"], "--margin 2.0: an accuracy difference"),
    (["--param", "lora_rank=8"], "parameter 'lora_rank' is not in the pipeline"),
    (["--param", "epochs=2"], "parameter 'epochs' is not in the pipeline; did you mean finetune.epochs?"),
    (["--param", "finetune.epochs=two"], "parameter finetune.epochs='two': expected int"),
    (["--param", "finetune.learning_rate=0"], "parameter finetune: --learning-rate must be positive"),
    (["--weights-source", "/no/such/model"], "--weights-source /no/such/model: no such"),
    (["--num-classes", "1"], "--num-classes must be >= 2"),
    (["--dataset-source", "data/oxford-pets/"], "--dataset-source data/oxford-pets/: no such"),
])
def test_bad_input_fails_before_any_task(tmp_path, capsys, argv, message):
    assert local_run.main(["--run-dir", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "inputs").exists()  # nothing was built
