"""The synthetic Oxford-IIIT Pet generator: official layout, determinism, learnable classes."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import synthetic_pets
from components.prepare_dataset import LIST_HEADER, OXFORD_PET_CLASSES, annotation_line
from components.synthetic_pets import SyntheticPetsConfig, render_image

OFFICIAL_HEADER = """#Image CLASS-ID SPECIES BREED ID
#ID: 1:37 Class ids
#SPECIES: 1:Cat 2:Dog
#BREED ID: 1-25:Cat 1:12:Dog
#All images with 1st letter as captial are cat images
#images with small first letter are dog images
"""


def make(tmp_path: Path, name: str = "pets", **overrides) -> Path:
    options = dict(output_dir=str(tmp_path / name), num_classes=4, images_per_class=5,
                   image_size=48, seed=0)
    options.update(overrides)
    return synthetic_pets.run(SyntheticPetsConfig(**options))


def read_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]


def test_official_constants_match_the_real_list_txt():
    assert LIST_HEADER == OFFICIAL_HEADER
    assert len(OXFORD_PET_CLASSES) == 37
    # lines as they appear in the official annotations/list.txt
    assert annotation_line("Abyssinian_100", 0) == "Abyssinian_100 1 1 1\n"
    assert annotation_line("american_bulldog_100", 1) == "american_bulldog_100 2 2 1\n"
    assert annotation_line("Sphynx_1", OXFORD_PET_CLASSES.index("Sphynx")) == "Sphynx_1 34 1 12\n"
    assert annotation_line("yorkshire_terrier_1", 36) == "yorkshire_terrier_1 37 2 25\n"
    cats = [name for name in OXFORD_PET_CLASSES if name[0].isupper()]
    assert len(cats) == 12


def test_layout_header_and_columns(tmp_path):
    root = make(tmp_path, num_classes=6, images_per_class=6, test_fraction=0.5)
    list_txt = (root / "annotations" / "list.txt").read_text()
    assert list_txt.startswith(OFFICIAL_HEADER)
    rows = read_lines(root / "annotations" / "list.txt")
    assert len(rows) == 36
    for image, class_id, species, breed in rows:
        name = OXFORD_PET_CLASSES[int(class_id) - 1]
        assert re.fullmatch(re.escape(name) + r"_\d+", image)
        assert int(species) == (1 if name[0].isupper() else 2)
        assert (root / "images" / f"{image}.jpg").is_file()
    assert {row[0].rsplit("_", 1)[0] for row in rows} == set(OXFORD_PET_CLASSES[:6])
    trainval = read_lines(root / "annotations" / "trainval.txt")
    test = read_lines(root / "annotations" / "test.txt")
    # no header in the split files; together they are list.txt, with no overlap
    assert not (root / "annotations" / "trainval.txt").read_text().startswith("#")
    assert sorted(map(tuple, trainval + test)) == sorted(map(tuple, rows))
    assert not {r[0] for r in trainval} & {r[0] for r in test}
    for class_id in range(1, 7):  # each class split 3/3
        assert sum(r[1] == str(class_id) for r in test) == 3
    img = Image.open(root / "images" / f"{rows[0][0]}.jpg")
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def snapshot(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    first = snapshot(make(tmp_path, "a", seed=3))
    again = snapshot(make(tmp_path, "b", seed=3))
    other = snapshot(make(tmp_path, "c", seed=4))
    assert first == again
    assert first.keys() == other.keys()
    assert first["images/Abyssinian_1.jpg"] != other["images/Abyssinian_1.jpg"]
    assert first["annotations/test.txt"] != other["annotations/test.txt"]


def test_num_images_spreads_the_total_evenly():
    config = SyntheticPetsConfig(output_dir="unused", num_classes=37, num_images=7349)
    counts = synthetic_pets.class_counts(config)
    assert sum(counts) == 7349 and max(counts) - min(counts) == 1 and counts[0] == 199


def _colour_histogram(img: Image.Image) -> np.ndarray:
    """8x8x8 RGB histogram of the image as the tiny model sees it (48x48 px)."""
    small = np.asarray(img.resize((48, 48), Image.BILINEAR), dtype=np.int32) // 32
    counts = np.bincount((small[..., 0] * 64 + small[..., 1] * 8 + small[..., 2]).ravel(), minlength=512)
    return np.sqrt(counts / counts.sum())


@pytest.mark.parametrize("num_classes,min_accuracy", [(8, 0.95), (37, 0.75)])
def test_classes_are_separable_at_48_px(num_classes, min_accuracy):
    # A nearest-centroid classifier on colour alone (no shape, no texture) must already tell
    # held-out images apart; measured 1.00 (8 classes) and 0.88 (37), chance 0.125 / 0.027.
    centroids = np.array([np.mean([_colour_histogram(render_image(c, n, 0, 64)) for n in range(1, 6)], axis=0)
                          for c in range(num_classes)])
    correct = total = 0
    for c in range(num_classes):
        for n in range(100, 104):  # image numbers never used for the centroids
            features = _colour_histogram(render_image(c, n, 0, 64))
            correct += int(np.argmin(((centroids - features) ** 2).sum(axis=1)) == c)
            total += 1
    assert correct / total >= min_accuracy


def test_classes_sharing_a_shape_are_far_apart_in_hue():
    # hue jitter per image is +-0.012 of the colour wheel; classes with the same shape must be
    # at least 10x that apart, for every pair of the 37 (so for every first-N prefix too)
    signatures = [synthetic_pets.class_signature(i) for i in range(37)]
    closest = 1.0
    for i in range(37):
        for j in range(i + 1, 37):
            gap = abs(signatures[i]["hue"] - signatures[j]["hue"])
            gap = min(gap, 1 - gap)
            assert gap > 0.005  # all 37 background hues distinct
            if signatures[i]["shape"] == signatures[j]["shape"]:
                closest = min(closest, gap)
    assert closest >= 0.12


def test_images_of_a_class_vary():
    a = np.asarray(render_image(2, 1, 0, 64), dtype=np.int32)
    b = np.asarray(render_image(2, 2, 0, 64), dtype=np.int32)
    assert np.abs(a - b).mean() > 10  # jittered position/size/brightness, not one picture


def test_tarballs_layout(tmp_path):
    root = make(tmp_path, layout="tarballs", num_classes=2, images_per_class=3)
    assert sorted(p.name for p in root.iterdir()) == [".complete", "annotations.tar.gz", "images.tar.gz"]
    with tarfile.open(root / "images.tar.gz") as tar:
        names = sorted(tar.getnames())
        data = tar.extractfile("images/Abyssinian_1.jpg").read()
    assert names == sorted(f"images/{c}_{n}.jpg" for c in OXFORD_PET_CLASSES[:2] for n in range(1, 4))
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    with tarfile.open(root / "annotations.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["annotations/list.txt", "annotations/test.txt",
                                          "annotations/trainval.txt"]


def test_quirks_reproduce_the_official_oddities(tmp_path):
    root = make(tmp_path, quirks=True, num_classes=7, images_per_class=4)
    expected = {  # quirk k -> class k, its last image
        "Abyssinian_4": ("JPEG", "L"), "american_bulldog_4": ("JPEG", "CMYK"),
        "american_pit_bull_terrier_4": ("PNG", "RGBA"), "basset_hound_4": ("GIF", "P"),
        "beagle_4": ("PNG", "I;16"),
    }
    for image, (fmt, mode) in expected.items():
        with Image.open(root / "images" / f"{image}.jpg") as img:
            assert (img.format, img.mode) == (fmt, mode)
    assert (root / "images" / "Birman_4.jpg").stat().st_size == 0
    with pytest.raises(OSError):
        Image.open(root / "images" / "Bengal_4.jpg").load()  # truncated


def test_refuses_non_empty_output_without_overwrite(tmp_path):
    (tmp_path / "pets").mkdir()
    (tmp_path / "pets" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make(tmp_path)
    assert (tmp_path / "pets" / "keep.txt").exists()
    make(tmp_path, overwrite=True)
    assert not (tmp_path / "pets" / "keep.txt").exists()


@pytest.mark.parametrize("flag,value,match", [
    ("--num-classes", "38", "--num-classes"), ("--num-classes", "0", "--num-classes"),
    ("--image-size", "8", "--image-size"), ("--test-fraction", "1.0", "--test-fraction"),
    ("--num-images", "2", "--num-images"),
])
def test_cli_rejects_bad_flags(tmp_path, capsys, flag, value, match):
    assert synthetic_pets.main(["--output-dir", str(tmp_path / "x"), flag, value]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_set(tmp_path):
    assert synthetic_pets.main(["--output-dir", str(tmp_path / "cli"), "--num-classes", "2",
                                "--images-per-class", "2", "--image-size", "32"]) == 0
    assert len(list((tmp_path / "cli" / "images").iterdir())) == 4
