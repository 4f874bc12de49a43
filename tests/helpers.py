"""Small helpers shared by several test files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def is_commit_of_this_checkout(value: str) -> bool:
    """A 40-hex commit (+dirty when the tree had changes) that HEAD descends from. Not "equals
    HEAD": a commit made while the test runs moves HEAD on."""
    sha, _, flag = value.partition("+")
    if len(sha) != 40 or flag not in ("", "dirty"):
        return False
    return subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=REPO,
                          capture_output=True).returncode == 0


def gcloud_sdk() -> tuple[str, Path] | None:
    """(python, lib folder) of an installed Google Cloud CLI, or None."""
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    root = Path(gcloud).resolve().parent.parent
    python = root / "platform" / "bundledpythonunix" / "bin" / "python"
    if not (root / "lib" / "googlecloudsdk").is_dir():
        return None
    return (str(python) if python.exists() else sys.executable), root / "lib"
