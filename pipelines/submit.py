"""Submit a compiled pipeline to Vertex AI Pipelines, or create a recurring schedule for it.

    python -m pipelines.submit --template pipeline.yaml --project P --region us-central1 \\
        --pipeline-root gs://BUCKET/pipeline-root --service-account SA@P.iam.gserviceaccount.com \\
        --parameters params.yaml [--param gate.margin=0.02] [--label team=vision] [--no-caching]
    ... --schedule-cron "0 3 * * 1" [--schedule-name weekly] [--max-concurrent-run-count 1] \\
        [--start-time 2026-01-01T00:00:00Z] [--end-time ...] [--max-run-count N]

Everything is checked before any network call: the template parses, each parameter exists in it
with the right type, each key of a step's dict (``--param finetune.epochs=1``) is a field of the
step's config with the right type and passes the config's own checks (pipelines/params.py),
required parameters are given, nothing looks like a token (the Hugging Face
token never travels as a parameter: pass ``hf_token_secret``, the Secret Manager resource name).
The template is archived next to the run's artifacts (``<pipeline-root>/templates/<name>-<sha>.yaml``,
content-addressed) and the job is created from that copy, so a run always points at the exact YAML
it ran. Prints one JSON line: the job (or schedule) resource name, template URI and console URL.
``--api-endpoint http://127.0.0.1:PORT`` talks to a local fake (the tests do).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from components.cli import entrypoint
from pipelines import params

# Parameter types of the PipelineSpec (pipeline_spec_pb2.ParameterType names).
_PY_TYPES = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float),
             "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z?LW#]+$")


class SubmitError(ValueError):
    pass


def load_template(path: str) -> dict[str, Any]:
    template_path = Path(path)
    if not template_path.is_file():
        raise SubmitError(f"--template {path}: no such file (run `make compile` first)")
    try:
        spec = yaml.safe_load(template_path.read_text())
    except yaml.YAMLError as err:
        raise SubmitError(f"--template {path}: not YAML/JSON: {err}") from err
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise SubmitError(f"--template {path}: not a compiled KFP PipelineSpec "
                          "(no pipelineInfo/root)")
    return spec


def template_parameters(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def template_build(spec: dict[str, Any]) -> dict[str, str]:
    """The compile-time build identity (project version, git commit, image) baked into tasks."""
    for task in spec["root"].get("dag", {}).get("tasks", {}).values():
        constant = (task.get("inputs", {}).get("parameters", {}).get("build", {})
                    .get("runtimeValue", {}).get("constant"))
        if isinstance(constant, dict):
            return {k: str(v) for k, v in constant.items()}
    return {}


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_parameters(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers over earlier ones; a step's dict is merged key by key, and ``step.key``
    names one key of it (``finetune.epochs``)."""
    values: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            step, dot, key = name.partition(".")
            if dot:
                name, value = step, {key: value}
            if isinstance(value, dict) and isinstance(values.get(name), dict):
                value = {**values[name], **value}
            values[name] = value
    return values


def load_parameters(path: str | None, overrides: list[str]) -> dict[str, Any]:
    loaded: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise SubmitError(f"--parameters {path}: no such file")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise SubmitError(f"--parameters {path}: not YAML/JSON: {err}") from err
        if not isinstance(loaded, dict):
            raise SubmitError(f"--parameters {path}: must hold a mapping name -> value")
    given = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--param {item!r}: expected NAME=VALUE or STEP.KEY=VALUE")
        given[name] = _scalar(raw)
    return merge_parameters(loaded, given)


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


def _unknown(name: str, declared: dict[str, Any]) -> SubmitError:
    steps = [f"{s}.{name}" for s in params.STEPS if s in declared and name in params.keys(s)]
    hint = f"; did you mean {' or '.join(steps)}?" if steps else ""
    return SubmitError(f"parameter {name!r} is not in the pipeline{hint} known: "
                       f"{', '.join(sorted(declared))}")


def check_parameters(values: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown names and keys, wrong types, bad step values, missing required parameters
    and token-like values. Returns the values to send."""
    declared, checked = template_parameters(spec), {}
    for name, value in values.items():
        if name not in declared:
            raise _unknown(name, declared)
        if "token" in name.lower() and name != "hf_token_secret":
            raise SubmitError(f"parameter {name!r}: tokens are never pipeline parameters")
        if any(_TOKEN_VALUE.search(text) for text in _strings(value)):
            raise SubmitError(f"parameter {name!r} holds what looks like a Hugging Face token; "
                              "store it in Secret Manager and pass hf_token_secret="
                              "projects/P/secrets/NAME instead")
        kind = declared[name].get("parameterType", "STRING")
        if value is None:
            # An explicit null is dropped so the spec's default applies instead.
            if not declared[name].get("isOptional"):
                raise SubmitError(f"parameter {name!r} may not be null")
            continue
        allowed = _PY_TYPES.get(kind, (object,))
        if isinstance(value, bool) and kind != "BOOLEAN" or not isinstance(value, allowed):
            raise SubmitError(f"parameter {name!r}={value!r}: expected {kind}")
        if name in params.STEPS:  # before any GPU time: the step config's own checks
            value = params.check(name, value)
            params.check_values(name, value)
        # kfp.local refuses an int for a NUMBER_DOUBLE (`min_accuracy=0`)
        checked[name] = float(value) if kind == "NUMBER_DOUBLE" else value
    missing = [n for n, d in declared.items()
               if n not in values and "defaultValue" not in d and not d.get("isOptional")]
    if missing:
        raise SubmitError(f"required parameters missing: {', '.join(sorted(missing))} "
                          "(--parameters FILE or --param NAME=VALUE)")
    return checked


def parse_labels(items: list[str], build: dict[str, str]) -> dict[str, str]:
    labels = {}
    if build.get("project_version"):
        labels["gemma-pets-version"] = re.sub(r"[^a-z0-9_-]", "-", build["project_version"].lower())
    if build.get("git_commit"):
        labels["git-commit"] = re.sub(r"[^a-z0-9_-]", "-", build["git_commit"].lower())[:63]
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL.match(key) or not _LABEL_VALUE.match(value):
            raise SubmitError(f"--label {item!r}: expected key=value, lowercase letters, digits, "
                              "- and _ (key starts with a letter, both at most 63 characters)")
        labels[key] = value
    return labels


def _timestamp(flag: str, text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise SubmitError(f"{flag} {text!r}: expected RFC 3339, e.g. 2026-01-31T03:00:00Z") from err
    if parsed.tzinfo is None:
        raise SubmitError(f"{flag} {text!r}: give a time zone (e.g. a trailing Z for UTC)")
    return parsed.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_cron(cron: str) -> str:
    fields = cron.split()
    if fields and re.match(r"^(CRON_TZ|TZ)=\S+$", fields[0]):
        fields = fields[1:]
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise SubmitError(f"--schedule-cron {cron!r}: expected 5 cron fields, optionally prefixed "
                          "with TZ=Area/City, e.g. 'TZ=Europe/Paris 0 3 * * 1'")
    return cron


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default="pipeline.yaml", help="compiled pipeline YAML")
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    parser.add_argument("--pipeline-root", required=True,
                        help="gs:// folder for the run's artifacts (and the archived template)")
    parser.add_argument("--service-account", default=None,
                        help="service account the tasks run as (needs Storage and, with "
                             "hf_token_secret, Secret Manager accessor)")
    parser.add_argument("--parameters", default=None, help="JSON/YAML file of parameter values")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="one parameter value (YAML scalar), or one key of a step's dict as "
                             "STEP.KEY=VALUE; overrides --parameters")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="label of the job (the project version and git commit are added)")
    parser.add_argument("--display-name", default=None, help="job display name")
    parser.add_argument("--job-id", default=None, help="job id (default: pipeline name + time)")
    parser.add_argument("--caching", action=argparse.BooleanOptionalAction, default=None,
                        help="force caching on/off for every task (default: as compiled: on)")
    parser.add_argument("--network", default=None, help="VPC network to peer, if any")
    parser.add_argument("--api-endpoint", default=None,
                        help="Vertex AI API endpoint override (http://127.0.0.1:PORT for a fake)")
    parser.add_argument("--api-transport", default="rest", choices=["rest", "grpc"],
                        help="API transport (default rest)")
    parser.add_argument("--wait", action="store_true", help="block until the run finishes")
    parser.add_argument("--schedule-cron", default=None,
                        help="create a schedule with this cron instead of one run")
    parser.add_argument("--schedule-name", default=None, help="schedule display name")
    parser.add_argument("--max-concurrent-run-count", type=int, default=1,
                        help="runs of the schedule allowed at once (default 1)")
    parser.add_argument("--max-run-count", type=int, default=None,
                        help="stop the schedule after this many runs")
    parser.add_argument("--start-time", default=None, help="schedule start, RFC 3339")
    parser.add_argument("--end-time", default=None, help="schedule end, RFC 3339")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything submit needs, checked; raises SubmitError naming the flag/file/parameter."""
    if not args.pipeline_root.startswith("gs://") or len(args.pipeline_root) <= len("gs://"):
        raise SubmitError(f"--pipeline-root {args.pipeline_root!r}: Vertex AI needs a gs:// folder")
    spec = load_template(args.template)
    build = template_build(spec)
    if "/PROJECT/" in build.get("image", ""):
        raise SubmitError(f"--template {args.template} was compiled with the placeholder image "
                          f"{build['image']}; recompile with --image (or $GEMMA_PETS_IMAGE) "
                          "naming your project's Artifact Registry image")
    values = check_parameters(load_parameters(args.parameters, args.param), spec)
    labels = parse_labels(args.label, build)
    schedule = None
    if args.schedule_cron is not None:
        if args.max_concurrent_run_count < 1:
            raise SubmitError("--max-concurrent-run-count must be >= 1")
        if args.max_run_count is not None and args.max_run_count < 1:
            raise SubmitError("--max-run-count must be >= 1")
        start, end = (_timestamp("--start-time", args.start_time),
                      _timestamp("--end-time", args.end_time))
        if start and end and end <= start:
            raise SubmitError(f"--end-time {end} is not after --start-time {start}")
        schedule = {"cron": check_cron(args.schedule_cron), "start_time": start, "end_time": end,
                    "max_concurrent_run_count": args.max_concurrent_run_count,
                    "max_run_count": args.max_run_count,
                    "display_name": args.schedule_name or f"{spec['pipelineInfo']['name']}-schedule"}
    elif any(v is not None for v in (args.schedule_name, args.start_time, args.end_time,
                                      args.max_run_count)):
        raise SubmitError("--schedule-name/--start-time/--end-time/--max-run-count need "
                          "--schedule-cron")
    return {"spec": spec, "build": build, "values": values, "labels": labels,
            "schedule": schedule}


def archive_template(template: str, pipeline_root: str, spec: dict[str, Any], project: str,
                     credentials: Any) -> str:
    """Upload the template to <pipeline_root>/templates/<name>-<sha256[:16]>.yaml (once)."""
    from google.cloud import storage

    data = Path(template).read_bytes()
    name = f"{spec['pipelineInfo']['name']}-{hashlib.sha256(data).hexdigest()[:16]}.yaml"
    bucket_name, _, prefix = pipeline_root[len("gs://"):].partition("/")
    blob_name = "/".join(p for p in (prefix.strip("/"), "templates", name) if p)
    client = storage.Client(project=project, credentials=credentials)
    blob = client.bucket(bucket_name).blob(blob_name)
    if not blob.exists():  # content-addressed: an existing object holds these exact bytes
        blob.upload_from_string(data, content_type="application/x-yaml")
    return f"gs://{bucket_name}/{blob_name}"


def submit(args: argparse.Namespace, credentials: Any = None) -> dict[str, Any]:
    checked = validate(args)
    import google.auth

    if credentials is None:  # before the heavy aiplatform import: no credentials fails at once
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
    from google.cloud import aiplatform

    aiplatform.init(project=args.project, location=args.region, credentials=credentials,
                    api_endpoint=args.api_endpoint, api_transport=args.api_transport)
    template_uri = archive_template(args.template, args.pipeline_root, checked["spec"],
                                    args.project, credentials)
    job = aiplatform.PipelineJob(
        display_name=args.display_name or checked["spec"]["pipelineInfo"]["name"],
        template_path=template_uri, job_id=args.job_id, pipeline_root=args.pipeline_root,
        parameter_values=checked["values"], enable_caching=args.caching,
        labels=checked["labels"], project=args.project, location=args.region,
        credentials=credentials)
    record: dict[str, Any] = {"template_uri": template_uri, "labels": checked["labels"],
                              "parameters": checked["values"], "build": checked["build"]}
    schedule = checked["schedule"]
    if schedule is not None:
        created = job.create_schedule(
            cron=schedule["cron"], display_name=schedule["display_name"],
            start_time=schedule["start_time"], end_time=schedule["end_time"],
            max_concurrent_run_count=schedule["max_concurrent_run_count"],
            max_run_count=schedule["max_run_count"], service_account=args.service_account,
            network=args.network)
        record.update(schedule=created.resource_name, cron=schedule["cron"])
        return record
    job.submit(service_account=args.service_account, network=args.network)
    record.update(pipeline_job=job.resource_name, console_url=job._dashboard_uri())
    if args.wait:
        job.wait()
        record["state"] = job.state.name
    return record


def _main(argv: list[str] | None = None) -> int:
    from google.auth.exceptions import DefaultCredentialsError

    try:
        record = submit(parse_args(argv))
    except DefaultCredentialsError as err:
        raise SubmitError(f"no Google Cloud credentials ({err}); run `gcloud auth application-default "
                          "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a key file") from err
    print(json.dumps(record, sort_keys=True))
    return 0


main = entrypoint(_main, user_errors=(SubmitError,))


if __name__ == "__main__":
    sys.exit(main())
