"""Submit and schedule end to end against a fake Vertex AI REST endpoint and the GCS emulator.

The real google-cloud-aiplatform SDK runs unmodified over REST to tests/fake_vertex.py; the only
thing replaced is where credentials come from (anonymous: there is no Google login here).
Assertions are on the request bodies the fake recorded, i.e. what Vertex would have received.
"""

from __future__ import annotations

import json
import re
import os

import google.auth
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from gcp_storage_emulator import settings as emulator_settings
from google.cloud import storage
from google.cloud.aiplatform.utils import resource_manager_utils

import compile as compile_cli
from pipelines import runtime, submit
from tests.fake_vertex import FakeVertex
from tests.gcs_emulator import gcs_emulator_fixture

gcs = gcs_emulator_fixture()
PROJECT, REGION = "acme-ml", "us-central1"
SERVICE_ACCOUNT = "pipelines@acme-ml.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "pipeline.yaml"
    return compile_cli.compile_pipeline(path, preset="e4b",
                                        image="us-central1-docker.pkg.dev/acme-ml/gp/trainer:0.1.0")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(google.auth, "default",
                        lambda scopes=None, **_: (AnonymousCredentials(), PROJECT))
    with FakeVertex() as server:
        yield server


@pytest.fixture
def project_numbers(monkeypatch):
    """Resource Manager stand-in: the SDK checks the pipeline-root bucket belongs to the project
    (anti bucket-squatting) by comparing the bucket's projectNumber with the project's."""
    asked = []

    def get_project_number(project_id, credentials=None):
        asked.append(project_id)
        return str(emulator_settings.DEFAULT_PROJECT_NUMBER)

    monkeypatch.setattr(resource_manager_utils, "get_project_number", get_project_number)
    return asked


def base_args(template, gcs, fake, *extra):
    return ["--template", str(template), "--project", PROJECT, "--region", REGION,
            "--pipeline-root", gcs.uri("root"), "--api-endpoint", fake.endpoint, *extra]


def write_params(tmp_path, **overrides):
    params = {"weights_source": "gs://acme-models/gemma-4-e4b-it",
              "dataset_source": "gs://acme-data/oxford-pets", "gate": {"margin": 0.02},
              "evaluate": {"limit": None, "mode": "score"}, **overrides}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_submit_sends_spec_parameters_labels_and_service_account(template, gcs, fake, tmp_path,
                                                                 capsys, caplog,
                                                                 project_numbers):
    params = write_params(tmp_path)
    assert submit.main(base_args(
        template, gcs, fake, "--parameters", str(params), "--param", "finetune.lora_r=16",
        "--param", "merge_export.tolerance=0", "--param", "gate.min_accuracy=0.5",
        "--label", "team=vision", "--service-account", SERVICE_ACCOUNT, "--no-caching",
        "--job-id", "pets-run-1", "--display-name", "pets nightly")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    (create,) = fake.recorded("POST", r"/pipelineJobs$")
    assert create.path == f"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"
    assert create.query["pipelineJobId"] == ["pets-run-1"]
    body = create.body
    assert body["displayName"] == "pets nightly"
    assert body["serviceAccount"] == SERVICE_ACCOUNT
    assert body["runtimeConfig"]["gcsOutputDirectory"] == gcs.uri("root")
    # only the keys given travel (the task merges them over the step's defaults); a null is the
    # default, and a tolerance of 0 is a value
    assert body["runtimeConfig"]["parameterValues"] == {
        "weights_source": "gs://acme-models/gemma-4-e4b-it",
        "dataset_source": "gs://acme-data/oxford-pets", "gate": {"margin": 0.02, "min_accuracy": 0.5},
        "evaluate": {"mode": "score"}, "finetune": {"lora_r": 16}, "merge_export": {"tolerance": 0.0}}
    compiled = yaml.safe_load(template.read_text())
    assert body["labels"]["team"] == "vision"
    assert body["labels"]["gemma-pets-version"] == "0-1-0"
    build = submit.template_build(compiled)
    assert body["labels"]["git-commit"] == build["git_commit"].replace("+", "-")[:63]

    sent = body["pipelineSpec"]
    assert sent["pipelineInfo"] == compiled["pipelineInfo"]
    assert sent["deploymentSpec"] == compiled["deploymentSpec"]
    assert set(sent["root"]["dag"]["tasks"]) == set(compiled["root"]["dag"]["tasks"])
    # --no-caching overrides the compiled caching (on) for every task, nested ones included
    caching = [t.get("cachingOptions", {}).get("enableCache")
               for dag in [sent["root"]["dag"]] + [c["dag"] for c in sent["components"].values()
                                                   if "dag" in c]
               for t in dag["tasks"].values()]
    assert caching and not any(caching)
    # compiled: on for every task but the uncached ones (an empty cachingOptions: off)
    compiled_caching = {t["taskInfo"]["name"]: t.get("cachingOptions", {}).get("enableCache", False)
                        for t in compiled["root"]["dag"]["tasks"].values() if "componentRef" in t
                        and "dag" not in compiled["components"][t["componentRef"]["name"]]}
    assert {n for n, on in compiled_caching.items() if not on} == {"resolve-sources",
                                                                   "resolve-champion"}

    # the exact compiled bytes are archived in the pipeline root, content-addressed
    assert printed["pipeline_job"] == f"projects/{PROJECT}/locations/{REGION}/pipelineJobs/pets-run-1"
    assert printed["template_uri"].startswith(gcs.uri("root/templates/gemma-pets-finetune-"))
    bucket, _, blob_name = printed["template_uri"][len("gs://"):].partition("/")
    client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    assert client.bucket(bucket).blob(blob_name).download_as_bytes() == template.read_bytes()
    assert len(gcs.emulator.uploads()) == 1
    # the SDK found the pipeline-root bucket and checked it belongs to the project
    assert project_numbers == [PROJECT]
    assert "Error when trying to get or create a GCS bucket" not in caplog.text


def test_schedule_sends_cron_window_and_concurrency(template, gcs, fake, tmp_path, capsys):
    params = write_params(tmp_path)
    assert submit.main(base_args(
        template, gcs, fake, "--parameters", str(params), "--service-account", SERVICE_ACCOUNT,
        "--schedule-cron", "TZ=Europe/Paris 0 3 * * 1", "--schedule-name", "weekly-pets",
        "--max-concurrent-run-count", "2", "--max-run-count", "10",
        "--start-time", "2026-02-01T00:00:00Z", "--end-time", "2026-06-01T01:00:00+01:00")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert fake.recorded("POST", r"/pipelineJobs$") == []  # a schedule, not an immediate run
    (create,) = fake.recorded("POST", r"/schedules$")
    assert create.path == f"/v1/projects/{PROJECT}/locations/{REGION}/schedules"
    body = create.body
    assert body["displayName"] == "weekly-pets"
    assert body["cron"] == "TZ=Europe/Paris 0 3 * * 1"
    assert int(body["maxConcurrentRunCount"]) == 2
    assert int(body["maxRunCount"]) == 10
    assert body["startTime"] == "2026-02-01T00:00:00Z"
    assert body["endTime"] == "2026-06-01T00:00:00Z"
    request = body["createPipelineJobRequest"]
    assert request["parent"] == f"projects/{PROJECT}/locations/{REGION}"
    job = request["pipelineJob"]
    assert job["serviceAccount"] == SERVICE_ACCOUNT
    assert job["runtimeConfig"]["parameterValues"]["gate"]["margin"] == 0.02
    assert job["runtimeConfig"]["gcsOutputDirectory"] == gcs.uri("root")
    assert job["pipelineSpec"]["pipelineInfo"]["name"] == "gemma-pets-finetune"
    assert printed["schedule"] == f"projects/{PROJECT}/locations/{REGION}/schedules/1"


@pytest.mark.parametrize("extra, message", [
    (["--param", "no_such=1"], "parameter 'no_such' is not in the pipeline"),
    (["--param", "lora_r=16"], "parameter 'lora_r' is not in the pipeline; did you mean finetune.lora_r?"),
    (["--param", "finetune.lora_rank=8"], "parameter finetune.lora_rank: finetune has no key 'lora_rank'"),
    (["--param", "finetune.lora_r=sixteen"], "parameter finetune.lora_r='sixteen': expected int"),
    (["--param", "finetune.lora_dropout=1.5"], "parameter finetune: --lora-dropout must be in [0, 1)"),
    (["--param", "finetune=8"], "parameter 'finetune'=8: expected STRUCT"),
    (["--param", "weights_source=hf_abcdefghijklmnop"], "looks like a Hugging Face token"),
    (["--param", "prepare_dataset.hf_cache_dir=hf_abcdefghijklmnop"], "looks like a Hugging Face token"),
    (["--param", "gate.margin=5"], "parameter gate: margin 5.0: an accuracy difference"),
    (["--param", "gate.min_accuracy=-0.1"], "parameter gate: min_accuracy -0.1: an accuracy"),
    (["--schedule-cron", "every monday"], "--schedule-cron 'every monday'"),
    (["--schedule-cron", "0 3 * * 1", "--start-time", "2026-03-01T00:00:00Z",
      "--end-time", "2026-02-01T00:00:00Z"], "is not after --start-time"),
    (["--start-time", "2026-03-01T00:00:00Z"], "need --schedule-cron"),
    (["--label", "Team=Vision"], "--label 'Team=Vision'"),
])
def test_bad_input_is_refused_before_any_request(template, gcs, fake, tmp_path, capsys, extra, message):
    params = write_params(tmp_path)
    assert submit.main(base_args(template, gcs, fake, "--parameters", str(params), *extra)) == 2
    assert message in capsys.readouterr().err
    assert fake.requests == [] and gcs.emulator.uploads() == []


def test_missing_required_parameters_and_bad_root_and_template(template, gcs, fake, tmp_path, capsys):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"gate": {"margin": 0.1}}))
    assert submit.main(base_args(template, gcs, fake, "--parameters", str(params))) == 2
    assert "required parameters missing: dataset_source, weights_source" in capsys.readouterr().err
    args = base_args(template, gcs, fake, "--parameters", str(write_params(tmp_path)))
    args[args.index("--pipeline-root") + 1] = "/local/root"
    assert submit.main(args) == 2
    assert "--pipeline-root '/local/root'" in capsys.readouterr().err
    assert submit.main(base_args(tmp_path / "missing.yaml", gcs, fake)) == 2
    assert re.search("--template .*missing.yaml: no such file", capsys.readouterr().err)
    assert fake.requests == []


def test_template_with_the_placeholder_image_is_refused(gcs, fake, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GEMMA_PETS_IMAGE", raising=False)
    placeholder = compile_cli.compile_pipeline(tmp_path / "default.yaml")
    assert submit.main(base_args(placeholder, gcs, fake, "--parameters", str(write_params(tmp_path)))) == 2
    assert ("compiled with the placeholder image us-central1-docker.pkg.dev/PROJECT/gemma-pets/trainer"
            in capsys.readouterr().err)
    assert fake.requests == []


def test_hf_token_comes_from_secret_manager_into_the_env_only(fake, monkeypatch):
    secret = "projects/acme-ml/secrets/hf-token"
    value = "hf_plantedSECRETfromSecretManager"
    fake.put_secret(secret + "/versions/latest", value.encode() + b"\n")
    monkeypatch.delenv(runtime.HF_TOKEN_ENV, raising=False)
    session = AuthorizedSession(AnonymousCredentials())
    assert runtime.load_hf_token(secret, endpoint=fake.endpoint + "/v1", session=session)
    assert os.environ[runtime.HF_TOKEN_ENV] == value
    (access,) = fake.recorded("GET", r":access$")
    assert access.path == f"/v1/{secret}/versions/latest:access"

    # a token already in the environment wins; no request is made
    assert not runtime.load_hf_token(secret, endpoint=fake.endpoint + "/v1", session=session)
    assert len(fake.recorded("GET", r":access$")) == 1

    monkeypatch.delenv(runtime.HF_TOKEN_ENV)
    with pytest.raises(PermissionError, match="HTTP 403") as exc:
        runtime.load_hf_token("projects/acme-ml/secrets/other/versions/3",
                              endpoint=fake.endpoint + "/v1", session=session)
    assert value not in str(exc.value)
    with pytest.raises(ValueError, match="hf_token_secret 'hf-token'"):
        runtime.load_hf_token("hf-token", endpoint=fake.endpoint + "/v1", session=session)
    assert runtime.HF_TOKEN_ENV not in os.environ
