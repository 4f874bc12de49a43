"""Session fixtures shared by the step tests: the tiny Gemma 4 stand-ins, built once per run."""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Tests never reach a hub, and progress bars would only clutter the log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _threads_per_worker() -> int | None:
    """Under pytest-xdist, the cores shared out among the workers (at least 1 each); None when
    not run by xdist. torch's default (one intra-op thread per core in every process) makes 2
    workers on 2 cores spin against each other: the bench's every-row test took 149 s per worker
    with 2 threads each and 52 s with 1 (52 s alone), with the same results."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers)


_THREADS = _threads_per_worker()
if _THREADS is not None and "OMP_NUM_THREADS" not in os.environ:
    # Read by torch at import here and by every subprocess the tests start (pipeline tasks,
    # torchrun workers, CLI runs), which would otherwise each take all cores too.
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def pytest_configure(config):
    if _THREADS is not None and os.environ.get("OMP_NUM_THREADS") == str(_THREADS):
        import torch

        torch.set_num_threads(_THREADS)  # in case torch was imported before this file set the variable


def pytest_collection_finish(session):
    """What the tests import lives to the end: freeze it, so that the full garbage collections
    Trainer (one per train()), the bench (one per row) and Python itself run skip its ~550k
    objects (0.35 s each, a third of the bench's every-row test: docs/design.md#test-time)."""
    # What the slow tests import later anyway, imported now to be frozen with the rest; a run with
    # no slow test (the compile tests alone) does not pay their 8-16 s of imports.
    if any(item.get_closest_marker("slow") for item in session.items):
        for module in ("peft", "transformers.trainer", "transformers.models.gemma4.modeling_gemma4"):
            importlib.import_module(module)
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    import torch

    _long_tests_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _long_tests_first(items) -> None:
    """Slow tests first, so that the two workers of `make test` (fed 2 tests at a time) end
    together instead of one running a minute-long test alone at the end. The shared pipeline
    run's later users go last: by then it exists, so no worker waits for it."""
    users = [item for item in items if "passing_local_run" in getattr(item, "fixturenames", ())]
    later = {id(item) for item in users[1:]}
    items.sort(key=lambda item: 2 if id(item) in later else 0 if item.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from components import tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-gemma4"
    tiny_model.run(tiny_model.TinyModelConfig(output_dir=str(path)))
    return path


@pytest.fixture(scope="session")
def tiny_large_model_dir(tmp_path_factory):
    """Same tiny model with the 31B / 26B-A4B generation prompt (empty thought channel)."""
    from components import tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-gemma4-large-template"
    tiny_model.run(tiny_model.TinyModelConfig(output_dir=str(path), large_model_template=True))
    return path


@pytest.fixture(scope="session")
def small_pets_dir(tmp_path_factory):
    """A prepared 4-class synthetic pets set, small enough for step tests (32 train, 32 eval)."""
    from components import prepare_dataset, synthetic_pets

    root = tmp_path_factory.mktemp("pets")
    synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(output_dir=str(root / "raw"), num_classes=4, images_per_class=16,
                                             image_size=64, seed=1))
    prepare_dataset.run(prepare_dataset.PrepareDatasetConfig(source=str(root / "raw"), output_dir=str(root / "prepared")))
    return root / "prepared"


@dataclasses.dataclass(frozen=True)
class LocalRun:
    inputs: tuple[str, str]  # (weights, dataset) the run read: the same again hits its task cache
    run_dir: Path  # the run folder (tests/test_pipeline_local.py runs the pipeline there again)
    records: Path  # tasks.json, summary.json and pipeline.yaml as the first run left them
    result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def passing_local_run(tmp_path_factory) -> LocalRun:
    """One whole-DAG run under kfp.local whose gate passes (tests.helpers.PASSING and SMALL, on
    the tiny model and 3 synthetic classes x 4 images), shared by the whole-DAG test and the
    lineage tests: a run costs about a minute on 2 cores. Under pytest-xdist it is shared by the
    workers too: the first to need it runs it under a file lock in the run's common temporary
    folder, and another that needs it meanwhile waits for it. Its records are copied aside at
    once, since the whole-DAG test reruns the pipeline in the same folder (from the cache)."""
    from pipelines import local_run
    from tests.helpers import PASSING, run_pipeline

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "passing-local-run"
    root.mkdir(exist_ok=True)
    run_dir, records, outcome = root / "run", root / "first-run-records", root / "result.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not outcome.is_file():
            inputs = local_run.demo_inputs(root, num_classes=3, images_per_class=4)
            result = run_pipeline(run_dir, inputs, *PASSING)
            if result.returncode == 0:
                records.mkdir()
                for name in ("tasks.json", "summary.json", "pipeline.yaml"):
                    shutil.copy2(run_dir / name, records / name)
            outcome.write_text(json.dumps({"inputs": inputs, "args": result.args, "returncode": result.returncode,
                                           "stdout": result.stdout, "stderr": result.stderr}))
    saved = json.loads(outcome.read_text())
    result = subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return LocalRun(tuple(saved["inputs"]), run_dir, records, result)
