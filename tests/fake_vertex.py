"""A small fake of the Vertex AI (and Secret Manager) REST API on 127.0.0.1, with a request log.

It answers what google-cloud-aiplatform's REST transport sends for pipeline work, in the shapes
of the v1 API, so the SDK neither hangs nor retries:

* ``POST /v1/projects/P/locations/L/pipelineJobs?pipelineJobId=ID`` -> the PipelineJob (create
  returns the resource itself, not a long-running operation), state PIPELINE_STATE_PENDING;
* ``GET  /v1/projects/P/locations/L/pipelineJobs/ID`` -> the stored job (a test may attach a
  ``jobDetail`` with task details, as a finished run has);
* ``POST /v1/projects/P/locations/L/schedules`` -> the Schedule, state ACTIVE;
* ``GET  /v1/projects/P/locations/L/schedules/ID``;
* ``GET  /v1/projects/P/secrets/S/versions/V:access`` -> a stored secret's payload;
* ``POST /v1/projects/P/locations/L/models:upload`` -> a done long-running operation whose
  response names the model and its new version: a new model (``modelId``) or a new version of
  ``parentModel``; ``model.versionAliases`` move to the new version (aliases are unique per model);
* ``GET  /v1/projects/P/locations/L/models/ID[@VERSION|@ALIAS]`` -> that version (no suffix: the
  one holding the alias ``default``);
* anything else -> 404 in Google's error shape.

Every request is recorded (method, path, query, JSON body) so tests assert on what went over
the wire. Usage: ``with FakeVertex() as fake: fake.endpoint  # "http://127.0.0.1:PORT"``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_JOBS = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/pipelineJobs$")
_JOB = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/pipelineJobs/[^/:]+)$")
_SCHEDULES = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/schedules$")
_SCHEDULE = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/schedules/[^/:]+)$")
_UPLOAD = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/models:upload$")
_MODEL = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/models/[^/@:]+)(?:@([^/:]+))?$")
_SECRET = re.compile(r"^/v1/(projects/[^/]+/secrets/[^/]+/versions/[^/:]+):access$")

CREATE_TIME = "2026-01-01T00:00:00Z"  # fixed: the fake's answers are deterministic


@dataclasses.dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]


class FakeVertex:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.schedules: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, bytes] = {}
        self.models: dict[str, list[dict[str, Any]]] = {}  # model name -> versions, oldest first
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-vertex")

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeVertex":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def recorded(self, method: str, path_pattern: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests
                    if r.method == method and re.search(path_pattern, r.path)]

    def put_job(self, name: str, job: dict[str, Any]) -> None:
        """Store a job as GET will return it (e.g. a finished run with jobDetail.taskDetails)."""
        with self._lock:
            self.jobs[name] = {**job, "name": name}

    def put_secret(self, version_name: str, value: bytes) -> None:
        with self._lock:
            self.secrets[version_name] = value

    # -- request handling --------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, Any]:
        with self._lock:
            if method == "POST" and (m := _JOBS.match(path)):
                job_id = query.get("pipelineJobId", ["job-%d" % (len(self.jobs) + 1)])[0]
                name = f"{m.group(1)}/pipelineJobs/{job_id}"
                if name in self.jobs:
                    return 409, _error(409, f"{name} already exists", "ALREADY_EXISTS")
                job = {**body, "name": name, "state": "PIPELINE_STATE_PENDING",
                       "createTime": CREATE_TIME, "updateTime": CREATE_TIME}
                self.jobs[name] = job
                return 200, job
            if method == "GET" and (m := _JOB.match(path)):
                job = self.jobs.get(m.group(1))
                return (200, job) if job else (404, _error(404, f"{m.group(1)} not found"))
            if method == "POST" and (m := _SCHEDULES.match(path)):
                name = f"{m.group(1)}/schedules/{len(self.schedules) + 1}"
                schedule = {**body, "name": name, "state": "ACTIVE", "createTime": CREATE_TIME,
                            "nextRunTime": body.get("startTime", CREATE_TIME)}
                self.schedules[name] = schedule
                return 200, schedule
            if method == "GET" and (m := _SCHEDULE.match(path)):
                schedule = self.schedules.get(m.group(1))
                return (200, schedule) if schedule else (404, _error(404, "not found"))
            if method == "POST" and (m := _UPLOAD.match(path)):
                return self._upload(m.group(1), body)
            if method == "GET" and (m := _MODEL.match(path)):
                version = self._model_version(m.group(1), m.group(2) or "default")
                return (200, version) if version else (404, _error(404, f"{path} not found"))
            if method == "GET" and (m := _SECRET.match(path)):
                name = m.group(1)
                if name not in self.secrets:  # what an account without accessor role gets
                    return 403, _error(403, "Permission 'secretmanager.versions.access' denied",
                                       "PERMISSION_DENIED")
                data = base64.b64encode(self.secrets[name]).decode()
                return 200, {"name": name, "payload": {"data": data}}
        return 404, _error(404, f"{method} {path} is not faked")

    def _upload(self, location: str, body: dict[str, Any]) -> tuple[int, Any]:
        parent = body.get("parentModel")
        name = parent or f"{location}/models/{body.get('modelId') or len(self.models) + 1}"
        if parent and parent not in self.models:
            return 404, _error(404, f"parent model {parent} not found")
        if not parent and name in self.models:
            return 409, _error(409, f"{name} already exists", "ALREADY_EXISTS")
        versions = self.models.setdefault(name, [])
        aliases = list(body["model"].get("versionAliases", []))
        for older in versions:
            older["versionAliases"] = [a for a in older["versionAliases"] if a not in aliases]
        version_id = str(len(versions) + 1)
        versions.append({**body["model"], "name": name, "versionId": version_id,
                         "versionAliases": aliases, "createTime": CREATE_TIME,
                         "versionCreateTime": CREATE_TIME, "updateTime": CREATE_TIME})
        return 200, {"name": f"{location}/operations/upload-{len(self.requests)}", "done": True,
                     "response": {"@type": "type.googleapis.com/google.cloud.aiplatform.v1."
                                           "UploadModelResponse",
                                  "model": name, "modelVersionId": version_id}}

    def _model_version(self, name: str, version: str) -> dict[str, Any] | None:
        return next((v for v in self.models.get(name, [])
                     if version == v["versionId"] or version in v["versionAliases"]), None)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _serve(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                url = url._replace(path=urllib.parse.unquote(url.path))  # models/ID%40champion
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = urllib.parse.parse_qs(url.query)
                with fake._lock:
                    fake.requests.append(Recorded(self.command, url.path, query, body,
                                                  dict(self.headers.items())))
                status, answer = fake._route(self.command, url.path, query, body or {})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

        return Handler


def _error(code: int, message: str, status: str = "NOT_FOUND") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}
