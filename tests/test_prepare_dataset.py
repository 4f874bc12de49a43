"""prepare-dataset: every source kind, conversions, skips, errors before writing, subsets, shards.

The Hugging Face source is tested with local folders only (a ``save_to_disk`` folder and a
folder of Parquet files carrying ClassLabel features): there is no hub here.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import prepare_dataset, shards, synthetic_pets
from components.cli import UserError
from components.prepare_dataset import PrepareDatasetConfig, encode_rgb, stratified_quotas

CLASSES4 = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound"]


@pytest.fixture(scope="module")
def raw_pets(tmp_path_factory) -> Path:
    """4 classes x 6 images (3 trainval + 3 test each), official layout, 48 px."""
    root = tmp_path_factory.mktemp("raw") / "pets"
    synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(output_dir=str(root), num_classes=4, images_per_class=6,
                                             image_size=48, seed=0))
    return root


@pytest.fixture
def pets_copy(raw_pets, tmp_path) -> Path:
    """A private copy of the raw set that a test may damage."""
    return Path(shutil.copytree(raw_pets, tmp_path / "pets"))


def prepare(source, out, **options) -> dict:
    return prepare_dataset.run(PrepareDatasetConfig(source=str(source), output_dir=str(out), **options))


def jpeg_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def image_bytes(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def official_names(root: Path, filename: str) -> set[str]:
    text = (root / "annotations" / filename).read_text()
    return {line.split()[0] for line in text.splitlines() if line and not line.startswith("#")}


# ---------------------------------------------------------------------------------------------
# Official layout


def test_official_folder_keeps_split_and_writes_verified_shards(raw_pets, tmp_path):
    manifest = prepare(raw_pets, tmp_path / "out", examples_per_shard=5)
    assert manifest["class_names"] == CLASSES4
    assert manifest["source"] == {"source": str(raw_pets), "format": "official", "revision": None,
                                  "split": "source"}
    assert manifest["splits"]["train"]["num_examples"] == 12
    assert manifest["splits"]["train"]["per_class"] == {name: 3 for name in CLASSES4}
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert manifest["skipped"] == [] and manifest["seed"] == 0
    assert manifest["options"]["examples_per_shard"] == 5
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]

    train = shards.load_examples(tmp_path / "out", "train")
    evals = shards.load_examples(tmp_path / "out", "eval")
    assert {e.id for e in train} == official_names(raw_pets, "trainval.txt")
    assert {e.id for e in evals} == official_names(raw_pets, "test.txt")
    for example in train + evals:
        assert example.label_name == CLASSES4[example.label]
        assert example.id.rsplit("_", 1)[0] == example.label_name
        assert example.image().mode == "RGB"
    # source JPEGs that already are RGB are stored byte for byte
    first = train[0]
    assert first.image_bytes == (raw_pets / "images" / f"{first.id}.jpg").read_bytes()
    schema = pq.read_schema(tmp_path / "out" / "train-00000-of-00003.parquet")
    assert schema.names == ["id", "image", "label", "label_name"]
    assert shards.load_examples(tmp_path / "out", "train", limit=7) == train[:7]


def test_same_seed_same_shards_other_seed_other_order(raw_pets, tmp_path):
    a = prepare(raw_pets, tmp_path / "a", seed=1)
    b = prepare(raw_pets, tmp_path / "b", seed=1)
    c = prepare(raw_pets, tmp_path / "c", seed=2)
    sha = lambda m: [s["sha256"] for split in ("train", "eval") for s in m["splits"][split]["shards"]]
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)  # same examples, other shuffled row order


@pytest.mark.parametrize("missing", ["list.txt", "trainval.txt", "test.txt"])
def test_missing_annotation_file_errors_before_writing(pets_copy, tmp_path, missing):
    (pets_copy / "annotations" / missing).unlink()
    with pytest.raises(UserError, match=missing):
        prepare(pets_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_id_outside_the_class_list_errors_before_writing(pets_copy, tmp_path):
    path = pets_copy / "annotations" / "list.txt"
    lines = path.read_text().splitlines()
    assert lines[7] == "Abyssinian_2 1 1 1"  # line 8: 6 header lines, then Abyssinian_1
    lines[7] = "Abyssinian_2 40 1 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list\.txt:8: CLASS-ID 40 is outside the class list"):
        prepare(pets_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_left_empty_errors_before_writing(pets_copy, tmp_path):
    path = pets_copy / "annotations" / "test.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if not line.startswith("basset_hound_")))
    with pytest.raises(ValueError, match=r"basset_hound.*test\.txt"):
        prepare(pets_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("train_size", 13), ("eval_size", 100)])
def test_requested_size_larger_than_available_errors_before_writing(raw_pets, tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} {value} is larger than the 12"):
        prepare(raw_pets, tmp_path / "out", **{flag: value})
    assert not (tmp_path / "out").exists()


def test_split_file_disagreeing_with_list_txt_errors(pets_copy, tmp_path):
    path = pets_copy / "annotations" / "trainval.txt"
    path.write_text(path.read_text() + "Abyssinian_99 1 1 1\n")  # not in list.txt
    with pytest.raises(ValueError, match=r"trainval\.txt: 'Abyssinian_99'"):
        prepare(pets_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_image_file_is_skipped_and_listed(pets_copy, tmp_path, capsys):
    victim = sorted(official_names(pets_copy, "trainval.txt"))[0]
    (pets_copy / "images" / f"{victim}.jpg").unlink()
    manifest = prepare(pets_copy, tmp_path / "out")
    assert manifest["skipped"] == [{"id": victim, "file": f"images/{victim}.jpg", "reason": "file not found"}]
    assert manifest["splits"]["train"]["num_examples"] == 11
    assert "skipped 1 file(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Tarballs


def _tarballs_of(root: Path, dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "images.tar.gz", "w:gz") as tar:
        tar.add(root / "images", arcname="images")
    with tarfile.open(dest / "annotations.tar.gz", "w:gz") as tar:
        tar.add(root / "annotations", arcname="annotations")
    return dest / "images.tar.gz", dest / "annotations.tar.gz"


def test_tarball_sources_match_the_folder_source(raw_pets, tmp_path):
    images, annotations = _tarballs_of(raw_pets, tmp_path / "tars")
    folder = prepare(raw_pets, tmp_path / "from-folder")
    from_dir = prepare(tmp_path / "tars", tmp_path / "from-dir")
    from_pair = prepare(f"{annotations},{images}", tmp_path / "from-pair")  # any order
    for manifest in (from_dir, from_pair):
        assert manifest["source"]["format"] == "official"
        assert manifest["splits"] == folder["splits"]  # same shard bytes (sha256) as the folder
    generated = synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(
        output_dir=str(tmp_path / "gen"), num_classes=4, images_per_class=6, image_size=48, layout="tarballs"))
    assert prepare(generated, tmp_path / "from-gen")["splits"] == folder["splits"]


@pytest.mark.parametrize("evil", ["../escape.jpg", "/tmp/abs.jpg", "link"])
def test_tarball_with_unsafe_member_is_refused(raw_pets, tmp_path, evil):
    _, annotations = _tarballs_of(raw_pets, tmp_path / "tars")
    with tarfile.open(tmp_path / "tars" / "images.tar.gz", "w:gz") as tar:
        tar.add(raw_pets / "images", arcname="images")
        info = tarfile.TarInfo(evil)
        if evil == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            data = b"not really"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="unsafe member path|is a link"):
        prepare(tmp_path / "tars", tmp_path / "out")
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "out").exists()


def test_annotations_tarball_without_split_file_errors(raw_pets, tmp_path):
    images, _ = _tarballs_of(raw_pets, tmp_path / "tars")
    with tarfile.open(tmp_path / "tars" / "annotations.tar.gz", "w:gz") as tar:
        tar.add(raw_pets / "annotations" / "list.txt", arcname="annotations/list.txt")
        tar.add(raw_pets / "annotations" / "trainval.txt", arcname="annotations/trainval.txt")
    with pytest.raises(UserError, match=r"annotations/test\.txt"):
        prepare(tmp_path / "tars", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Image modes and unreadable files


def _rgb_pixel(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB"
        return img.getpixel((4, 4))


CONVERSIONS = {
    # mode: (image bytes, expected RGB at the centre)
    "L": (jpeg_bytes(Image.new("L", (8, 8), 128)), (128, 128, 128)),
    "RGBA": (image_bytes(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),  # transparent -> white
    "RGBA-opaque": (image_bytes(Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "PNG"), (0, 0, 255)),
    "P": (image_bytes(Image.new("RGB", (8, 8), (0, 255, 0)).convert("P"), "PNG"), (0, 255, 0)),
    "CMYK": (jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100), (255, 0, 0)),
    "I;16": (image_bytes(Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG"), (128, 128, 128)),
    "LA": (image_bytes(Image.new("LA", (8, 8), (0, 255)), "PNG"), (0, 0, 0)),
}


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_each_mode_becomes_rgb(name):
    data, expected = CONVERSIONS[name]
    stored, source_mode, kept = encode_rgb(data, "jpeg", 95)
    assert source_mode == name.split("-")[0] and not kept
    assert np.allclose(_rgb_pixel(stored), expected, atol=6)  # JPEG q95 moves a flat colour by a few levels
    png, _, _ = encode_rgb(data, "png", 95)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert np.allclose(_rgb_pixel(png), expected, atol=6 if name in ("L", "CMYK") else 0)


def _imagefolder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _good(colour) -> bytes:
    return jpeg_bytes(Image.new("RGB", (16, 16), colour))


def _noisy_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return jpeg_bytes(Image.fromarray(pixels))


def test_unreadable_files_are_skipped_and_listed_decodable_misnamed_kept(tmp_path, capsys):
    png = image_bytes(Image.new("RGB", (16, 16), "blue"), "PNG")
    gif = image_bytes(Image.new("RGB", (16, 16), "red").convert("P"), "GIF")
    bad = {
        "cat/zero.jpg": (b"", "empty file"),
        "cat/truncated.jpg": (_noisy_jpeg()[:-2000], "truncated"),
        "cat/notes.jpg": (b"this is not an image\n" * 20, "not a recognised image format"),
        "cat/broken_png.jpg": (png[:60], "cannot decode"),
        "cat/broken_gif.jpg": (gif[:20], "cannot decode"),
    }
    files = {rel: data for rel, (data, _) in bad.items()}
    files |= {f"cat/ok{i}.jpg": _good("red") for i in range(3)}
    files |= {f"dog/ok{i}.jpg": _good("green") for i in range(3)}
    files |= {"dog/real_png.jpg": png, "dog/real_gif.jpg": gif}  # decode by content: kept
    root = _imagefolder(tmp_path / "folder", files)
    manifest = prepare(root, tmp_path / "out", eval_fraction=0.3)
    skipped = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == set(bad)
    for rel, (_, reason) in bad.items():
        assert reason in skipped[rel], (rel, skipped[rel])
    counts = {split: manifest["splits"][split]["per_class"] for split in ("train", "eval")}
    assert counts["train"]["cat"] + counts["eval"]["cat"] == 3
    assert counts["train"]["dog"] + counts["eval"]["dog"] == 5
    assert manifest["image_encoding"]["converted_to_rgb_by_mode"] == {"P": 1}  # the real GIF
    out = capsys.readouterr().out
    assert "skipped 5 file(s)" in out


def test_mode_conversions_end_to_end(tmp_path):
    files = {f"odd/{name}.jpg": data for name, (data, _) in CONVERSIONS.items()}
    files |= {f"plain/{i}.jpg": _good("red") for i in range(4)}
    manifest = prepare(_imagefolder(tmp_path / "folder", files), tmp_path / "out", eval_fraction=0.5)
    assert manifest["image_encoding"]["converted_to_rgb_by_mode"] == {
        "CMYK": 1, "I;16": 1, "L": 1, "LA": 1, "P": 1, "RGBA": 2}
    examples = shards.load_examples(tmp_path / "out", "train") + shards.load_examples(tmp_path / "out", "eval")
    assert len(examples) == 11
    for example in examples:
        assert Image.open(io.BytesIO(example.image_bytes)).mode == "RGB"
        if example.id.startswith("odd/"):
            expected = CONVERSIONS[example.id[len("odd/"):-len(".jpg")]][1]
            assert np.allclose(example.image().getpixel((4, 4)), expected, atol=6)


# ---------------------------------------------------------------------------------------------
# Image folder source


def test_imagefolder_source_resplits_stratified(tmp_path):
    files = {f"{name}/{i:02d}.jpg": _good(colour) for name, colour in
             (("zebra", "white"), ("ant", "black"), ("moth", "grey")) for i in range(10)}
    files["README.txt"] = b"not a class"
    (tmp_path / "folder" / ".cache").mkdir(parents=True)
    root = _imagefolder(tmp_path / "folder", files)
    manifest = prepare(root, tmp_path / "out", eval_fraction=0.3, seed=5)
    assert manifest["class_names"] == ["ant", "moth", "zebra"]  # sorted sub-folder names
    assert manifest["source"]["format"] == "imagefolder" and manifest["source"]["split"] == "resplit"
    assert manifest["splits"]["eval"]["per_class"] == {"ant": 3, "moth": 3, "zebra": 3}
    assert manifest["splits"]["train"]["per_class"] == {"ant": 7, "moth": 7, "zebra": 7}
    assert manifest["skipped"] == [{"id": "README.txt", "file": "README.txt",
                                    "reason": "not inside a class sub-folder"}]
    prepare(root, tmp_path / "again", eval_fraction=0.3, seed=5)
    prepare(root, tmp_path / "seed6", eval_fraction=0.3, seed=6)
    eval_ids = {name: sorted(e.id for e in shards.load_examples(tmp_path / name, "eval"))
                for name in ("out", "again", "seed6")}
    assert eval_ids["out"] == eval_ids["again"] and eval_ids["out"] != eval_ids["seed6"]
    for example in shards.load_examples(tmp_path / "out", "train"):
        assert example.label_name == example.id.split("/")[0]


def test_imagefolder_empty_class_folder_errors_before_writing(tmp_path):
    root = _imagefolder(tmp_path / "folder", {"a/1.jpg": _good("red"), "a/2.jpg": _good("red")})
    (root / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*b is empty"):
        prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_inside_source_is_refused(tmp_path):
    root = _imagefolder(tmp_path / "folder", {"a/1.jpg": _good("red"), "b/1.jpg": _good("blue")})
    with pytest.raises(ValueError, match="inside --source"):
        prepare(root, root / "prepared")


# ---------------------------------------------------------------------------------------------
# Hugging Face source (local folders only: there is no hub here)


def _hf_dataset(rows_per_class: int, names=("cat", "dog", "fox"), labels=None):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names)),
                                  "image_id": datasets.Value("string")})
    colours = ["red", "green", "blue", "white"]
    labels = labels if labels is not None else [c for c in range(len(names)) for _ in range(rows_per_class)]
    return datasets.Dataset.from_dict({
        "image": [{"bytes": _good(colours[label % 4]), "path": None} for label in labels],
        "label": labels,
        "image_id": [f"img{i:03d}" for i in range(len(labels))],
    }, features=features)


def test_hf_saved_to_disk_source(tmp_path):
    import datasets

    train = _hf_dataset(4)
    test = _hf_dataset(2).map(lambda row: {"image_id": "t" + row["image_id"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    manifest = prepare(tmp_path / "saved", tmp_path / "out", revision="abc123")
    assert manifest["source"] == {"source": str(tmp_path / "saved"), "format": "hf", "revision": "abc123",
                                  "split": "source"}
    assert manifest["class_names"] == ["cat", "dog", "fox"]
    assert manifest["splits"]["train"]["per_class"] == {"cat": 4, "dog": 4, "fox": 4}
    assert manifest["splits"]["eval"]["per_class"] == {"cat": 2, "dog": 2, "fox": 2}
    examples = shards.load_examples(tmp_path / "out", "eval")
    assert sorted(e.id for e in examples) == [f"timg{i:03d}" for i in range(6)]
    colours = {"cat": (255, 0, 0), "dog": (0, 128, 0), "fox": (0, 0, 255)}  # red, green, blue
    for example in examples:
        assert np.allclose(example.image().getpixel((8, 8)), colours[example.label_name], atol=4)


def test_hf_parquet_folder_via_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    _hf_dataset(5).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    manifest = prepare(tmp_path / "hub", tmp_path / "out", hf_eval_split="", eval_fraction=0.4,
                       hf_cache_dir=str(tmp_path / "cache"), train_size=6)
    assert manifest["source"]["format"] == "hf" and manifest["source"]["split"] == "resplit"
    assert manifest["splits"]["eval"]["per_class"] == {"cat": 2, "dog": 2, "fox": 2}
    assert manifest["splits"]["train"]["per_class"] == {"cat": 2, "dog": 2, "fox": 2}
    assert "hf_secret_token_value" not in (tmp_path / "out" / "manifest.json").read_text()


def test_hf_label_outside_class_list_errors_before_writing(tmp_path):
    import datasets
    import pyarrow as pa

    good = _hf_dataset(2)
    table = good.data.table.set_column(1, "label", pa.array([0, 1, 2, 5, 0, 1], pa.int64()))
    bad = datasets.Dataset(table, info=datasets.DatasetInfo(features=good.features))
    bad.save_to_disk(str(tmp_path / "bad"))  # a single Dataset: no eval split, re-split
    with pytest.raises(ValueError, match=r"--label-column 'label': split 'train' row 3 has label 5"):
        prepare(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_errors_name_the_flag(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(2)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="--hf-eval-split 'test': no such split"):
        prepare(tmp_path / "saved", tmp_path / "out")
    with pytest.raises(ValueError, match="--label-column 'image_id'.*not a datasets.ClassLabel"):
        prepare(tmp_path / "saved", tmp_path / "out", hf_eval_split="", label_column="image_id")
    _hf_dataset(2, names=("cat", "dog", "fox", "owl"), labels=[0, 0, 1, 1, 2, 2]).save_to_disk(
        str(tmp_path / "unused-class"))
    with pytest.raises(ValueError, match=r"\['owl'\].*no examples"):
        prepare(tmp_path / "unused-class", tmp_path / "out", hf_eval_split="")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Subsets, class filters, rewrites


def test_stratified_quotas():
    assert stratified_quotas([10, 10, 10], 6) == [2, 2, 2]
    assert stratified_quotas([30, 10, 10], 10) == [6, 2, 2]
    assert stratified_quotas([3, 3, 3], 4) == [2, 1, 1]  # remainder to the lowest class index
    assert stratified_quotas([5, 1, 5], 11) == [5, 1, 5]
    assert stratified_quotas([5, 1], None) == [5, 1]
    assert stratified_quotas([100, 1, 1], 3) == [1, 1, 1]  # every class keeps one
    assert stratified_quotas([100, 2, 1], 10) == [8, 1, 1]


def test_subsets_are_stratified_and_seeded(raw_pets, tmp_path):
    ids = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        manifest = prepare(raw_pets, tmp_path / name, train_size=8, eval_size=4, seed=seed)
        assert manifest["splits"]["train"]["per_class"] == {c: 2 for c in CLASSES4}
        assert manifest["splits"]["eval"]["per_class"] == {c: 1 for c in CLASSES4}
        ids[name] = sorted(e.id for e in shards.load_examples(tmp_path / name, "train"))
        assert set(ids[name]) <= official_names(raw_pets, "trainval.txt")
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    with pytest.raises(ValueError, match="--train-size 3 is smaller than the 4 classes"):
        prepare(raw_pets, tmp_path / "d", train_size=3)


def test_unreadable_pick_in_a_subset_is_replaced(pets_copy, raw_pets, tmp_path):
    prepare(raw_pets, tmp_path / "ref", train_size=4)
    chosen = sorted(e.id for e in shards.load_examples(tmp_path / "ref", "train"))
    (pets_copy / "images" / f"{chosen[0]}.jpg").write_bytes(b"")
    manifest = prepare(pets_copy, tmp_path / "out", train_size=4)
    assert manifest["splits"]["train"]["per_class"] == {c: 1 for c in CLASSES4}
    assert [s["id"] for s in manifest["skipped"]] == [chosen[0]]
    replaced = sorted(e.id for e in shards.load_examples(tmp_path / "out", "train"))
    assert chosen[0] not in replaced and set(chosen[1:]) <= set(replaced)


def test_class_filters_keep_labels_contiguous(raw_pets, tmp_path):
    manifest = prepare(raw_pets, tmp_path / "n", num_classes=2)
    assert manifest["class_names"] == CLASSES4[:2]
    manifest = prepare(raw_pets, tmp_path / "c", classes=["basset_hound,american_bulldog"])
    assert manifest["class_names"] == ["american_bulldog", "basset_hound"]  # source order
    labels = {(e.label, e.label_name) for e in shards.load_examples(tmp_path / "c", "eval")}
    assert labels == {(0, "american_bulldog"), (1, "basset_hound")}
    with pytest.raises(ValueError, match=r"--classes \['husky'\]"):
        prepare(raw_pets, tmp_path / "x", classes=["husky", "Abyssinian"])
    with pytest.raises(ValueError, match="--num-classes 5 is larger than the 4 classes"):
        prepare(raw_pets, tmp_path / "x", num_classes=5)


def test_rerun_replaces_old_shards_and_manifest_with_overwrite(raw_pets, tmp_path):
    prepare(raw_pets, tmp_path / "out", examples_per_shard=2)
    assert len(list((tmp_path / "out").glob("train-*.parquet"))) == 6
    prepare(raw_pets, tmp_path / "out", examples_per_shard=100, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval-00000-of-00001.parquet", "manifest.json", "train-00000-of-00001.parquet"]


def test_rerun_with_other_options_is_refused_same_options_reuse(raw_pets, tmp_path, capsys):
    first = prepare(raw_pets, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    with pytest.raises(UserError, match=r"already holds a dataset prepared with other options "
                                        r"\(--num-classes None -> 2\); pass --overwrite"):
        prepare(raw_pets, tmp_path / "out", num_classes=2)
    with pytest.raises(UserError, match=r"--source .* -> '.*other'"):
        prepare(tmp_path / "other", tmp_path / "out")  # checked before the source is even opened
    capsys.readouterr()
    # same options (a run-only one may differ): nothing is read or written
    assert prepare(raw_pets, tmp_path / "out", num_workers=1) == first
    assert "already holds this dataset" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    # a damaged shard is rebuilt, not reused
    shard = tmp_path / "out" / first["splits"]["eval"]["shards"][0]["file"]
    shard.write_bytes(b"garbage")
    assert prepare(raw_pets, tmp_path / "out")["splits"] == first["splits"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="holds a manifest.json that prepare-dataset did not write"):
        prepare(raw_pets, tmp_path / "foreign")


def test_temporary_files_of_a_killed_run_are_removed(raw_pets, tmp_path):
    out = tmp_path / "out"
    prepare(raw_pets, out)
    # what `kill -9` during the shard writes leaves: no manifest (removed first), some shards,
    # and files.write_bytes_atomic's hidden temporary of the shard being written
    (out / "manifest.json").unlink()
    stale = [out / ".train-00000-of-00001.parquet.k9x2ab.tmp", out / ".manifest.json.zz81.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    prepare(raw_pets, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "eval-00000-of-00001.parquet", "manifest.json", "train-00000-of-00001.parquet"]


def test_written_files_are_readable_by_other_users(raw_pets, tmp_path):
    """0644 (another uid, e.g. a serving container, reads the dataset); needs the 0644 temporary
    files of components.files.write_bytes_atomic."""
    prepare(raw_pets, tmp_path / "out")
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_listed_but_unsplit_images_are_reported_as_skipped(pets_copy, tmp_path, capsys):
    path = pets_copy / "annotations" / "trainval.txt"
    lines = path.read_text().splitlines()
    dropped = lines.pop(0).split()[0]  # still in list.txt, now in neither split file
    path.write_text("".join(line + "\n" for line in lines))
    manifest = prepare(pets_copy, tmp_path / "out")
    assert manifest["skipped"] == [{"id": dropped, "file": f"images/{dropped}.jpg",
                                    "reason": "listed in list.txt but in neither trainval.txt nor test.txt"}]
    assert manifest["splits"]["train"]["num_examples"] == 11
    assert f"images/{dropped}.jpg: listed in list.txt but in neither" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The shard reader


def test_reader_refuses_incomplete_or_corrupted_datasets(raw_pets, tmp_path):
    prepare(raw_pets, tmp_path / "out", examples_per_shard=6)
    shard = tmp_path / "out" / "eval-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert len(shards.load_examples(tmp_path / "out", "eval", limit=6)) == 6  # first shard only: fine
    with pytest.raises(ValueError, match="eval-00001-of-00002.parquet: sha256"):
        shards.load_examples(tmp_path / "out", "eval")
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
        shards.load_examples(tmp_path / "out", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        shards.load_examples(tmp_path / "out", "test")


# ---------------------------------------------------------------------------------------------
# Config and CLI


@pytest.mark.parametrize("argv,match", [
    (["--eval-fraction", "1.5"], "--eval-fraction"),
    (["--train-size", "0"], "--train-size"),
    (["--num-classes", "2", "--classes", "a"], "--classes or --num-classes"),
    (["--jpeg-quality", "0"], "--jpeg-quality"),
    (["--num-classes", "1"], "--num-classes 1: keep at least 2 classes"),
    (["--classes", "pug"], "--classes pug: keep at least 2 classes"),
])
def test_cli_rejects_bad_flags(tmp_path, capsys, argv, match):
    assert prepare_dataset.main(["--source", str(tmp_path), "--output-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_cli_end_to_end(raw_pets, tmp_path):
    assert prepare_dataset.main(["--source", str(raw_pets), "--output-dir", str(tmp_path / "o"),
                                 "--num-workers", "1", "--image-format", "png"]) == 0
    example = shards.load_examples(tmp_path / "o", "train", limit=1)[0]
    assert Image.open(io.BytesIO(example.image_bytes)).format == "PNG"
