"""Session fixtures shared by the step tests: the tiny Gemma 4 stand-ins, built once per run."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub, and progress bars would only clutter the log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
