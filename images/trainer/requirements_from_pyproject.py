"""Split pyproject.toml's pinned dependencies into the two pip installs of the trainer image.

The image installs exactly the versions pinned in pyproject.toml (one source of truth: no
version is repeated in the Dockerfile). Two installs, because the CUDA build matters:

* ``torch.txt``: the torch/torchvision pins of ``[tool.gemma-pets.trainer-image].torch`` (or,
  without that table, ``[project]``'s) with the local label of the PyTorch wheel index
  (``torch==2.11.0+cu128``), installed from that index alone. PyPI's own torch wheel of the same
  version is built for CUDA 13 and needs a newer NVIDIA driver than Cloud Run's L4 hosts have, so
  "the same version from PyPI" is not the same binary.
* ``rest.txt``: every other pin of ``[project].dependencies`` and of the image's extras
  (``[tool.gemma-pets.trainer-image].extras``: the ``gpu`` extra, bitsandbytes), installed from
  PyPI with ``torch.txt`` as constraints so pip can never swap the CUDA 12.8 torch for PyPI's.

Every dependency must be an exact ``name==version`` pin; anything else is an error naming the
file and the requirement, so an unpinned dependency cannot slip into the image.

Standard library only: it runs in the image build before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

# Packages built per CUDA version on the PyTorch wheel index (their versions carry "+cuXYZ").
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")
# name[extras]==version, nothing else (no markers, no ranges, no URLs).
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,\s-]*\])?\s*==\s*([A-Za-z0-9._+!-]+)\s*$")
LOCAL_LABEL = re.compile(r"^(cu\d{3}|cpu|rocm\d+(\.\d+)*)$")


def canonical(name: str) -> str:
    """PEP 503 normalised project name: "Foo_Bar" and "foo-bar" are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(requirements, where: str) -> list[tuple[str, str, str]]:
    """[(name, extras, version)] of exact ``name==version`` pins, in order."""
    pins = []
    for requirement in requirements:
        match = PIN.match(requirement) if isinstance(requirement, str) else None
        if not match:
            raise ValueError(f"{where}: dependency {requirement!r} is not an exact "
                             "'name==version' pin; the image installs pinned versions only")
        pins.append((match.group(1), match.group(2) or "", match.group(3)))
    return pins


def read_pins(pyproject: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(``[project].dependencies`` and the image's extras, the image's torch pins) as
    [(name, extras, version)].

    The image's extras are ``[tool.gemma-pets.trainer-image].extras`` (names of
    ``[project.optional-dependencies]``); its torch pins are that table's ``torch``, or without
    it the project's own torch pins.
    """
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{pyproject}: cannot read as TOML: {err}") from err
    deps = data.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not deps:
        raise ValueError(f"{pyproject}: [project].dependencies is missing or empty")
    pins = parse_pins(deps, str(pyproject))
    table = data.get("tool", {}).get("gemma-pets", {}).get("trainer-image", {})
    optional = data.get("project", {}).get("optional-dependencies", {})
    for extra in table.get("extras", []):
        if extra not in optional:
            raise ValueError(f"{pyproject}: [tool.gemma-pets.trainer-image].extras names {extra!r}, "
                             "which [project.optional-dependencies] does not define")
        pins += parse_pins(optional[extra], f"{pyproject} [project.optional-dependencies].{extra}")
    image = table.get("torch")
    if image is None:
        return pins, [p for p in pins if canonical(p[0]) in TORCH_PACKAGES]
    image_pins = parse_pins(image, f"{pyproject} [tool.gemma-pets.trainer-image].torch")
    project_torch = sorted(canonical(p[0]) for p in pins if canonical(p[0]) in TORCH_PACKAGES)
    if sorted(canonical(p[0]) for p in image_pins) != project_torch:
        raise ValueError(f"{pyproject}: [tool.gemma-pets.trainer-image].torch must pin the same "
                         f"packages as [project].dependencies does ({', '.join(project_torch)})")
    return pins, image_pins


def split_requirements(pins: list[tuple[str, str, str]], image_torch: list[tuple[str, str, str]],
                       local_label: str) -> tuple[list[str], list[str]]:
    """(the image's torch lines with ``+local_label``, all other lines) for the two installs."""
    if not LOCAL_LABEL.match(local_label):
        raise ValueError(f"--torch-local-label {local_label!r}: expected e.g. cu128, cu126 or cpu")
    torch_lines = []
    for name, extras, version in image_torch:
        public, _, existing = version.partition("+")
        if existing and existing != local_label:
            raise ValueError(f"dependency {name}=={version} is pinned to +{existing}, but the "
                             f"image is built for +{local_label}")
        torch_lines.append(f"{name}{extras}=={public}+{local_label}")
    rest_lines = [f"{name}{extras}=={version}" for name, extras, version in pins
                  if canonical(name) not in TORCH_PACKAGES]
    if not any(line.startswith("torch==") for line in torch_lines):
        raise ValueError("pyproject.toml pins no 'torch': the trainer image exists to run it")
    return torch_lines, rest_lines


def with_image_torch(pyproject: Path) -> str:
    """pyproject.toml's text with ``[project]``'s torch pins replaced by the image's.

    The image installs the project's wheel; its Requires-Dist must name the torch the image has,
    or ``pip check`` fails the build. Exact pins are whole quoted strings in the file, so each is
    swapped textually (once, in ``[project].dependencies``) and the result read back to check.
    """
    text = pyproject.read_text(encoding="utf-8")
    image_torch = read_pins(pyproject)[1]
    pins = parse_pins(tomllib.loads(text)["project"]["dependencies"], str(pyproject))
    image_by_name = {canonical(name): (name, extras, version) for name, extras, version in image_torch}
    deps_start = re.search(r"^dependencies\s*=", text, re.MULTILINE).start()  # [project]'s
    for name, extras, version in pins:
        if canonical(name) in image_by_name:
            old = f'"{name}{extras}=={version}"'
            new = '"{}{}=={}"'.format(*image_by_name[canonical(name)])
            at = text.index(old, deps_start)
            text = text[:at] + new + text[at + len(old):]
    swapped = tomllib.loads(text)["project"]["dependencies"]
    want = [f"{n}{e}=={v}" for n, e, v in (image_by_name.get(canonical(p[0]), p) for p in pins)]
    if swapped != want:
        raise ValueError(f"{pyproject}: could not swap in the image's torch pins ({swapped})")
    return text


def installed_mismatches(lines: list[str], installed=metadata.version) -> list[str]:
    """"name: pinned X, installed Y" for each requirement line the environment does not match.

    ``installed(name)`` returns the installed version (raises PackageNotFoundError if absent).
    Compared exactly, local label included: torch 2.11.0 from PyPI is not torch 2.11.0+cu128.
    """
    problems = []
    for line in lines:
        name, _, version = line.partition("==")
        name = name.split("[")[0]
        try:
            found = installed(name)
        except metadata.PackageNotFoundError:
            found = "nothing"
        if found != version:
            problems.append(f"{name}: pinned {version}, installed {found}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path, help="path of pyproject.toml")
    parser.add_argument("--torch-local-label", default="cu128",
                        help="local version label of the PyTorch index, e.g. cu128 (CUDA 12.8)")
    parser.add_argument("--torch-out", type=Path, help="file for the torch pins")
    parser.add_argument("--rest-out", type=Path, help="file for every other pin")
    parser.add_argument("--image-pyproject", type=Path,
                        help="instead, write pyproject.toml with the image's torch pins in "
                             "[project].dependencies here (for the image's project wheel)")
    parser.add_argument("--check-installed", action="store_true",
                        help="instead of writing files, exit 1 unless this Python environment "
                             "holds exactly the pinned versions (the image build's last check)")
    args = parser.parse_args(argv)
    try:
        torch_lines, rest_lines = split_requirements(*read_pins(args.pyproject),
                                                     args.torch_local_label)
        if args.image_pyproject:
            args.image_pyproject.write_text(with_image_torch(args.pyproject), encoding="utf-8")
            return 0
    except ValueError as err:
        message = str(err) if str(args.pyproject) in str(err) else f"{args.pyproject}: {err}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.check_installed:
        problems = installed_mismatches(torch_lines + rest_lines)
        for problem in problems:
            print(f"error: {problem} (from {args.pyproject})", file=sys.stderr)
        return 1 if problems else 0
    if args.torch_out is None or args.rest_out is None:
        parser.error("--torch-out and --rest-out are required unless --check-installed")
    args.torch_out.write_text("\n".join(torch_lines) + "\n", encoding="utf-8")
    args.rest_out.write_text("\n".join(rest_lines) + "\n", encoding="utf-8")
    print(f"{len(torch_lines)} torch pins -> {args.torch_out}, "
          f"{len(rest_lines)} other pins -> {args.rest_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
