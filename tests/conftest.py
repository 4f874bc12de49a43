"""Session fixtures shared by the step tests: the tiny Gemma 4 stand-ins, built once per run."""

from __future__ import annotations

import os

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


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
