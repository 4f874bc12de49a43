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


# A chat template whose past model turns differ from its generation prompt the other way round
# from the large Gemma 4 one: history keeps an empty thought channel, the generation prompt has
# none. Training must still extend the generation prompt, never the rendered history.
HISTORY_WITH_CHANNEL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if role == 'model' -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}{%- else -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)


def model_with_chat_template(source: Path, path: Path, template: str) -> Path:
    """A copy of a model folder whose processor renders ``template``."""
    shutil.copytree(source, path)
    (path / "chat_template.jinja").write_text(template)
    return path
