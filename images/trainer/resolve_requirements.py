"""Check, against PyPI, that the trainer image's requirements resolve for its Python and platform.

    python images/trainer/resolve_requirements.py pyproject.toml --output docs/image-resolution.md

The image (CPython 3.12, Ubuntu 24.04, x86_64) installs torch/torchvision from the PyTorch cu128
index and every other pin from PyPI. This machine reaches PyPI only, so the check resolves the
other pins together with the same torch/torchvision versions from PyPI (the CUDA 13 builds, whose
Requires-Dist of everything but their NVIDIA libraries is what the cu128 builds have): a pin that
needs another torch, or has no wheel for the platform, fails the resolution. It runs
``pip install --dry-run --report`` with ``--only-binary=:all:`` (what ``--platform`` needs), and
writes a summary: every package with its version, which packages only torch pulls in, each pin's
torch bound, and the CUDA libraries of the bitsandbytes wheel.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYTHON_VERSION = "3.12"
# Ubuntu 24.04's glibc is 2.39: wheels for manylinux_2_17 .. manylinux_2_39 run on it.
GLIBC_MINORS = range(39, 16, -1)
# Pure-Python packages PyPI ships as sdists only. --platform resolution takes wheels only, so
# these are built into wheels first (a pure-Python wheel is the same on any platform).
SDIST_ONLY = ("kfp-server-api",)
BNB_CUDA_LIB = re.compile(r"libbitsandbytes_cuda(\d+)\.so$")


def platform_flags() -> list[str]:
    flags = ["--python-version", PYTHON_VERSION, "--implementation", "cp",
             "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for minor in GLIBC_MINORS:
        flags += ["--platform", f"manylinux_2_{minor}_x86_64"]
    return flags + ["--platform", "manylinux2014_x86_64"]


def pip(*args: str) -> None:
    # --isolated: PyPI alone, no pip.conf, constraints or local wheel folders of this machine.
    command = [sys.executable, "-m", "pip", "--isolated", *args]
    done = subprocess.run(command, text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)}\n{done.stderr[-3000:]}")


def dry_run(requirements: Path, report: Path, work: Path, *extra: str) -> dict:
    pip("install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
        "--target", str(work / "target"), "--report", str(report), *platform_flags(), *extra,
        "-r", str(requirements))
    return json.loads(report.read_text(encoding="utf-8"))


def build_sdist_only_wheels(no_deps_report: dict, wheel_dir: Path) -> None:
    """Wheels of the SDIST_ONLY packages at the versions the pins' Requires-Dist allow."""
    for item in no_deps_report["install"]:
        for text in item["metadata"].get("requires_dist", []):
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) in SDIST_ONLY and not requirement.marker:
                pip("wheel", "--no-deps", "--no-binary=:all:", "--wheel-dir", str(wheel_dir),
                    str(requirement))


def cuda_libraries(wheel: Path) -> list[str]:
    """CUDA versions of the bitsandbytes libraries in a wheel, e.g. ["118", ..., "128", "130"]."""
    with zipfile.ZipFile(wheel) as archive:
        found = (BNB_CUDA_LIB.search(name) for name in archive.namelist())
        return sorted({m.group(1) for m in found if m}, key=int)


def requirements_of(item: dict, environment: dict, extras: set[str]) -> list[tuple[str, set[str]]]:
    """(canonical name, extras) a resolved package needs here, with ``extras`` of its own
    requested (markers evaluated for this platform)."""
    needed = []
    for text in item["metadata"].get("requires_dist", []):
        requirement = Requirement(text)
        if requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}):
            needed.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return needed


def split_by_origin(report: dict, roots: list[str], torch_names: list[str]) -> tuple[list, list]:
    """(packages the non-torch pins need, packages only torch/torchvision need), as report items.

    The walk starts at ``roots`` and does not enter torch or torchvision: what it does not reach
    comes with torch only (PyPI's torch: its CUDA 13 libraries), which the image installs from
    the cu128 index instead.
    """
    environment = {**default_environment(), "python_version": PYTHON_VERSION,
                   "python_full_version": PYTHON_VERSION + ".0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64"}
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    seen, stack = set(), [(canonicalize_name(r), set()) for r in roots]
    while stack:
        name, extras = stack.pop()
        key = (name, frozenset(extras))
        if key in seen or name in torch_names or name not in items:
            continue
        seen.add(key)
        stack += requirements_of(items[name], environment, extras)
    reached = {name for name, _ in seen}
    ours = [items[n] for n in sorted(reached)]
    torch_only = [items[n] for n in sorted(set(items) - reached - set(torch_names))]
    return ours, torch_only


def torch_bounds(report: dict, pins: list[str]) -> list[tuple[str, str]]:
    """(pin, its Requires-Dist on torch) for each pin that names torch; bounds that apply only
    with an extra (e.g. transformers[torch]) are marked as such."""
    pinned = {canonicalize_name(p.split("==")[0]) for p in pins}
    rows = []
    for item in report["install"]:
        if canonicalize_name(item["metadata"]["name"]) not in pinned:
            continue
        bounds = [Requirement(r) for r in item["metadata"].get("requires_dist", [])
                  if canonicalize_name(Requirement(r).name) == "torch"]
        always = sorted({str(b.specifier) for b in bounds if b.marker is None})
        extras = sorted({str(b.specifier) for b in bounds if b.marker is not None} - {""})
        text = "; ".join([f"torch{s}" for s in always] + [f"torch{s} (with an extra)" for s in extras])
        if text:
            rows.append((f"{item['metadata']['name']} {item['metadata']['version']}", text))
    return rows


def summary(report: dict, rest: list[str], torch_pins: list[str], bnb_cuda: list[str],
            command: str) -> str:
    torch_names = [canonicalize_name(p.split("==")[0]) for p in torch_pins]
    ours, torch_only = split_by_origin(report, [p.split("==")[0] for p in rest], torch_names)

    def row(item: dict) -> str:
        url = item["download_info"]["url"]
        kind = "built from sdist" if url.startswith("file:") else url.rsplit("/", 1)[-1].split("-")[-1][:-4]
        return f"| {item['metadata']['name']} | {item['metadata']['version']} | {kind} |"

    lines = [
        "# Trainer image: dependency resolution against PyPI",
        "",
        f"Written by `make image-resolve` ({Path(__file__).relative_to(Path(__file__).parents[2])}) "
        f"on {datetime.date.today().isoformat()}: CPython {PYTHON_VERSION}, manylinux x86_64 up to "
        f"glibc 2.{GLIBC_MINORS[0]} (Ubuntu 24.04), wheels only. The image's torch pins "
        f"({', '.join(torch_pins)}) come from the cu128 index, which this machine cannot reach; the "
        "same versions from PyPI stand in for them here (same Requires-Dist but for their CUDA 13 "
        "NVIDIA libraries), so the resolution checks every other pin against that torch.",
        "", "```", command, "```", "",
        f"Resolved: {len(report['install'])} packages. The non-torch pins and what they pull in "
        f"({len(ours)}; the image installs these from PyPI):", "",
        "| package | version | wheel tag |", "|---|---|---|", *map(row, ours), "",
        f"Pulled in only by torch/torchvision ({len(torch_only)}): PyPI's torch brings its CUDA 13 "
        "libraries; the image installs torch's dependencies with it from the cu128 index (CUDA 12 "
        "libraries there):", "",
        "| package | version | wheel tag |", "|---|---|---|", *map(row, torch_only), "",
        "torch bounds in the pins' Requires-Dist:", "",
        "| pin | requires |", "|---|---|",
        *(f"| {pin} | {bound} |" for pin, bound in torch_bounds(report, rest + torch_pins)), "",
        f"bitsandbytes wheel for this platform ships CUDA libraries for: {', '.join(bnb_cuda)} "
        f"(cuda128 {'present' if '128' in bnb_cuda else 'MISSING'}).", "",
    ]
    return "\n".join(lines)


def load_requirements_module():
    path = Path(__file__).with_name("requirements_from_pyproject.py")
    spec = importlib.util.spec_from_file_location("requirements_from_pyproject", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--output", type=Path, required=True, help="summary (Markdown) to write")
    args = parser.parse_args(argv)
    module = load_requirements_module()
    torch_lines, rest = module.split_requirements(*module.read_pins(args.pyproject), "cpu")
    torch_pins = [line.split("+")[0] for line in torch_lines]  # the public versions, from PyPI
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        requirements = work / "requirements.txt"
        requirements.write_text("\n".join(rest + torch_pins) + "\n", encoding="utf-8")
        wheels = work / "wheels"
        build_sdist_only_wheels(dry_run(requirements, work / "no-deps.json", work, "--no-deps"), wheels)
        extra = ["--find-links", str(wheels)]
        report = dry_run(requirements, work / "report.json", work, *extra)
        bnb = next(p for p in rest if canonicalize_name(p.split("==")[0]) == "bitsandbytes")
        pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(work / "bnb"),
            *platform_flags(), bnb)
        bnb_cuda = cuda_libraries(next((work / "bnb").glob("*.whl")))
    command = ("pip install --dry-run --report report.json --only-binary=:all: "
               f"--python-version {PYTHON_VERSION} --platform manylinux_2_39_x86_64 ... "
               "--platform manylinux_2_17_x86_64 -r <non-torch pins + " + " ".join(torch_pins) + ">")
    args.output.write_text(summary(report, rest, torch_pins, bnb_cuda, command), encoding="utf-8")
    print(f"resolved {len(report['install'])} packages; wrote {args.output}", file=sys.stderr)
    return 0 if "128" in bnb_cuda else 1


if __name__ == "__main__":
    sys.exit(main())
