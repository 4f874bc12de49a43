"""resolve-source: the fingerprint follows a source's listing, and only its listing."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from components import gcs, sources
from components.sources import ResolveSourceConfig
from tests.gcs_emulator import gcs_emulator_fixture

gcs_env = gcs_emulator_fixture("gcs_env")


def fingerprint(source: str, **kwargs) -> str:
    return sources.run(ResolveSourceConfig(source=source, **kwargs))["fingerprint"]


def make_folder(root: Path) -> Path:
    for name in ("images/a_1.jpg", "images/b_1.jpg", "annotations/list.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def test_local_fingerprint_follows_added_removed_and_rewritten_files(tmp_path):
    folder = make_folder(tmp_path / "pets")
    first = fingerprint(str(folder))
    (folder / "images/a_1.jpg").read_bytes()  # reading changes nothing
    assert fingerprint(str(folder)) == first
    (folder / "images/c_1.jpg").write_bytes(b"new")
    added = fingerprint(str(folder))
    assert added != first
    (folder / "images/c_1.jpg").unlink()
    assert fingerprint(str(folder)) == first  # back to the same listing
    stat = (folder / "images/b_1.jpg").stat()
    (folder / "images/b_1.jpg").write_bytes(b"other bytes, same name")
    assert fingerprint(str(folder)) != first
    # rewritten with the same size: the mtime tells
    (folder / "images/b_1.jpg").write_bytes(b"images/b_1.jpg")
    os.utime(folder / "images/b_1.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint(str(folder)) != first
    os.utime(folder / "images/b_1.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(str(folder)) == first
    result = sources.run(ResolveSourceConfig(source=str(folder), kind="dataset"))
    assert (result["files"], result["resolved_revision"]) == (3, "")


def test_gcs_fingerprint_follows_the_object_listing(gcs_env):
    prefix = gcs_env.uri("pets")
    for name in ("images/a_1.jpg", "images/b_1.jpg"):
        gcs.upload_bytes(name.encode(), gcs.join_uri(prefix, name))
    gcs.upload_bytes(b"outside", gcs_env.uri("pets-other/x.jpg"))  # a sibling prefix: not listed
    first = fingerprint(prefix)
    assert fingerprint(prefix) == first
    assert fingerprint(gcs.fuse_path(prefix)) == first  # Vertex's /gcs/ path of the same prefix
    gcs.upload_bytes(b"c", gcs.join_uri(prefix, "images/c_1.jpg"))
    assert fingerprint(prefix) != first
    gcs.delete_objects([gcs.join_uri(prefix, "images/c_1.jpg")])
    assert fingerprint(prefix) == first
    gcs.upload_bytes(b"images/a_1.jpg", gcs.join_uri(prefix, "images/a_1.jpg"))  # same bytes,
    assert fingerprint(prefix) != first  # a new generation
    single = gcs.join_uri(prefix, "images/b_1.jpg")
    assert sources.run(ResolveSourceConfig(source=single))["files"] == 1


@pytest.fixture
def fake_hub(monkeypatch):
    """Answers /api/{models,datasets}/REPO/revision/REV with the sha `main` points at now."""
    import huggingface_hub.constants

    state = {"main": "a" * 40}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            kind, _, rest = path.removeprefix("/api/").partition("/")
            repo, _, rev = rest.partition("/revision/")
            sha = state.get(rev, rev if len(rev) == 40 else None)
            body = json.dumps({"id": repo, "sha": sha, "siblings": []} if sha else
                              {"error": "Invalid rev id"}).encode()
            self.send_response(200 if sha else 404)
            if not sha:
                self.send_header("X-Error-Code", "RevisionNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield state
    server.shutdown()


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_hub_revision_resolves_to_the_sha_main_points_at_now(fake_hub, kind):
    config = ResolveSourceConfig(source="google/gemma-test", kind=kind, revision="main")
    first = sources.run(config)
    assert first["resolved_revision"] == "a" * 40
    assert sources.run(config)["fingerprint"] == first["fingerprint"]
    fake_hub["main"] = "b" * 40  # a new commit on main
    moved = sources.run(config)
    assert moved["resolved_revision"] == "b" * 40 and moved["fingerprint"] != first["fingerprint"]
    pinned = sources.run(ResolveSourceConfig(source="google/gemma-test", kind=kind, revision="c" * 40))
    assert pinned["resolved_revision"] == "c" * 40


def test_missing_local_source_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file or folder"):
        sources.main(["--source", str(tmp_path / "nope")])
