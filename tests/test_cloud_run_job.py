"""The Cloud Run Job spec and the CLI that renders it and drives gcloud (a fake one on PATH).

The rendered spec is also parsed with the Google Cloud CLI's own run/v1 Job message classes,
the same conversion `gcloud run jobs replace` does before sending it, when the CLI is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy import cloud_run_job as crj
from tests.helpers import gcloud_sdk

REPO = Path(__file__).resolve().parent.parent
BASE = dict(project="acme-ml-123", region="us-central1", bucket="acme-pets",
            model_path="weights/gemma-4", dataset_path="gs://acme-pets/datasets/pets",
            output_path="/gcs/acme-pets/runs/r1/finetune")
SPEC_FLAGS = ["--project", "acme-ml-123", "--region", "us-central1", "--bucket", "acme-pets",
              "--model-path", "weights/gemma-4", "--dataset-path", "datasets/pets",
              "--output-path", "runs/r1/finetune"]


def task_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["template"]["spec"]


def test_rendered_spec_runs_finetune_on_one_rtx_pro_6000_with_the_bucket_mounted():
    job = crj.render_job(crj.JobSettings(**BASE, service_account="trainer@acme-ml-123.iam.gserviceaccount.com"))
    assert job["apiVersion"] == "run.googleapis.com/v1" and job["kind"] == "Job"
    assert job["metadata"]["namespace"] == "acme-ml-123"
    assert job["metadata"]["labels"]["cloud.googleapis.com/location"] == "us-central1"
    execution = job["spec"]["template"]
    assert execution["metadata"]["annotations"]["run.googleapis.com/execution-environment"] == "gen2"
    assert execution["spec"]["taskCount"] == 1
    task = task_spec(job)
    # The seed's setup: RTX PRO 6000 (96 GB), 20 vCPU / 80 GiB, 6 h per attempt.
    assert task["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-rtx-pro-6000"}
    assert task["maxRetries"] == 10
    assert task["timeoutSeconds"] == 6 * 3600
    assert task["serviceAccountName"] == "trainer@acme-ml-123.iam.gserviceaccount.com"
    (container,) = task["containers"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"us-central1-docker.pkg.dev/acme-ml-123/gemma-pets/trainer:{version}"
    assert container["args"] == ["finetune", "--model-dir", "/gcs/acme-pets/weights/gemma-4",
                                 "--dataset-dir", "/gcs/acme-pets/datasets/pets",
                                 "--output-dir", "/gcs/acme-pets/runs/r1/finetune"]
    assert container["resources"]["limits"] == {"cpu": "20", "memory": "80Gi", "nvidia.com/gpu": "1"}
    assert "env" not in container, "no secret unless asked for" 
    (mount,) = container["volumeMounts"]
    (volume,) = task["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/gcs/acme-pets"}
    assert volume["csi"]["driver"] == "gcsfuse.run.googleapis.com"
    assert volume["csi"]["readOnly"] is False, "checkpoints and outputs are written there"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "acme-pets"
    # Every path finetune gets lies under the mount: a retry finds the checkpoints again.
    paths = [a for a in container["args"] if a.startswith("/")]
    assert all(p.startswith(mount["mountPath"] + "/") for p in paths)


def test_hf_token_is_a_pinned_secret_reference_only_when_asked_for():
    job = crj.render_job(crj.JobSettings(**BASE, hf_token_secret="hf-read", hf_token_secret_version="3"))
    (container,) = task_spec(job)["containers"]
    (hf,) = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
    assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-read", "key": "3"}}}
    assert "env" not in task_spec(crj.render_job(crj.JobSettings(**BASE)))["containers"][0]


def test_validate_job_refuses_a_literal_secret_and_leftover_placeholders():
    job = crj.render_job(crj.JobSettings(**BASE))
    task_spec(job)["containers"][0]["env"] = [{"name": "HF_TOKEN", "value": "hf_abc"}]
    with pytest.raises(ValueError, match="HF_TOKEN holds a literal value"):
        crj.validate_job(job)
    with pytest.raises(ValueError, match=r"placeholder\(s\) \['BUCKET', 'DATASET_PATH'"):
        crj.validate_job(crj.load_template())


def test_l4_runs_the_24gb_preset_at_rank_16():
    job = crj.render_job(crj.JobSettings(**BASE, gpu_type="nvidia-l4", finetune_args=("--epochs", "1")))
    task = task_spec(job)
    assert task["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-l4"
    (container,) = task["containers"]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert container["args"][7:] == ["--epochs", "1", "--memory-preset", "24gb",
                                     "--lora-r", "16", "--lora-alpha", "16"]
    assert job["metadata"]["annotations"]["run.googleapis.com/launch-stage"] == "BETA"
    # A smaller rank of the user's own stays, and the preset is not repeated.
    mine = crj.JobSettings(**BASE, gpu_type="nvidia-l4", finetune_args=("--lora-r=8", "--memory-preset", "24gb"))
    assert mine.resolved_finetune_args == ["--lora-r=8", "--memory-preset", "24gb", "--lora-alpha", "16"]


def test_the_l4_rank_is_the_one_finetune_measured_its_24gb_preset_at():
    from components.finetune import MEMORY_PRESETS

    l4 = crj.GPU_TYPES["nvidia-l4"]
    preset = dict(l4.finetune_args)["--memory-preset"]
    assert f"r={l4.max_lora_r} " in MEMORY_PRESETS[preset].note
    assert dict(l4.finetune_args)["--lora-r"] == str(l4.max_lora_r)


@pytest.mark.parametrize("change, message", [
    (dict(project="Acme"), "--project 'Acme'"),
    (dict(bucket="gs://acme-pets"), "--bucket 'gs://acme-pets'"),
    (dict(region="us central1"), "--region"),
    (dict(job_name="Gemma_Pets"), "--job-name"),
    (dict(gpu_type="nvidia-h100"), "--gpu-type 'nvidia-h100'"),
    (dict(gpu_type="nvidia-l4", cpu=2, memory="8Gi"), "nvidia-l4 needs at least 4 vCPU and 16Gi"),
    (dict(gpu_type="nvidia-l4", cpu=4, memory="24Gi"), "with --cpu 4 Cloud Run allows 2Gi to 16Gi"),
    (dict(gpu_type="nvidia-l4", cpu=12), "nvidia-l4 instances have at most 8 vCPU"),
    (dict(cpu=8, memory="32Gi"), "nvidia-rtx-pro-6000 needs at least 20 vCPU and 80Gi"),
    (dict(memory="32GB"), "--memory '32GB'"),
    (dict(max_retries=11), "--max-retries 11: Cloud Run allows 0 to 10"),
    (dict(task_timeout_s=169 * 3600), "1s to 168h"),
    (dict(gpu_type="nvidia-l4", finetune_args=("--lora-r", "64")),
     "--lora-r 64: nvidia-l4 has 24 GB, which fits Gemma 4 31B at LoRA r<=16"),
    (dict(gpu_type="nvidia-l4", finetune_args=("--memory-preset=fast",)),
     "--memory-preset fast: nvidia-l4 has 24 GB; 31B fits it with --memory-preset 24gb"),
    (dict(hf_token_secret="hf-read"), "--hf-token-secret-version '': expected a version number"),
    (dict(hf_token_secret="hf-read", hf_token_secret_version="latest"), "(pinned, not latest)"),
    (dict(hf_token_secret_version="3"), "--hf-token-secret-version without --hf-token-secret"),
    (dict(output_path="runs/../weights"), "--output-path 'runs/../weights'"),
    (dict(model_path="gs://other-bucket/w"), "is in bucket 'other-bucket'"),
    (dict(finetune_args=("--output-dir=/tmp/x",)), "set it with --model-path"),
    (dict(hf_token_secret="projects/p/secrets/x"), "--hf-token-secret"),
    (dict(service_account="trainer"), "--service-account 'trainer'"),
    (dict(image="trainer latest"), "--image"),
])
def test_settings_outside_cloud_run_limits_are_refused_by_flag(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        crj.JobSettings(**{**BASE, **change})


@pytest.mark.parametrize("hours", [1, 6, 12, 24, 168])
def test_any_task_timeout_up_to_168_hours_is_accepted(hours):
    settings = crj.JobSettings(**BASE, task_timeout_s=hours * 3600)
    assert task_spec(crj.render_job(settings))["timeoutSeconds"] == hours * 3600


def test_render_with_only_the_required_flags(capsys):
    required = ["--project", "acme-ml-123", "--bucket", "acme-pets", "--model-path", "weights/gemma-4",
                "--dataset-path", "datasets/pets", "--output-path", "runs/r1/finetune"]
    assert crj.main(["render", *required]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    task = task_spec(job)
    (container,) = task["containers"]
    assert job["metadata"]["labels"]["cloud.googleapis.com/location"] == "europe-west4"
    assert task["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-rtx-pro-6000"
    assert container["resources"]["limits"] == {"cpu": "20", "memory": "80Gi", "nvidia.com/gpu": "1"}
    assert task["timeoutSeconds"] == 21600 and "env" not in container
    assert crj.main(["render", *required, "--task-timeout", "6h"]) == 0
    assert task_spec(yaml.safe_load(capsys.readouterr().out))["timeoutSeconds"] == 21600
    assert crj.main(["render", *required, "--task-timeout", "24h"]) == 0
    assert "over the 12h Cloud Run documents for GPU tasks" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("45m", 2700), ("1h", 3600),
                                           ("1h30m", 5400), ("7d", 604800), ("90s", 90)])
def test_parse_duration(text, seconds):
    assert crj.parse_duration(text, "--task-timeout") == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "-5", "1.5h"])
def test_parse_duration_refuses_garbage(text):
    with pytest.raises(ValueError, match="--task-timeout"):
        crj.parse_duration(text, "--task-timeout")


def test_spec_user_and_defaults_agree_with_the_image_and_cloud_build():
    # The image runs as root (no USER), which owns the gcsfuse mount: no uid/gid remapping.
    dockerfile = (REPO / "images" / "trainer" / "Dockerfile").read_text()
    assert not re.findall(r"^USER ", dockerfile, re.MULTILINE)
    options = crj.JobSettings.mount_options.split(",")
    # No rename-dir-limit: the steps write files in place with a completion marker, never renaming
    # a folder (tests/test_files.py), so a flat bucket needs no folder renames.
    assert not [o for o in options if o.startswith(("uid=", "gid=", "rename-dir-limit"))]
    substitutions = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())["substitutions"]
    assert (crj.IMAGE_REPOSITORY, crj.IMAGE_NAME) == (substitutions["_REPOSITORY"],
                                                      substitutions["_IMAGE"])


def test_module_imports_neither_torch_nor_the_steps():
    code = ("import sys, deploy.cloud_run_job; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'components')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- the spec as gcloud reads it --------------------------------------------------------------

GCLOUD_PARSE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/third_party"]
from googlecloudsdk.api_lib.util import apis
from googlecloudsdk.api_lib.util import messages as messages_util
messages = apis.GetMessagesModule("run", "v1")
job = messages_util.DictToMessageWithErrorCheck(json.load(open(sys.argv[2])), messages.Job)
task = job.spec.template.spec.template.spec
print(json.dumps({"timeout": task.timeoutSeconds, "retries": task.maxRetries,
                  "accelerator": task.nodeSelector.additionalProperties[0].value,
                  "driver": task.volumes[0].csi.driver,
                  "secret": task.containers[0].env[0].valueFrom.secretKeyRef.name}))
"""


def test_gcloud_parses_the_rendered_spec_as_a_run_v1_job(tmp_path):
    sdk = gcloud_sdk()
    if sdk is None:
        pytest.skip("Google Cloud CLI not installed")
    python, lib = sdk
    job = crj.render_job(crj.JobSettings(**BASE, hf_token_secret="hf-token", hf_token_secret_version="2"))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job))
    done = subprocess.run([python, "-c", GCLOUD_PARSE, str(lib), str(spec)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"timeout": 21600, "retries": 10,
                                       "accelerator": "nvidia-rtx-pro-6000",
                                       "driver": "gcsfuse.run.googleapis.com", "secret": "hf-token"}
    # The same parse fails on a misplaced field, so the pass above is a real check.
    task_spec(job)["maxRetry"] = task_spec(job).pop("maxRetries")
    spec.write_text(json.dumps(job))
    failed = subprocess.run([python, "-c", GCLOUD_PARSE, str(lib), str(spec)],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "maxRetry" in failed.stderr


# --- the CLI against a fake gcloud ------------------------------------------------------------

FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
record = {{"argv": args}}
if args[:3] == ["run", "jobs", "replace"]:
    record["spec"] = open(args[3]).read()
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if args[:3] == ["run", "jobs", "list"]:
    print("\\n".join(n for n in os.environ.get("FAKE_GCLOUD_JOBS", "").split(",") if n))
sys.exit(int(os.environ.get("FAKE_GCLOUD_RC_" + args[2].upper(), "0")))
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A `gcloud` first on PATH that logs each call (and the spec it was given) as JSON lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(FAKE_GCLOUD.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "gcloud.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.delenv("FAKE_GCLOUD_JOBS", raising=False)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return calls


LOCATION = ["--project", "acme-ml-123", "--region", "us-central1"]
LIST = ["run", "jobs", "list", *LOCATION, "--filter=metadata.name=gemma-pets-finetune",
        "--format=value(metadata.name)"]


def test_create_checks_the_job_is_new_then_replaces_with_the_rendered_spec(fake_gcloud):
    assert crj.main(["create", *SPEC_FLAGS, "--", "--epochs", "1"]) == 0
    listed, replaced = fake_gcloud()
    assert listed["argv"] == LIST
    argv = replaced["argv"]
    assert argv[:3] == ["run", "jobs", "replace"] and argv[4:] == LOCATION
    assert argv[3].endswith(".yaml") and not Path(argv[3]).exists(), "temp spec removed"
    expected = crj.render_job(crj.JobSettings(**{**BASE, "dataset_path": "datasets/pets",
                                                 "output_path": "runs/r1/finetune"},
                                              finetune_args=("--epochs", "1")))
    assert yaml.safe_load(replaced["spec"]) == expected


def test_create_refuses_an_existing_job(fake_gcloud, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_JOBS", "other-job,gemma-pets-finetune")
    with pytest.raises(SystemExit, match="already exists in acme-ml-123/us-central1; use `update`"):
        crj.main(["create", *SPEC_FLAGS])
    assert [c["argv"] for c in fake_gcloud()] == [LIST], "nothing replaced"


def test_update_refuses_a_missing_job_and_replaces_an_existing_one(fake_gcloud, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_JOBS", "gemma-pets-finetune-old")  # a prefix is not a match
    with pytest.raises(SystemExit, match="does not exist in acme-ml-123/us-central1; use `create`"):
        crj.main(["update", *SPEC_FLAGS])
    monkeypatch.setenv("FAKE_GCLOUD_JOBS", "gemma-pets-finetune")
    assert crj.main(["update", *SPEC_FLAGS, "--gpu-type", "nvidia-l4"]) == 0
    spec = yaml.safe_load(fake_gcloud()[-1]["spec"])
    assert task_spec(spec)["nodeSelector"]["run.googleapis.com/accelerator"] == "nvidia-l4"


def test_deploy_replaces_without_asking_whether_the_job_exists(fake_gcloud):
    assert crj.main(["deploy", *SPEC_FLAGS, "--job-name", "pets-l4"]) == 0
    (call,) = fake_gcloud()
    assert call["argv"][:3] == ["run", "jobs", "replace"]
    assert yaml.safe_load(call["spec"])["metadata"]["name"] == "pets-l4"


@pytest.mark.parametrize("extra, tail", [([], []), (["--wait"], ["--wait"])])
def test_execute_starts_an_execution(fake_gcloud, extra, tail):
    assert crj.main(["execute", *LOCATION, *extra]) == 0
    assert [c["argv"] for c in fake_gcloud()] == [
        ["run", "jobs", "execute", "gemma-pets-finetune", *LOCATION, *tail]]


def test_a_failing_gcloud_fails_the_command_and_names_it(fake_gcloud, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_RC_REPLACE", "1")
    with pytest.raises(SystemExit, match=r"`gcloud run jobs replace .*\.yaml --project acme-ml-123 "
                                         r"--region us-central1` exited with 1"):
        crj.main(["deploy", *SPEC_FLAGS])
    monkeypatch.setenv("FAKE_GCLOUD_RC_LIST", "1")  # e.g. not logged in: not taken for "missing"
    with pytest.raises(SystemExit, match="jobs list"):
        crj.main(["create", *SPEC_FLAGS])


def test_bad_flags_fail_before_gcloud_runs(fake_gcloud):
    with pytest.raises(SystemExit, match="--task-timeout 608400s: Cloud Run allows 1s to 168h"):
        crj.main(["deploy", *SPEC_FLAGS, "--task-timeout", "169h"])
    assert fake_gcloud() == []


def test_dry_run_prints_the_commands_and_runs_nothing(fake_gcloud, capsys):
    assert crj.main(["create", *SPEC_FLAGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gcloud run jobs list --project acme-ml-123 --region us-central1" in out
    assert "gcloud run jobs replace '<spec.yaml>' --project acme-ml-123 --region us-central1" in out
    assert fake_gcloud() == []


def test_render_writes_the_spec_file(tmp_path):
    out = tmp_path / "job.yaml"
    assert crj.main(["render", *SPEC_FLAGS, "--output", str(out), "--max-retries", "3"]) == 0
    assert task_spec(yaml.safe_load(out.read_text()))["maxRetries"] == 3


def test_the_token_value_never_leaves_the_environment(tmp_path, fake_gcloud):
    token = "hf_NotARealTokenButLongEnough0123456789"
    env = {**os.environ, "HF_TOKEN": token}
    done = subprocess.run([sys.executable, "-m", "deploy.cloud_run_job", "create", *SPEC_FLAGS,
                           "--hf-token-secret", "hf-read", "--hf-token-secret-version", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    assert token not in json.dumps(fake_gcloud())
    assert "secretKeyRef" in fake_gcloud()[-1]["spec"]
