"""One home for the layout of every artifact the steps hand each other: the file names, which of
them is written last (its presence marks the artifact complete), and their readers.

Standard library only: the KFP-side code in ``pipelines/`` imports it too (never torch there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from components.files import read_json

# stage-weights -> Model: the checksummed file list, written last.
WEIGHTS_MANIFEST = "weights_manifest.json"
# prepare-dataset -> Dataset: the Parquet shards' manifest, written last.
DATASET_MANIFEST = "manifest.json"
# finetune -> Model (adapter): PEFT's files plus the run's metrics, written last.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_METRICS = "train_metrics.json"
# finetune's resume checkpoints (outside the adapter), in transformers.Trainer's format plus the
# hyperparameters that wrote them; Trainer's state is written last.
CHECKPOINT_HYPERPARAMETERS = "finetune_hyperparameters.json"
CHECKPOINT_STATE = "trainer_state.json"
# evaluate -> evaluation: per-image predictions, then the metrics, written last.
PREDICTIONS = "predictions.jsonl"
EVAL_METRICS = "metrics.json"
# evaluate-champion when the registry has no champion yet.
NO_CHAMPION = "no_champion.json"
# merge-export -> Model (merged_model): safetensors, the model card, this metadata written last.
EXPORT_METADATA = "export_metadata.json"
MODEL_CARD = "README.md"
# register -> the registration decision and the version it made.
REGISTRATION = "registration.json"
# The folder registry's record of versions and aliases.
REGISTRY_RECORD = "registry.json"
# What a stand-in model folder is (tiny-model, random-model), next to its weights.
TINY_MODEL_INFO = "tiny_model.json"
RANDOM_MODEL_INFO = "random_model.json"


class LineageError(ValueError):
    """An artifact lacks a file its producer writes (that step did not finish), or the records
    of a run's artifacts do not agree."""


def read(path: str | os.PathLike, what: str) -> Any:
    """The JSON artifact file at ``path``; a clear error naming it and its artifact when missing."""
    path = Path(path)
    if not path.is_file():
        raise LineageError(f"{what}: {path} is missing (the step that writes it did not finish)")
    return read_json(path)


def fmt(value: Any, spec: str = ".4g", missing: str = "n/a") -> str:
    """One cell of a report a person reads (model card, gate report): floats by ``spec``, lists
    and dicts as inline JSON code, None as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value) + "`"
    return str(value)
