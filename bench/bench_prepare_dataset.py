"""Time prepare-dataset on a full-size (7,349-image) synthetic Oxford-IIIT Pet set.

    python bench/bench_prepare_dataset.py                      # 128 px images (the demo's)
    python bench/bench_prepare_dataset.py --image-size 432     # about the official photos' pixel count

Generates the set in the official layout (``synthetic-pets --num-images 7349 --quirks``), then
runs ``prepare-dataset`` on it and prints the seconds of each. ``--image-size 432`` gives
432x432 = 187k pixels per image, the official photos' typical 500x375, so the decode cost per
image is close to the real data set's; 128 px is what the demo uses.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from components import prepare_dataset, synthetic_pets

OFFICIAL_TOTAL = 7349  # images in the official list.txt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side, px")
    parser.add_argument("--num-images", type=int, default=OFFICIAL_TOTAL)
    parser.add_argument("--num-workers", type=int, default=0, help="prepare-dataset threads; 0 = one per core")
    parser.add_argument("--repeats", type=int, default=1, help="time prepare-dataset this many times")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        raw, out = workdir / "raw", workdir / "prepared"
        start = time.perf_counter()
        synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(
            output_dir=str(raw), num_images=args.num_images, image_size=args.image_size,
            quirks=True, overwrite=True))
        generate_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            manifest = prepare_dataset.run(prepare_dataset.PrepareDatasetConfig(
                source=str(raw), output_dir=str(out), num_workers=args.num_workers))
            times.append(time.perf_counter() - start)
        examples = sum(manifest["splits"][s]["num_examples"] for s in ("train", "eval"))
        print(f"host: {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
              f"python {platform.python_version()}")
        print(f"synthetic-pets: {args.num_images} images of {args.image_size} px in {generate_s:.1f} s")
        print(f"prepare-dataset: {examples} examples kept, {manifest['num_skipped']} skipped, "
              f"seconds per run: {', '.join(f'{t:.1f}' for t in times)} (best {min(times):.1f})")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
