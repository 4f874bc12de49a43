"""Reads a prepared dataset (the output of ``prepare-dataset``); every later step goes through here.

A prepared dataset is a folder with Parquet shards and a ``manifest.json`` written last, so a
folder without a manifest is an incomplete one and is refused. Each shard's sha256 is checked
against the manifest before its rows are used, so a truncated or swapped shard is never read.

Shard columns: ``id`` (str), ``image`` (encoded RGB image bytes), ``label`` (int, index into the
manifest's ``class_names``), ``label_name`` (str). Rows inside a split are in a seeded shuffled
order, so ``limit=N`` gives a class mix rather than the first class only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from components.artifacts import DATASET_MANIFEST
from components.files import read_json, sha256_file

SPLITS = ("train", "eval")
COLUMNS = ["id", "image", "label", "label_name"]


@dataclass
class Example:
    id: str
    label: int
    label_name: str
    image_bytes: bytes

    def image(self) -> Image.Image:
        """The decoded image, always in RGB mode."""
        with Image.open(io.BytesIO(self.image_bytes)) as img:
            return img.convert("RGB")


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete prepared dataset; a clear error when the folder is not one."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / DATASET_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not a complete prepared dataset "
            "(prepare-dataset writes manifest.json last; run it again to finish the folder)")
    manifest = read_json(path)
    missing = [key for key in ("class_names", "splits") if key not in manifest]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; not a prepare-dataset manifest")
    return manifest


def load_examples(dataset_dir: str | Path, split: str, limit: int | None = None) -> list[Example]:
    """The examples of ``split`` ("train" or "eval") in manifest order, at most ``limit``.

    Only the shards needed to reach ``limit`` are read; each is verified against the
    manifest's sha256 first (a mismatch names the shard).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"{dataset_dir / DATASET_MANIFEST}: no split {split!r} "
                         f"(has {sorted(manifest['splits'])})")
    examples: list[Example] = []
    for shard in manifest["splits"][split]["shards"]:
        if limit is not None and len(examples) >= limit:
            break
        path = dataset_dir / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != shard["sha256"]:
            raise ValueError(f"shard {path}: sha256 {actual} does not match the manifest's "
                             f"{shard['sha256']} (corrupted or replaced file)")
        table = pq.read_table(path, columns=COLUMNS)
        columns = {name: table.column(name).to_pylist() for name in COLUMNS}
        for row in range(table.num_rows):
            examples.append(Example(id=columns["id"][row], label=columns["label"][row],
                                    label_name=columns["label_name"][row],
                                    image_bytes=columns["image"][row]))
    return examples if limit is None else examples[:limit]
