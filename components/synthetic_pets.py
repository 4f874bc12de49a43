"""``gemma-pets synthetic-pets``: an offline stand-in for Oxford-IIIT Pet, in the official layout.

Writes ``images/<Class>_<n>.jpg`` and ``annotations/{list,trainval,test}.txt`` as the official
archives lay them out (or the two tarballs with ``--layout tarballs``), so ``prepare-dataset``
reads it through the real code path. Each class has a learnable visual signature, jittered per
image; deterministic for a seed. How the signatures stay apart: docs/steps.md.
"""

from __future__ import annotations

import colorsys
import functools
import io
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from components.cli import entrypoint, parse_config
from components.files import atomic_dir
from components.prepare_dataset import (
    LIST_HEADER,
    OXFORD_PET_CLASSES,
    annotation_line,
)

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
TEXTURES = ("plain", "stripes", "dots", "checker")
GOLDEN_RATIO_FRACTION = 0.6180339887498949  # hue step: keeps any prefix of hues spread out
JPEG_QUALITY = 90  # close to the official photos' quality; small files, no visible blocking
# Quirks of the official archive reproduced by --quirks: it holds a few grayscale and CMYK
# JPEGs, PNG/GIF files named .jpg, and files that do not decode at all.
QUIRKS = ("grayscale", "cmyk", "png_rgba_named_jpg", "gif_palette_named_jpg",
          "png_16bit_named_jpg", "truncated", "zero_bytes")


@dataclass
class SyntheticPetsConfig:
    """Generate a synthetic Oxford-IIIT Pet data set in the official layout."""

    output_dir: str = field(metadata={"help": "folder to create (images/ + annotations/, or the "
                                              "two tarballs with --layout tarballs)"})
    num_classes: int = field(default=37, metadata={
        "help": "use the first N of the 37 classes by official class id (1..37)"})
    images_per_class: int = field(default=200, metadata={
        "help": "images per class (the official set has about 200)"})
    num_images: int | None = field(default=None, metadata={
        "help": "total images instead of --images-per-class, spread as evenly as possible over "
                "the classes (the first classes get one more); 7349 is the official total"})
    image_size: int = field(default=128, metadata={"help": "square image side in pixels"})
    test_fraction: float = field(default=0.5, metadata={
        "help": "share of each class listed in test.txt (official: about 0.5); rest in trainval.txt"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same files"})
    layout: str = field(default="folders", metadata={
        "help": "folders: images/ + annotations/; tarballs: images.tar.gz + annotations.tar.gz",
        "choices": ["folders", "tarballs"]})
    quirks: bool = field(default=False, metadata={
        "help": "store a few images the way the official archive has them (grayscale, CMYK, "
                "PNG/GIF named .jpg, 16-bit PNG, one truncated and one zero-byte file)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace --output-dir if it already exists and is not empty"})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--output-dir must not be empty")
        if not 1 <= self.num_classes <= len(OXFORD_PET_CLASSES):
            raise ValueError(f"--num-classes must be in 1..{len(OXFORD_PET_CLASSES)}, "
                             f"got {self.num_classes}")
        if self.images_per_class < 1:
            raise ValueError(f"--images-per-class must be >= 1, got {self.images_per_class}")
        if self.num_images is not None and self.num_images < self.num_classes:
            raise ValueError(f"--num-images ({self.num_images}) must be >= --num-classes "
                             f"({self.num_classes}): every class needs an image")
        if not 32 <= self.image_size <= 2048:
            raise ValueError(f"--image-size must be in 32..2048 px, got {self.image_size}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.layout not in ("folders", "tarballs"):
            raise ValueError(f"--layout must be folders or tarballs, got {self.layout!r}")


def class_signature(class_index: int) -> dict:
    """The visual traits shared by every image of class ``class_index`` (0-based id order)."""
    hue = (class_index * GOLDEN_RATIO_FRACTION) % 1.0
    return {
        "hue": hue,
        "shape": SHAPES[class_index % len(SHAPES)],
        "texture": TEXTURES[(class_index // 2) % len(TEXTURES)],
        # dark or light foreground; alternates every 3 ids, independent of shape (period 6)
        "foreground_value": 0.30 if (class_index // 3) % 2 else 0.97,
        "foreground_hue": (hue + 0.5) % 1.0,
    }


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, np.clip(saturation, 0, 1),
                                        np.clip(value, 0, 1)), dtype=np.float32) * 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Pixels inside ``shape`` of size ``radius`` in the shape's own rotated coordinates."""
    if shape == "circle":
        return u * u + v * v <= radius * radius
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= radius * 0.85
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= radius * 1.15
    if shape == "triangle":  # equilateral, apex up: apex (0, -r), base at v = r/2
        return (v <= radius * 0.5) & (v >= -radius + np.sqrt(3.0) * np.abs(u))
    if shape == "ring":
        dist2 = u * u + v * v
        return (dist2 <= radius * radius) & (dist2 >= (radius * 0.5) ** 2)
    if shape == "cross":
        arm = radius * 0.32
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
    """1.0 where the shape keeps its colour, a darker factor on the texture's marks."""
    dark = np.float32(0.5)  # texture marks at half brightness: visible after shrinking to ~48 px
    period, phase = np.float32(period), np.float32(phase)
    if texture == "plain":
        return np.ones_like(u)
    if texture == "stripes":
        return np.where(np.floor((v + phase) / period) % 2 == 0, 1.0, dark)
    if texture == "checker":
        parity = (np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2
        return np.where(parity == 0, 1.0, dark)
    if texture == "dots":
        du = (u + phase) % period - period / 2
        dv = (v + phase) % period - period / 2
        return np.where(du * du + dv * dv <= (period * 0.32) ** 2, dark, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel coordinates, float32; cached because every image of a run shares them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def render_image(class_index: int, image_number: int, seed: int, size: int) -> Image.Image:
    """One jittered RGB image of class ``class_index``; same arguments, same pixels."""
    sig = class_signature(class_index)
    rng = np.random.default_rng([seed, class_index, image_number])
    yy, xx = _grid(size)

    # background: class hue (+-0.012 of the wheel, well under the hue gaps between classes
    # that share a shape) with a random linear brightness gradient of up to +-15 %
    bg = _hsv(sig["hue"] + rng.uniform(-0.012, 0.012), rng.uniform(0.5, 0.7), rng.uniform(0.72, 0.88))
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (xx - size / 2) * np.float32(np.cos(angle) / size) + (yy - size / 2) * np.float32(np.sin(angle) / size)
    pixels = bg[None, None, :] * (1.0 + 0.3 * gradient[..., None])

    # distractors: 3 small blobs of random colour (radius 4-8 % of the side), drawn first;
    # each only touches its bounding box
    for _ in range(3):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(0.04, 0.08) * size
        colour = _hsv(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95))
        y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 1, size)
        x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 1, size)
        box = (xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2 <= radius * radius
        pixels[y0:y1, x0:x1][box] = colour

    # the class shape: 50-66 % of the side across, centre jittered by +-12 %, rotated +-15 deg
    radius = rng.uniform(0.25, 0.33) * size
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    theta = np.deg2rad(rng.uniform(-15, 15))
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (xx - np.float32(cx)) * cos + (yy - np.float32(cy)) * sin
    v = (yy - np.float32(cy)) * cos - (xx - np.float32(cx)) * sin
    mask = _shape_mask(sig["shape"], u, v, radius)
    fg = _hsv(sig["foreground_hue"] + rng.uniform(-0.012, 0.012), rng.uniform(0.65, 0.85),
              sig["foreground_value"] * rng.uniform(0.9, 1.0))
    # texture period 1/8 of the side: 16 px at 128 px, 6 px after shrinking to 48 px
    shade = _texture(sig["texture"], u[mask], v[mask], size / 8, rng.uniform(0, size / 8))
    pixels[mask] = fg[None, :] * shade[:, None]

    pixels *= np.float32(rng.uniform(0.85, 1.15))  # global brightness +-15 %
    # sensor-like noise: uniform in +-10.4 (sigma 6 of 255); uniform draws cost a fraction
    # of Gaussian ones and the model cannot tell the difference at this amplitude
    pixels += (rng.random(pixels.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(20.8)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def class_counts(config: SyntheticPetsConfig) -> list[int]:
    """Images per class for the first ``num_classes`` classes."""
    if config.num_images is None:
        return [config.images_per_class] * config.num_classes
    base, extra = divmod(config.num_images, config.num_classes)
    return [base + (1 if index < extra else 0) for index in range(config.num_classes)]


def split_numbers(class_index: int, count: int, test_fraction: float, seed: int) -> set[int]:
    """Image numbers (1-based) of one class that go to test.txt: seeded, about test_fraction."""
    n_test = round(count * test_fraction)
    if test_fraction > 0 and count >= 2:
        n_test = min(max(n_test, 1), count - 1)  # both lists keep every class
    order = np.random.default_rng([seed, class_index, 0]).permutation(count) + 1
    return {int(n) for n in order[:n_test]}


def _quirk_bytes(kind: str, img: Image.Image, jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    if kind == "grayscale":
        img.convert("L").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif kind == "png_rgba_named_jpg":
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buf, "PNG")
    elif kind == "gif_palette_named_jpg":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif kind == "png_16bit_named_jpg":
        gray16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # 8 -> 16 bit full range
        Image.fromarray(gray16).save(buf, "PNG")
    elif kind == "truncated":
        return jpeg[: len(jpeg) // 2]
    elif kind == "zero_bytes":
        return b""
    else:
        raise ValueError(f"unknown quirk {kind!r}")
    return buf.getvalue()


def plan_quirks(counts: list[int]) -> dict[tuple[int, int], str]:
    """(class index, image number) -> quirk: quirk k goes to class k mod K, its last images."""
    plan: dict[tuple[int, int], str] = {}
    for k, kind in enumerate(QUIRKS):
        class_index = k % len(counts)
        image_number = counts[class_index] - k // len(counts)
        if image_number >= 2:  # never the class's only image
            plan[(class_index, image_number)] = kind
    return plan


def generate(config: SyntheticPetsConfig) -> dict[str, bytes]:
    """Every file of the data set as {relative path: bytes}, in a fixed order."""
    counts = class_counts(config)
    quirks = plan_quirks(counts) if config.quirks else {}
    files: dict[str, bytes] = {}
    lines: dict[str, list[str]] = {"list": [], "trainval": [], "test": []}
    total = sum(counts)
    with tqdm(total=total, desc="synthetic-pets", unit="img", file=sys.stderr) as bar:
        for class_index, count in enumerate(counts):
            name = OXFORD_PET_CLASSES[class_index]
            test_numbers = split_numbers(class_index, count, config.test_fraction, config.seed)
            for number in range(1, count + 1):
                img = render_image(class_index, number, config.seed, config.image_size)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=JPEG_QUALITY)
                data = buf.getvalue()
                if (class_index, number) in quirks:
                    data = _quirk_bytes(quirks[(class_index, number)], img, data)
                image_name = f"{name}_{number}"
                files[f"images/{image_name}.jpg"] = data
                line = annotation_line(image_name, class_index)
                lines["list"].append(line)
                lines["test" if number in test_numbers else "trainval"].append(line)
                bar.update(1)
    files["annotations/list.txt"] = (LIST_HEADER + "".join(lines["list"])).encode()
    files["annotations/trainval.txt"] = "".join(lines["trainval"]).encode()
    files["annotations/test.txt"] = "".join(lines["test"]).encode()
    for (class_index, number), kind in sorted(quirks.items()):
        print(f"quirk: images/{OXFORD_PET_CLASSES[class_index]}_{number}.jpg is {kind}")
    return files


def _write_tarball(path: Path, files: dict[str, bytes], prefix: str) -> None:
    # compresslevel 1: the JPEGs do not shrink under gzip, so higher levels only cost time
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            if name.startswith(prefix):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0  # fixed timestamp: same seed, same archive bytes
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))


def run(config: SyntheticPetsConfig) -> Path:
    output = Path(config.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not config.overwrite:
        raise FileExistsError(f"--output-dir {output} exists and is not empty; "
                              "pass --overwrite to replace it")
    start = time.perf_counter()
    files = generate(config)
    # written in place, its completion marker last: a half-written data set never reads as complete
    with atomic_dir(output) as tmp:
        if config.layout == "tarballs":
            _write_tarball(tmp / "images.tar.gz", files, "images/")
            _write_tarball(tmp / "annotations.tar.gz", files, "annotations/")
        else:
            (tmp / "images").mkdir()
            (tmp / "annotations").mkdir()
            for name, data in files.items():
                (tmp / name).write_bytes(data)
    n_images = sum(1 for name in files if name.startswith("images/"))
    print(f"wrote {n_images} images of {config.num_classes} classes to {output} "
          f"({config.layout}) in {time.perf_counter() - start:.1f} s")
    return output


@entrypoint
def main(argv: list[str] | None = None) -> int:
    config = parse_config(SyntheticPetsConfig, argv)
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
