"""``gemma-pets prepare-dataset``: any supported image-classification source -> Parquet shards.

Sources: the official Oxford-IIIT Pet layout (folders or the two tarballs), a Hugging Face dataset
(hub id or local folder), or one sub-folder per class. Output: ``{train,eval}-*.parquet`` shards
of RGB images and ``manifest.json``, written last (``components.shards`` reads them). Every check
that needs no pixels runs before any image is read; nothing is written until every image is read.
The contract in full: docs/steps.md; bad input and its messages: docs/bad-input.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from components.cli import UserError, entrypoint, hub_id, parse_config
from components.files import read_json, sha256_bytes, sha256_file, write_bytes_atomic, write_json_atomic
from components.artifacts import DATASET_MANIFEST
from components.shards import SPLITS

# ---------------------------------------------------------------------------------------------
# The official Oxford-IIIT Pet format (also written by components.synthetic_pets)

# In official CLASS-ID order: alphabetical, ignoring case. Cats capitalised, dogs lower case.
OXFORD_PET_CLASSES = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher",
    "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)
assert list(OXFORD_PET_CLASSES) == sorted(OXFORD_PET_CLASSES, key=str.lower)

# list.txt's header, verbatim (typos included) as in the official annotations.tar.gz
LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)
ANNOTATION_FILES = ("list.txt", "trainval.txt", "test.txt")
SPLIT_FILES = {"train": "trainval.txt", "eval": "test.txt"}  # our split <- official list


def species_id(class_name: str) -> int:
    """1 = cat (name capitalised), 2 = dog."""
    return 1 if class_name[0].isupper() else 2


def breed_id(class_index: int) -> int:
    """1-based rank of the class among the classes of its species, in class-id order."""
    species = species_id(OXFORD_PET_CLASSES[class_index])
    return sum(1 for name in OXFORD_PET_CLASSES[: class_index + 1] if species_id(name) == species)


def annotation_line(image_name: str, class_index: int) -> str:
    """``<image> <CLASS-ID> <SPECIES> <BREED ID>`` line of list/trainval/test.txt."""
    name = OXFORD_PET_CLASSES[class_index]
    return f"{image_name} {class_index + 1} {species_id(name)} {breed_id(class_index)}\n"


# ---------------------------------------------------------------------------------------------
# Config

SOURCE_FORMATS = ("auto", "official", "hf", "imagefolder")
IMAGE_FORMATS = ("jpeg", "png")
MIN_CLASSES = 2
WHY_TWO_CLASSES = "with one class every answer is right: accuracy would be a trivial 100%"
# Options that change how the step runs but not the dataset it writes (a rerun may differ in them)
RUN_ONLY_OPTIONS = ("num_workers", "hf_cache_dir", "overwrite")
DATASET_FORMAT = "gemma-pets/prepared-dataset/v1"


@dataclass
class PrepareDatasetConfig:
    """Turn an image-classification source into the Parquet shards + manifest the later steps read."""

    source: str = field(metadata={
        "help": "official layout folder; folder with images.tar.gz + annotations.tar.gz (or "
                "'IMAGES.tar.gz,ANNOTATIONS.tar.gz'); Hugging Face dataset id or local dataset "
                "folder; or an image folder with one sub-folder per class"})
    output_dir: str = field(metadata={"help": "folder for the shards and manifest.json"})
    source_format: str = field(default="auto", metadata={
        "help": "how to read --source; auto decides from what --source is",
        "choices": list(SOURCE_FORMATS)})
    revision: str | None = field(default=None, metadata={
        "help": "Hugging Face dataset revision (commit sha, tag or branch); pin it for reproducible runs"})
    hf_train_split: str = field(default="train", metadata={"help": "Hugging Face split used as train"})
    hf_eval_split: str = field(default="test", metadata={
        "help": "Hugging Face split used as eval; empty string: re-split train by --eval-fraction"})
    image_column: str = field(default="image", metadata={"help": "Hugging Face Image column"})
    label_column: str = field(default="label", metadata={"help": "Hugging Face ClassLabel column"})
    id_column: str = field(default="image_id", metadata={
        "help": "Hugging Face column of stable image ids; when absent, ids are '<split>-<row>'"})
    hf_cache_dir: str | None = field(default=None, metadata={
        "help": "datasets cache folder (default: the datasets library's, e.g. under HF_HOME)"})
    num_classes: int | None = field(default=None, metadata={
        "help": "keep only the first N classes in source class order (labels stay 0..N-1)"})
    classes: list[str] = field(default_factory=list, metadata={
        "help": "keep only these class names (space or comma separated); labels 0..K-1 follow "
                "the source class order"})
    train_size: int | None = field(default=None, metadata={
        "help": "take this many train examples, stratified by class, seeded (default: all)"})
    eval_size: int | None = field(default=None, metadata={
        "help": "take this many eval examples, stratified by class, seeded (default: all)"})
    resplit: bool = field(default=False, metadata={
        "help": "ignore the source's split and re-split everything by --eval-fraction (stratified)"})
    eval_fraction: float = field(default=0.2, metadata={
        "help": "share of each class put in eval when re-splitting (image folders always are)"})
    seed: int = field(default=0, metadata={"help": "seed for splits, subsets and shard order"})
    image_format: str = field(default="jpeg", metadata={
        "help": "encoding of the stored RGB images", "choices": list(IMAGE_FORMATS)})
    jpeg_quality: int = field(default=95, metadata={
        "help": "JPEG quality (1-100) for images that must be re-encoded"})
    examples_per_shard: int = field(default=1000, metadata={
        "help": "rows per Parquet shard (about 100 MB of official-size photos)"})
    num_workers: int = field(default=0, metadata={
        "help": "decoding threads; 0 = one per CPU core"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a dataset already prepared in --output-dir with other options (by "
                "default a rerun with the same options reuses it, and other options are refused)"})

    def __post_init__(self) -> None:
        # accept "--classes a,b c" as well as "--classes a b c" (KFP passes one string)
        self.classes = [name for item in self.classes for name in item.split(",") if name]
        _check_options(self)


def _check_options(config: PrepareDatasetConfig) -> None:
    if not config.source:
        raise UserError("--source must not be empty")
    if not config.output_dir:
        raise UserError("--output-dir must not be empty")
    if config.source_format not in SOURCE_FORMATS:
        raise UserError(f"--source-format must be one of {SOURCE_FORMATS}, got {config.source_format!r}")
    if config.image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format must be one of {IMAGE_FORMATS}, got {config.image_format!r}")
    if len(set(config.classes)) != len(config.classes):
        raise UserError(f"--classes lists a class twice: {config.classes}")
    if config.classes and config.num_classes is not None:
        raise UserError("give --classes or --num-classes, not both")
    if config.num_classes is not None and config.num_classes < MIN_CLASSES or len(config.classes) == 1:
        given = f"--num-classes {config.num_classes}" if config.classes == [] else f"--classes {config.classes[0]}"
        raise UserError(f"{given}: keep at least {MIN_CLASSES} classes ({WHY_TWO_CLASSES})")
    for flag, value in (("--train-size", config.train_size), ("--eval-size", config.eval_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0.0 < config.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in (0, 1), got {config.eval_fraction}")
    if not 1 <= config.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {config.jpeg_quality}")
    if config.examples_per_shard < 1:
        raise UserError(f"--examples-per-shard must be >= 1, got {config.examples_per_shard}")
    if config.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {config.num_workers}")


# ---------------------------------------------------------------------------------------------
# Sources: a cheap listing (ids, labels, splits) first, pixel data only when asked


@dataclass
class Item:
    id: str
    label: int  # index into the source's class_names
    split: str | None  # "train" / "eval" from the source, None when it has no split
    ref: Any  # what read() needs: a file path, a tar member, a dataset row
    origin: str  # where it came from, for the skipped list


class Source:
    format: str = ""
    revision: str | None = None
    class_names: list[str]
    items: list[Item]
    has_split: bool
    pre_skipped: list[dict]  # found unreadable while listing (e.g. a listed file is missing)

    def fetch(self, items: list[Item]) -> None:
        """Make ``items`` readable (e.g. extract them); called once, before any read()."""

    def read(self, item: Item) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release temporary files."""


def _parse_annotation_file(text: str, filename: str) -> list[tuple[str, int]]:
    """(image name, 0-based class index) per line of list/trainval/test.txt; strict checks."""
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{filename}:{lineno}"
        if len(parts) != 4:
            raise UserError(f"{where}: expected 4 columns 'Image CLASS-ID SPECIES BREED-ID', got {line!r}")
        image, *numbers = parts
        try:
            class_id, species, breed = (int(n) for n in numbers)
        except ValueError:
            raise UserError(f"{where}: CLASS-ID, SPECIES and BREED ID must be integers: {line!r}") from None
        if not 1 <= class_id <= len(OXFORD_PET_CLASSES):
            raise UserError(f"{where}: CLASS-ID {class_id} is outside the class list "
                            f"1..{len(OXFORD_PET_CLASSES)}: {line!r}")
        class_index = class_id - 1
        name = OXFORD_PET_CLASSES[class_index]
        if image.rsplit("_", 1)[0] != name:
            raise UserError(f"{where}: image {image!r} does not belong to CLASS-ID {class_id} ({name})")
        if species != species_id(name) or breed != breed_id(class_index):
            raise UserError(f"{where}: SPECIES/BREED ID {species}/{breed} do not match class "
                            f"{name} ({species_id(name)}/{breed_id(class_index)})")
        if image in seen:
            raise UserError(f"{where}: image {image!r} is listed twice")
        seen.add(image)
        rows.append((image, class_index))
    return rows


def _safe_member_name(member: tarfile.TarInfo, tar_path: Path) -> str:
    """The member's normalised relative name; refuses absolute or '..' paths and links."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise UserError(f"{tar_path}: unsafe member path {name!r} (absolute or outside the archive)")
    if member.issym() or member.islnk():
        raise UserError(f"{tar_path}: member {name!r} is a link; refusing to follow it")
    return str(PurePosixPath(*[p for p in parts if p not in (".", "")])) if parts else ""


def _read_annotations_tar(path: Path) -> dict[str, str]:
    wanted = {f"annotations/{name}": name for name in ANNOTATION_FILES}
    texts: dict[str, str] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            name = _safe_member_name(member, path)
            if member.isfile() and name in wanted:
                texts[wanted[name]] = tar.extractfile(member).read().decode("utf-8")
    missing = [f"annotations/{n}" for n in ANNOTATION_FILES if n not in texts]
    if missing:
        raise UserError(f"missing annotation file(s) {missing} in {path}")
    return texts


def _read_annotations_folder(root: Path) -> dict[str, str]:
    if not (root / "images").is_dir():
        raise UserError(f"--source {root}: no images/ folder next to annotations/ (official "
                        "layout: images/ + annotations/); extract images.tar.gz there")
    folder = root / "annotations"
    texts = {}
    for name in ANNOTATION_FILES:
        if not (folder / name).is_file():
            raise UserError(f"missing annotation file {folder / name} "
                            "(the official layout needs list.txt, trainval.txt, test.txt)")
        texts[name] = (folder / name).read_text(encoding="utf-8")
    return texts


def _split_of(listed: dict[str, list[tuple[str, int]]], label: str) -> dict[str, str]:
    """image -> our split, from trainval.txt / test.txt, each checked against list.txt."""
    catalogue = dict(listed["list.txt"])
    split_of: dict[str, str] = {}
    for split, filename in SPLIT_FILES.items():
        for image, class_index in listed[filename]:
            if catalogue.get(image) != class_index:
                raise UserError(f"{label}{filename}: {image!r} with CLASS-ID {class_index + 1} "
                                "is not listed with that CLASS-ID in list.txt")
            if image in split_of:
                raise UserError(f"{label}{filename}: {image!r} is also in "
                                f"{SPLIT_FILES[split_of[image]]}")
            split_of[image] = split
    return split_of


class OfficialSource(Source):
    """Oxford-IIIT Pet: images/ + annotations/ folders, or the two official tarballs."""

    format = "official"

    def __init__(self, root: Path | None, images_tar: Path | None = None,
                 annotations_tar: Path | None = None):
        self.root, self.images_tar = root, images_tar
        self._tmp: tempfile.TemporaryDirectory | None = None
        if annotations_tar is not None:
            texts, label = _read_annotations_tar(annotations_tar), f"{annotations_tar.name}:annotations/"
        else:
            assert root is not None
            texts, label = _read_annotations_folder(root), f"{root / 'annotations'}/"
        listed = {name: _parse_annotation_file(texts[name], label + name) for name in ANNOTATION_FILES}
        split_of = _split_of(listed, label)
        self.class_names = list(OXFORD_PET_CLASSES)
        self.has_split = True
        # images in list.txt but in neither split file have no split: left out, and reported
        self.pre_skipped = [{"id": image, "file": f"images/{image}.jpg",
                             "reason": f"listed in list.txt but in neither {' nor '.join(SPLIT_FILES.values())}"}
                            for image, _ in listed["list.txt"] if image not in split_of]
        self.items = [Item(id=image, label=class_index, split=split_of[image], ref=f"images/{image}.jpg",
                           origin=f"images/{image}.jpg")
                      for image, class_index in listed["list.txt"] if image in split_of]
        if root is not None and self.items and not any((root / it.ref).is_file() for it in self.items):
            raise UserError(f"{root / 'images'}: none of the {len(self.items)} images listed in "
                            f"{label}list.txt is there (e.g. {self.items[0].ref}); put the images "
                            "there (extract images.tar.gz into it)")

    def fetch(self, items: list[Item]) -> None:
        if self.images_tar is None:
            return
        # Only the listed images, each written under a path built from its validated name.
        self._tmp = tempfile.TemporaryDirectory(prefix="prepare-dataset-")
        needed = {item.ref for item in items}
        with tarfile.open(self.images_tar, "r:*") as tar, tqdm(
                total=len(needed), desc=f"extract {self.images_tar.name}", unit="img",
                file=sys.stderr) as bar:
            for member in tar:
                name = _safe_member_name(member, self.images_tar)
                if member.isfile() and name in needed:
                    target = Path(self._tmp.name, *PurePosixPath(name).parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    bar.update(1)
        self.root = Path(self._tmp.name)

    def read(self, item: Item) -> bytes:
        assert self.root is not None
        return (self.root / item.ref).read_bytes()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class ImageFolderSource(Source):
    """One sub-folder per class; every file under it is a candidate image (decoded by content)."""

    format = "imagefolder"

    def __init__(self, root: Path):
        self.root = root
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise UserError(f"--source {root}: no class sub-folders (image folder layout: "
                            "<source>/<class name>/<image files>)")
        self.class_names = [p.name for p in class_dirs]
        self.has_split = False
        self.pre_skipped = [
            {"id": p.name, "file": p.name, "reason": "not inside a class sub-folder"}
            for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
        self.items = []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(p for p in class_dir.rglob("*")
                           if p.is_file() and not any(part.startswith(".")
                                                      for part in p.relative_to(root).parts))
            if not files:
                raise UserError(f"class folder {class_dir} is empty: every class needs images")
            for path in files:
                rel = path.relative_to(root).as_posix()
                self.items.append(Item(id=rel, label=label, split=None, ref=path, origin=rel))

    def read(self, item: Item) -> bytes:
        return Path(item.ref).read_bytes()


def _load_hf(config: PrepareDatasetConfig):
    """The dataset (or DatasetDict) --source names: a saved folder, a loadable folder, or a hub id."""
    import datasets  # heavy import (~2 s): only for this source

    path = Path(config.source)
    if not path.exists():
        if hub_id(config.source) is None:
            raise UserError(f"--source {config.source}: {NO_SUCH_SOURCE}")
        return _load_from_hub(config)
    is_saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    try:
        return (datasets.load_from_disk(str(path)) if is_saved
                else datasets.load_dataset(str(path), cache_dir=config.hf_cache_dir))
    except Exception as err:  # noqa: BLE001 - re-raised with the flag named
        raise UserError(f"--source {config.source}: could not load it as a Hugging Face "
                        f"dataset folder ({type(err).__name__}: {err})") from err


def _check_columns(config: PrepareDatasetConfig, features, split: str) -> None:
    import datasets

    for flag, column, kind in (("--image-column", config.image_column, datasets.Image),
                               ("--label-column", config.label_column, datasets.ClassLabel)):
        if column not in features:
            raise UserError(f"{flag} {column!r}: no such column in split {split!r} (columns: {list(features)})")
        if not isinstance(features[column], kind):
            raise UserError(f"{flag} {column!r} in split {split!r} is {features[column]}, "
                            f"not a datasets.{kind.__name__}")


class HFSource(Source):
    """A Hugging Face dataset with an Image column and a ClassLabel column."""

    format = "hf"

    def __init__(self, config: PrepareDatasetConfig):
        import datasets

        self.revision = config.revision
        loaded = _load_hf(config)
        single = isinstance(loaded, datasets.Dataset)  # a saved Dataset has no split names
        splits = {config.hf_train_split: loaded} if single else dict(loaded)
        wanted = {"train": config.hf_train_split}
        if config.hf_eval_split and not single:
            wanted["eval"] = config.hf_eval_split
        for ours, theirs in wanted.items():
            if theirs not in splits:
                flag = "--hf-train-split" if ours == "train" else "--hf-eval-split"
                raise UserError(f"{flag} {theirs!r}: no such split in {config.source} "
                                f"(splits: {sorted(splits)})")
        self.has_split = "eval" in wanted
        self.class_names, self.items, self.pre_skipped = [], [], []
        self._views: dict[str, Any] = {}
        self._lock = threading.Lock()  # Dataset row access is not documented as thread-safe
        self._image_column = config.image_column
        seen_ids: dict[str, str] = {}
        for ours, theirs in wanted.items():
            self._list_split(config, splits[theirs], ours, theirs, wanted["train"], seen_ids)

    def _list_split(self, config: PrepareDatasetConfig, ds, ours: str, theirs: str, train_name: str,
                    seen_ids: dict[str, str]) -> None:
        import datasets

        _check_columns(config, ds.features, theirs)
        names = list(ds.features[config.label_column].names)
        if self.class_names and names != self.class_names:
            raise UserError(f"--label-column {config.label_column!r}: split {theirs!r} has "
                            f"class names {names}, split {train_name!r} has {self.class_names}")
        self.class_names = names
        labels = list(ds[config.label_column])
        for row, label in enumerate(labels):
            if label is None or not 0 <= label < len(names):
                raise UserError(f"--label-column {config.label_column!r}: split {theirs!r} row "
                                f"{row} has label {label}, outside the class list 0..{len(names) - 1}")
        if config.id_column and config.id_column in ds.features:
            ids = [str(v) for v in ds[config.id_column]]
        else:
            ids = [f"{theirs}-{row:06d}" for row in range(len(labels))]
        for row, (image_id, label) in enumerate(zip(ids, labels)):
            if image_id in seen_ids:
                raise UserError(f"--id-column {config.id_column!r}: id {image_id!r} appears in "
                                f"{seen_ids[image_id]} and {theirs}[{row}]; give a unique "
                                "column or --id-column '' for '<split>-<row>' ids")
            seen_ids[image_id] = f"{theirs}[{row}]"
            self.items.append(Item(id=image_id, label=label, split=ours if self.has_split else None,
                                   ref=(ours, row), origin=f"{theirs}[{row}]"))
        # undecoded view: {"bytes", "path"} per row, so every source goes through one decoder
        self._views[ours] = ds.select_columns([config.image_column]).cast_column(
            config.image_column, datasets.Image(decode=False))

    def read(self, item: Item) -> bytes:
        split, row = item.ref
        with self._lock:
            value = self._views[split][row][self._image_column]
        if value is None:
            raise FileNotFoundError("no image in this row")
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]).read_bytes()


NO_SUCH_SOURCE = "no such folder; check the path (a Hugging Face dataset id has the form owner/name)"
HUB_TIMEOUT_S = 10  # one metadata request; the datasets library would retry for ~25 s instead


def _load_from_hub(config: PrepareDatasetConfig):
    """``datasets.load_dataset`` of an owner/name id that is no local folder, said on stderr first.

    Online, one quick metadata request comes first, so an unreachable Hub, a private or a missing
    dataset ends in seconds with one line instead of the datasets library's retries. Offline
    (HF_HUB_OFFLINE=1) the datasets cache answers, or fails at once.
    """
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, token = config.source, os.environ.get("HF_TOKEN") or None  # token: never logged or stored
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    print(f"--source {repo} is not a local folder: loading the Hugging Face dataset {repo} from "
          f"{endpoint}", file=sys.stderr)
    failed = f"--source {repo}: no such local folder, and the Hugging Face Hub could not serve it"
    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi(endpoint=endpoint, token=token or False).dataset_info(
                repo, revision=config.revision, timeout=HUB_TIMEOUT_S)
        except RevisionNotFoundError:
            raise UserError(f"--revision {config.revision}: no such revision of the Hugging Face "
                            f"dataset {repo}") from None
        except (RepositoryNotFoundError, GatedRepoError):
            private = "" if token else "; set HF_TOKEN for a private or gated one"
            raise UserError(f"{failed}: no such dataset, or no access{private}") from None
        except Exception as err:  # noqa: BLE001 - any failure of this one request: the Hub is out of reach
            raise UserError(f"{failed} (offline? {type(err).__name__}: {err})") from None
    try:
        loaded = datasets.load_dataset(repo, revision=config.revision, token=token,
                                       cache_dir=config.hf_cache_dir)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the flag
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{failed}: HF_HUB_OFFLINE is set and the datasets cache does not hold it") from err
        raise UserError(f"{failed} ({type(err).__name__}: {err})") from err
    if not config.revision:
        print(f"note: no --revision for {repo}: the hub's latest version is used and a later run "
              "may see other data; pin a commit sha to reproduce", file=sys.stderr)
    return loaded


def _split_pair(source: str) -> tuple[Path, Path] | None:
    """'IMAGES.tar.gz,ANNOTATIONS.tar.gz' -> (images, annotations) paths, else None."""
    if "," not in source:
        return None
    first, second = (Path(p.strip()) for p in source.split(",", 1))
    if "annotation" in first.name and "annotation" not in second.name:
        first, second = second, first
    return first, second


LAYOUTS = ("the official layout (images/ + annotations/, or images.tar.gz + annotations.tar.gz), "
           "one sub-folder per class, or a Hugging Face dataset folder")


def detect_format(source: str) -> str:
    path = Path(source)
    pair = _split_pair(source)
    if pair is not None:
        return "official"
    if path.is_dir():
        names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
        if not names:
            raise UserError(f"--source {source}: the folder is empty; expected {LAYOUTS}")
        if {"images", "annotations"} & names or {"images.tar.gz", "annotations.tar.gz"} <= names:
            return "official"
        if names & {"dataset_dict.json", "state.json", "dataset_info.json"} or any(
                p.suffix in (".parquet", ".arrow") for p in path.rglob("*") if p.is_file()):
            return "hf"
        return "imagefolder"
    if path.exists():
        raise UserError(f"--source {source}: a file, but sources are folders, two tarballs "
                        "'IMAGES.tar.gz,ANNOTATIONS.tar.gz', or Hugging Face dataset ids")
    if hub_id(source):
        return "hf"
    raise UserError(f"--source {source}: {NO_SUCH_SOURCE}")


def open_source(config: PrepareDatasetConfig) -> Source:
    fmt = detect_format(config.source) if config.source_format == "auto" else config.source_format
    if fmt == "hf":
        return HFSource(config)
    if fmt == "imagefolder":
        root = Path(config.source)
        if not root.is_dir():
            raise UserError(f"--source {root}: {NO_SUCH_SOURCE}")
        return ImageFolderSource(root)
    # official
    pair = _split_pair(config.source)
    root = Path(config.source)
    if pair is None and root.is_dir() and not (root / "annotations").exists() and (
            (root / "images.tar.gz").exists() or (root / "annotations.tar.gz").exists()):
        pair = root / "images.tar.gz", root / "annotations.tar.gz"
    if pair is not None:
        for tar_path in pair:
            if not tar_path.is_file():
                raise UserError(f"--source: missing official tarball {tar_path}")
        return OfficialSource(None, images_tar=pair[0], annotations_tar=pair[1])
    if not root.is_dir():
        raise UserError(f"--source {root}: {NO_SUCH_SOURCE}")
    return OfficialSource(root)


# ---------------------------------------------------------------------------------------------
# Decoding: by content, to RGB


class UnreadableImage(Exception):
    pass


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB; alpha composited on white, 16-bit scaled (not clipped) to 8-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        samples = np.asarray(img).astype(np.float64)
        # 16-bit: 0..65535 -> 0..255 (Pillow's convert would clip everything above 255 to
        # white). A 32-bit "I" image whose samples all fit in 8 bits is taken as 8-bit.
        scale = 1.0 if mode == "I" and samples.max(initial=0) <= 255 else 257.0
        return Image.fromarray(np.clip(np.round(samples / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        samples = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(samples), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def encode_rgb(data: bytes, image_format: str, jpeg_quality: int) -> tuple[bytes, str, bool]:
    """(stored bytes, source mode, original kept?) for one file; UnreadableImage if it won't decode."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated file fails here, not later in training
            source_format, source_mode = img.format, img.mode
            if image_format == "jpeg" and source_format == "JPEG" and source_mode == "RGB":
                return data, source_mode, True
            rgb = to_rgb(img)
    except UnidentifiedImageError:
        # (Pillow's own message carries a memory address: not reproducible in a manifest)
        raise UnreadableImage("cannot decode: not a recognised image format") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
        raise UnreadableImage(f"cannot decode: {type(err).__name__}: {err}") from None
    buf = io.BytesIO()
    if image_format == "jpeg":
        rgb.save(buf, "JPEG", quality=jpeg_quality)
    else:
        rgb.save(buf, "PNG", compress_level=3)  # level 3: most of level 9's size at a fraction of its time
    return buf.getvalue(), source_mode, False


# ---------------------------------------------------------------------------------------------
# Splits and stratified subsets


SPLIT_STREAM = {"train": 1, "eval": 2, "resplit": 3, "order-train": 4, "order-eval": 5}


def _rng(seed: int, stream: str, *extra: int) -> np.random.Generator:
    """Independent seeded stream per purpose, so e.g. the class filter never shifts a subset."""
    return np.random.default_rng([seed, SPLIT_STREAM[stream], *extra])


def _ranked(items: list[Item], seed: int, stream: str, label: int) -> list[Item]:
    """``items`` (one class) in a seeded order that does not depend on listing order."""
    ordered = sorted(items, key=lambda item: item.id)
    return [ordered[i] for i in _rng(seed, stream, label).permutation(len(ordered))]


def stratified_quotas(available: list[int], total: int | None) -> list[int]:
    """Per-class counts summing to ``total``, proportional to ``available``, at least 1 each.

    Largest-remainder rounding (ties to the lower class index), never above ``available``;
    a class rounded down to 0 takes one from the largest quota. ``total=None``: everything.
    """
    if total is None:
        return list(available)
    assert len(available) <= total <= sum(available) and min(available) >= 1
    exact = [total * count / sum(available) for count in available]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    for i, quota in enumerate(quotas):
        if quota == 0:
            donor = max(range(len(quotas)), key=lambda k: (quotas[k], -k))
            quotas[donor] -= 1
            quotas[i] = 1
    return quotas


def resplit_items(items: list[Item], labels: list[int], class_names: list[str], eval_fraction: float,
                  seed: int) -> dict[str, list[Item]]:
    """Stratified train/eval split: about eval_fraction of each class, at least one each side."""
    out: dict[str, list[Item]] = {"train": [], "eval": []}
    for label in labels:
        members = _ranked([it for it in items if it.label == label], seed, "resplit", label)
        if len(members) < 2:
            raise UserError(f"class {class_names[label]!r} has {len(members)} example(s); "
                            "re-splitting needs >= 2 per class (one for train, one for eval)")
        n_eval = min(max(round(len(members) * eval_fraction), 1), len(members) - 1)
        out["eval"] += members[:n_eval]
        out["train"] += members[n_eval:]
    return out


# ---------------------------------------------------------------------------------------------
# The step


def _select_classes(source: Source, config: PrepareDatasetConfig) -> list[int]:
    """Source label indices kept, in source order."""
    present = sorted({item.label for item in source.items})
    if source.format != "official":
        # image folders reject empty folders while listing; here: a ClassLabel name nobody uses
        empty = [source.class_names[i] for i in range(len(source.class_names)) if i not in present]
        chosen_names = set(config.classes) if config.classes else None
        if chosen_names is not None:
            empty = [name for name in empty if name in chosen_names]
        elif config.num_classes is not None:
            empty = [name for name in empty if source.class_names.index(name) < config.num_classes]
        if empty:
            raise UserError(f"class(es) {empty} of --source {config.source} have no examples")
        present = list(range(len(source.class_names)))
    if config.classes:
        names = [source.class_names[i] for i in present]
        unknown = [name for name in config.classes if name not in names]
        if unknown:
            raise UserError(f"--classes {unknown}: not in the source's classes {names}")
        return [i for i in present if source.class_names[i] in set(config.classes)]
    if config.num_classes is not None:
        if config.num_classes > len(present):
            raise UserError(f"--num-classes {config.num_classes} is larger than the "
                            f"{len(present)} classes of --source {config.source}")
        return present[: config.num_classes]
    if len(present) < MIN_CLASSES:
        names = [source.class_names[i] for i in present]
        raise UserError(f"--source {config.source} has {len(present)} class(es) {names}; "
                        f"at least {MIN_CLASSES} are needed ({WHY_TWO_CLASSES})")
    return present


def plan_splits(source: Source, config: PrepareDatasetConfig, kept: list[int]) -> dict[str, list[Item]]:
    items = [item for item in source.items if item.label in set(kept)]
    if source.has_split and not config.resplit:
        splits = {split: [item for item in items if item.split == split] for split in SPLITS}
    else:
        splits = resplit_items(items, kept, source.class_names, config.eval_fraction, config.seed)
    for split in SPLITS:
        counts = Counter(item.label for item in splits[split])
        empty = [source.class_names[label] for label in kept if counts[label] == 0]
        if empty:
            where = SPLIT_FILES[split] if source.format == "official" else f"the {split} split"
            raise UserError(f"class(es) {empty} have no examples in {where} of --source {config.source}")
        size = config.train_size if split == "train" else config.eval_size
        if size is not None:
            flag = f"--{split}-size"
            if size > len(splits[split]):
                raise UserError(f"{flag} {size} is larger than the {len(splits[split])} {split} "
                                f"examples of --source {config.source} (after the class filter)")
            if size < len(kept):
                raise UserError(f"{flag} {size} is smaller than the {len(kept)} classes: "
                                "a stratified subset needs at least one example per class")
    return splits


def _decode_all(source: Source, splits: dict[str, list[Item]], config: PrepareDatasetConfig, kept: list[int]):
    """Decode exactly the examples to keep: seeded stratified picks, replacing unreadable ones.

    Per class, examples are taken in a seeded rank order; a pick that does not decode is
    skipped and the quotas are recomputed from what is left, until every quota is met by
    readable files. The outcome depends only on the seed and the data, not on thread timing.
    """
    ranked = {(split, label): _ranked([it for it in splits[split] if it.label == label],
                                      config.seed, split, label)
              for split in SPLITS for label in kept}
    bad: dict[tuple[str, int], set[str]] = {key: set() for key in ranked}
    done: dict[str, tuple[bytes, str, bool]] = {}
    skipped: list[dict] = []
    # cores this process may use (a container's CPU set, not the host's core count; Linux)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = config.num_workers or usable or 1

    def process(item: Item):
        try:
            return encode_rgb(source.read(item), config.image_format, config.jpeg_quality)
        except FileNotFoundError:
            return UnreadableImage("file not found")
        except UnreadableImage as err:
            return err

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            desc="decode", unit="img", total=0, file=sys.stderr) as bar:
        while True:
            chosen: dict[str, list[Item]] = {}
            for split in SPLITS:
                size = config.train_size if split == "train" else config.eval_size
                available = [len(ranked[split, label]) - len(bad[split, label]) for label in kept]
                for label, count in zip(kept, available):
                    if count == 0:
                        reasons = Counter(e["reason"] for e in skipped if e["id"] in bad[split, label])
                        raise UserError(
                            f"class {source.class_names[label]!r} has no readable image in the {split} "
                            f"split: all {len(bad[split, label])} unreadable ("
                            + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
                            + f"); {len(skipped)} file(s) skipped so far, e.g. {skipped[0]['file']}")
                if size is not None and size > sum(available):
                    raise UserError(f"--{split}-size {size}: only {sum(available)} readable {split} "
                                    f"examples remain after skipping unreadable files")
                quotas = stratified_quotas(available, size)
                chosen[split] = []
                for label, quota in zip(kept, quotas):
                    good = [it for it in ranked[split, label] if it.id not in bad[split, label]]
                    chosen[split] += good[:quota]
            todo = [(split, it) for split in SPLITS for it in chosen[split] if it.id not in done]
            if not todo:
                return chosen, done, skipped
            bar.total += len(todo)
            bar.refresh()
            for (split, item), result in zip(todo, pool.map(process, [it for _, it in todo])):
                bar.update(1)
                if isinstance(result, UnreadableImage):
                    bad[split, item.label].add(item.id)
                    skipped.append({"id": item.id, "file": item.origin, "reason": str(result)})
                else:
                    done[item.id] = result


def _shard_bytes(rows: list[tuple[Item, bytes]], class_names: list[str], remap: dict[int, int]) -> bytes:
    table = pa.table({
        "id": pa.array([item.id for item, _ in rows], pa.string()),
        "image": pa.array([data for _, data in rows], pa.binary()),
        "label": pa.array([remap[item.label] for item, _ in rows], pa.int64()),
        "label_name": pa.array([class_names[remap[item.label]] for item, _ in rows], pa.string()),
    }).replace_schema_metadata({"gemma_pets.class_names": json.dumps(class_names)})
    buf = io.BytesIO()
    # images are already compressed: compressing them again costs time and saves nothing
    pq.write_table(table, buf, compression={"id": "zstd", "image": "none", "label": "zstd",
                                            "label_name": "zstd"})
    return buf.getvalue()


def _check_output(config: PrepareDatasetConfig) -> Path:
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output-dir {output} is a file, not a folder")
    source = Path(config.source)
    if source.is_dir() and output.resolve().is_relative_to(source.resolve()):
        raise UserError(f"--output-dir {output} is inside --source {source}; it would be read as data")
    return output


def _local_source(source: str) -> str:
    """'~' expanded, and gs:// URIs in --source (one, or a comma pair) -> Vertex AI's Cloud
    Storage FUSE paths."""
    source = ",".join(os.path.expanduser(part.strip()) if part.strip().startswith("~") else part
                      for part in source.split(","))
    if "gs://" not in source:
        return source
    from components import gcs  # google-cloud-storage import: only when needed

    if not Path(gcs.FUSE_ROOT).is_dir():
        raise UserError(f"--source {source}: gs:// sources are read through the Cloud "
                        f"Storage FUSE mount {gcs.FUSE_ROOT}/ (as on Vertex AI), which is "
                        "not mounted here; copy the data to a local folder instead")
    return ",".join(gcs.fuse_path(part.strip()) if gcs.is_gcs(part.strip()) else part
                    for part in source.split(","))


def _dataset_options(config: PrepareDatasetConfig, given_source: str) -> dict[str, Any]:
    """The options that define the dataset: a rerun that matches them may reuse it."""
    options = {**asdict(config), "source": given_source}
    return {k: v for k, v in options.items() if k not in RUN_ONLY_OPTIONS}


def _reusable(output: Path, config: PrepareDatasetConfig, options: dict[str, Any]) -> dict | None:
    """The manifest of ``output`` when it already holds this very dataset, intact; None when
    there is none (or --overwrite); UserError when it holds another one."""
    path = output / DATASET_MANIFEST
    if not path.is_file():
        return None  # nothing there, or an unfinished run (its manifest goes first): rebuilt
    try:
        manifest = read_json(path)
    except ValueError:
        manifest = None
    if config.overwrite:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise UserError(f"--output-dir {output}: holds a {DATASET_MANIFEST} that prepare-dataset did "
                        "not write; choose another --output-dir (or --overwrite)")
    old = {k: v for k, v in manifest.get("options", {}).items() if k not in RUN_ONLY_OPTIONS}
    changed = [k for k in sorted(set(old) | set(options)) if old.get(k) != options.get(k)]
    if changed:
        diff = "; ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {options.get(k)!r}" for k in changed)
        raise UserError(f"--output-dir {output} already holds a dataset prepared with other options "
                        f"({diff}); pass --overwrite to replace it, or choose another --output-dir")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            file = output / shard["file"]
            if not file.is_file() or sha256_file(file) != shard["sha256"]:
                return None  # damaged: rebuilt
    return manifest


def _clear_output(output: Path) -> None:
    """Remove the old dataset and what an interrupted run left behind, manifest first."""
    output.mkdir(parents=True, exist_ok=True)
    # from here until the new manifest lands the folder reads as incomplete
    (output / DATASET_MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        # shards, and files.write_bytes_atomic's temporaries ('.<name>.<random>.tmp') of a killed run
        for stale in [*output.glob(f"{split}-*-of-*.parquet"), *output.glob(f".{split}-*-of-*.parquet.*.tmp")]:
            stale.unlink()
    for stale in output.glob(f".{DATASET_MANIFEST}.*.tmp"):
        stale.unlink()


def _write_shards(output: Path, config: PrepareDatasetConfig, chosen: dict[str, list[Item]],
                  decoded: dict, class_names: list[str], remap: dict[int, int]) -> dict[str, Any]:
    split_info: dict[str, Any] = {}
    for split in SPLITS:
        picked = sorted(chosen[split], key=lambda item: item.id)
        order = _rng(config.seed, f"order-{split}").permutation(len(picked))
        rows = [(picked[i], decoded[picked[i].id][0]) for i in order]
        n_shards = max(1, math.ceil(len(rows) / config.examples_per_shard))
        shards = []
        for index in tqdm(range(n_shards), desc=f"write {split}", unit="shard", file=sys.stderr):
            part = rows[index * config.examples_per_shard:(index + 1) * config.examples_per_shard]
            data = _shard_bytes(part, class_names, remap)
            name = f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
            write_bytes_atomic(output / name, data)
            shards.append({"file": name, "sha256": sha256_bytes(data), "num_examples": len(part),
                           "num_bytes": len(data)})
        per_class = Counter(remap[item.label] for item, _ in rows)
        split_info[split] = {"num_examples": len(rows),
                             "per_class": {name: per_class[i] for i, name in enumerate(class_names)},
                             "shards": shards}
    return split_info


def run(config: PrepareDatasetConfig) -> dict[str, Any]:
    """Prepare the dataset; returns the manifest written to ``output_dir/manifest.json``."""
    start = time.perf_counter()
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half grey
    given_source = config.source
    config = dataclasses.replace(config, source=_local_source(config.source))
    output = _check_output(config)
    options = _dataset_options(config, given_source)
    existing = _reusable(output, config, options)
    if existing is not None:
        print(f"{output} already holds this dataset (same options, shards intact); nothing to do "
              "(--overwrite rebuilds it, e.g. after the source's files changed)")
        return existing
    source = open_source(config)
    try:
        kept = _select_classes(source, config)
        class_names = [source.class_names[i] for i in kept]
        remap = {label: new for new, label in enumerate(kept)}
        splits = plan_splits(source, config, kept)
        source.fetch([item for split in SPLITS for item in splits[split]])
        chosen, decoded, skipped = _decode_all(source, splits, config, kept)
    finally:
        source.close()
    skipped = source.pre_skipped + skipped

    # ---- everything is read and valid: only now touch the output folder ----
    _clear_output(output)
    split_info = _write_shards(output, config, chosen, decoded, class_names, remap)
    used = [decoded[item.id] for split in SPLITS for item in chosen[split]]
    converted = Counter(mode for _, mode, kept_original in used if mode != "RGB")
    manifest = {
        "format": DATASET_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "class_names": class_names,
        "num_classes": len(class_names),
        "splits": split_info,
        "source": {"source": given_source, "format": source.format, "revision": source.revision,
                   "split": "source" if source.has_split and not config.resplit else "resplit"},
        "seed": config.seed,
        "options": {**asdict(config), "source": given_source},
        "image_encoding": {"format": config.image_format, "jpeg_quality": config.jpeg_quality,
                           "original_bytes_kept": sum(1 for _, _, k in used if k),
                           "converted_to_rgb_by_mode": dict(sorted(converted.items()))},
        "num_skipped": len(skipped),
        "skipped": skipped,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(output / DATASET_MANIFEST, manifest)  # last: marks the folder complete
    print(f"prepared {split_info['train']['num_examples']} train + {split_info['eval']['num_examples']} "
          f"eval examples of {len(class_names)} classes from {source.format} source in "
          f"{manifest['elapsed_s']:.1f} s -> {output}")
    if converted:
        print("converted to RGB: " + ", ".join(f"{mode} x{n}" for mode, n in sorted(converted.items())))
    print(f"skipped {len(skipped)} file(s)" + (" (listed in manifest.json):" if skipped else ""))
    for entry in skipped[:20]:
        print(f"  {entry['file']}: {entry['reason']}")
    return manifest


@entrypoint
def main(argv: list[str] | None = None) -> int:
    run(parse_config(PrepareDatasetConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
