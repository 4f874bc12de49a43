"""Small helpers shared by several test files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A Hugging Face token planted in the environment of every local pipeline run the tests start:
# it must appear in no output and no file (tests/test_pipeline_local.py).
PLANTED = "hf_plantedSECRETlocalrun0123456789"
# Small enough for minutes on 2 cores: 3 classes x (2 train + 2 eval) images, 2 optimizer steps
# (a checkpoint after the first).
SMALL = ["--param", "finetune.max_steps=2", "--param", "finetune.epochs=1", "--param", "finetune.batch_size=4",
         "--param", "finetune.micro_batch_size=2", "--param", "evaluate.batch_size=8",
         "--param", "finetune.save_every_steps=1"]
# The gate-passing run that tests/test_pipeline_local.py and tests/test_lineage.py share
# (conftest.passing_local_run): any result passes (margin -1, no accuracy floor), so the export
# path always runs; a LoRA rank other than the demo's shows the parameter reaching the lineage.
PASSING = ["--margin", "-1", "--param", "gate.min_accuracy=0", "--param", "finetune.lora_r=4"]



def run_pipeline(run_dir: Path, inputs: tuple[str, str], *extra: str) -> subprocess.CompletedProcess:
    """`python -m pipelines.local_run` on the tiny inputs, SMALL settings and a planted HF_TOKEN."""
    env = {**os.environ, "HF_TOKEN": PLANTED, "HF_HUB_OFFLINE": "1"}
    weights, dataset = inputs
    return subprocess.run(
        [sys.executable, "-m", "pipelines.local_run", "--run-dir", str(run_dir),
         "--weights-source", weights, "--dataset-source", dataset, *SMALL, *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


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
