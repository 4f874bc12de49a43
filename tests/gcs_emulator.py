"""A real GCS emulator (gcp-storage-emulator) on 127.0.0.1 for the tests, with a request log.

The emulator's own HTTP server runs in a thread of the test process, in memory, on a free port
the OS picks (port 0, so parallel test runs never collide). Every request it answers is recorded
in ``Emulator.requests`` so a test can prove what went over the wire (e.g. "a rerun downloaded
nothing"), independent of the code under test.

Usage from other test files::

    from tests.gcs_emulator import gcs_emulator_fixture
    gcs = gcs_emulator_fixture()          # module-level: defines a pytest fixture named ``gcs``

    def test_x(gcs):                      # STORAGE_EMULATOR_HOST is set for the test
        gcs.bucket                         # a fresh bucket name, already created
        gcs.uri("weights/")                # "gs://<bucket>/weights/"

or without pytest: ``emulator = start_emulator(); ...; emulator.stop()``.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import os
import threading
import uuid
from functools import partial
from typing import Callable

import pytest
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import buckets as emulator_buckets
from gcp_storage_emulator.storage import Storage

ENV_VAR = "STORAGE_EMULATOR_HOST"


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str  # path + query string, as sent
    range: str | None  # the Range header of a download, if any

    @property
    def is_media_download(self) -> bool:
        """A GET that returns object bytes (JSON API ``alt=media`` or the download endpoint)."""
        return self.method == "GET" and (
            "alt=media" in self.path or self.path.startswith("/download/")
        )

    @property
    def is_upload(self) -> bool:
        return self.path.startswith("/upload/") or (
            self.method == "PUT" and not self.path.startswith("/storage/")
        )

    @property
    def is_compose(self) -> bool:
        return self.method == "POST" and "/compose" in self.path.split("?")[0]


class _RecordingHandler(emulator_server.RequestHandler):
    """The emulator's handler, plus a record of each request line it parsed."""

    log: list[Request]
    lock: threading.Lock

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            with self.lock:
                self.log.append(Request(self.command, self.path, self.headers.get("Range")))
        return ok


class _Server(http.server.HTTPServer):
    # The emulator answers one request at a time; parallel transfer workers queue on the listen
    # backlog, so make it deep enough that no connection is refused (default is 5).
    request_queue_size = 128


@dataclasses.dataclass
class Emulator:
    host: str  # "http://127.0.0.1:PORT", the value of STORAGE_EMULATOR_HOST
    storage: Storage
    requests: list[Request]
    _lock: threading.Lock
    _stop: Callable[[], None]

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        emulator_buckets.create_bucket(name, self.storage)
        return name

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def media_downloads(self) -> list[Request]:
        return [r for r in self.snapshot() if r.is_media_download]

    def uploads(self) -> list[Request]:
        return [r for r in self.snapshot() if r.is_upload]

    def stop(self) -> None:
        self._stop()


def start_emulator() -> Emulator:
    """Start an in-memory emulator on a free 127.0.0.1 port; returns it (``.stop()`` ends it).

    Does not touch the environment: set ``STORAGE_EMULATOR_HOST=emulator.host`` yourself (the
    fixture below does) before creating a storage client.
    """
    # The emulator logs every request at INFO and "content handled as string" at WARNING.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    logging.getLogger("api.object").setLevel(logging.ERROR)
    storage = Storage(use_memory_fs=True)
    log: list[Request] = []
    lock = threading.Lock()
    handler = type("Handler", (_RecordingHandler,), {"log": log, "lock": lock})
    httpd = _Server(("127.0.0.1", 0), partial(handler, storage))
    thread = threading.Thread(target=httpd.serve_forever, name="gcs-emulator", daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return Emulator(host=f"http://{host}:{port}", storage=storage, requests=log, _lock=lock,
                    _stop=stop)


@dataclasses.dataclass
class EmulatorBucket:
    """What a test gets: the running emulator and a fresh bucket on it."""

    emulator: Emulator
    bucket: str

    def uri(self, path: str = "") -> str:
        return f"gs://{self.bucket}/{path}"


def gcs_emulator_fixture(name: str = "gcs"):
    """Return a function-scoped pytest fixture named ``name``: a fresh bucket per test.

    Assign it at module level in a test file (``gcs = gcs_emulator_fixture()``). The emulator
    itself starts once per test module (lazily) and stops when the session ends; each test gets
    its own bucket in an emptied store, STORAGE_EMULATOR_HOST pointing at it, and an empty
    request log.
    """

    @pytest.fixture(name=name)
    def _fixture(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> EmulatorBucket:
        emulator = _module_emulator(request)
        monkeypatch.setenv(ENV_VAR, emulator.host)
        # The emulator rewrites a JSON index of every object it holds on each write, so earlier
        # tests' objects would slow later ones down: start each test from an empty store.
        emulator.storage.wipe()
        emulator.clear_log()
        return EmulatorBucket(emulator=emulator, bucket=emulator.create_bucket())

    return _fixture


_MODULE_EMULATORS: dict[str, Emulator] = {}


def _module_emulator(request: pytest.FixtureRequest) -> Emulator:
    key = request.module.__name__
    if key not in _MODULE_EMULATORS:
        emulator = start_emulator()
        _MODULE_EMULATORS[key] = emulator

        def stop() -> None:
            _MODULE_EMULATORS.pop(key, None)
            emulator.stop()

        request.config.add_cleanup(stop)
    return _MODULE_EMULATORS[key]


def env_for(emulator: Emulator) -> dict[str, str]:
    """Environment for a subprocess (e.g. a step run via the CLI) that must use the emulator."""
    env = dict(os.environ)
    env[ENV_VAR] = emulator.host
    return env
