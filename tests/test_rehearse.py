"""The rehearsal harness runs the whole DAG and measures every step (tiny stand-in on the CPU;
the real sizes run on a GPU: `make rehearse`, docs/rehearsal.md)."""

from __future__ import annotations

import json

import pytest

from bench import rehearse


@pytest.mark.slow
def test_tiny_rehearsal_measures_every_step(tmp_path):
    run_dir = tmp_path / "rehearse"
    code = rehearse.main(["--tiny", "--run-dir", str(run_dir), "--num-classes", "3", "--images-per-class", "4",
                          "--interval", "0.2"])
    result = json.loads((run_dir / "rehearsal.json").read_text())
    assert code == 0 and result["status"] == "succeeded"
    steps = {row["step"]: row for row in result["steps"]}
    assert {"stage-weights", "prepare-dataset", "finetune", "evaluate-baseline", "evaluate-tuned", "merge-export",
            "evaluate-merged", "register"} <= set(steps)
    assert all(row["state"] == "SUCCEEDED" for row in steps.values())
    # The gate was forced open: the export and its evaluation ran whatever the accuracies.
    assert result["parameters"]["gate"] == rehearse.GATE_OPEN["gate"] and result["metrics"]["merged"]
    # Sampling every 0.2 s can miss a short task or catch only its end; the long ones are sampled
    # (a Python with torch loaded).
    for row in steps.values():
        assert "wall_s" not in row or (row["wall_s"] > 0 and row["peak_gpu_gb"] == 0.0), row
    finetune, export = steps["finetune"], steps["merge-export"]
    assert finetune["peak_rss_gb"] > 0.05 and export["peak_rss_gb"] > 0.05, (finetune, export)
    assert finetune["write_calls_gb"] > 0
    # merge-export writes at least the export it hands on; the artifact sizes are the folders'.
    assert export["write_calls_gb"] >= export["artifacts_gb"]["export"] > 0.0005  # the 0.9 MB tiny model
    assert finetune["artifacts_gb"]["adapter"] > 0
    table = (run_dir / "rehearsal.md").read_text()
    assert table.count("| SUCCEEDED |") == len(steps) and "peak GPU GB" in table


def test_disk_plan_takes_whole_units_that_fit():
    one = rehearse.disk_need("gemma-4-31b", 6)
    two = rehearse.disk_need("gemma-4-31b", 12)
    assert 2.5 * 2 * 4.5e9 < one < two  # 31B widths at 6 layers: ~4.7B parameters
    assert rehearse.plan_layers("gemma-4-31b", int((two + 1) / rehearse.DISK_HEADROOM)) == 12
    with pytest.raises(SystemExit, match="too little"):
        rehearse.plan_layers("gemma-4-31b", int(one / 2))
