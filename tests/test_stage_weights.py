"""components.stage_weights: local folders, gs:// (real emulator) and a fake Hugging Face Hub.

The fake Hub is a small HTTP server on 127.0.0.1 speaking the three endpoints huggingface_hub
2.4.0 uses for a download (revision info, recursive tree, HEAD/GET /resolve) with the Hub's
headers; HF_ENDPOINT points the step at it. It records every request (with its Authorization
header), so the tests prove the token travels as a header and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from components import gcs
from components import stage_weights as sw
from components.artifacts import WEIGHTS_MANIFEST
from components.files import sha256_file
from tests.gcs_emulator import gcs_emulator_fixture

gcs_env = gcs_emulator_fixture("gcs_env")

KiB = 1024
PLANTED_TOKEN = "hf_PLANTEDsecretTOKEN0123456789abcdef"
SMALL = dict(chunk_size_mib=4 * KiB / gcs.MiB, parallel_threshold_mib=8 * KiB / gcs.MiB,
             max_workers=2)  # 4 KiB chunks from 8 KiB up: chunking really happens


def _bytes(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


MODEL_FILES = {
    "config.json": b'{"model_type": "gemma4", "hidden_size": 8}',
    "tokenizer_config.json": b'{"chat_template": null}',
    "chat_template.jinja": b"{{ messages }}",
    "tokenizer.model": _bytes(3 * KiB, 1),
    "model-00001-of-00002.safetensors": _bytes(40 * KiB, 2),  # 10 chunks of 4 KiB
    "model-00002-of-00002.safetensors": _bytes(9 * KiB + 7, 3),
    "model.safetensors.index.json": b'{"weight_map": {}}',
}
EXTRA_FILES = {"README.md": b"# card", "pytorch_model.bin": b"duplicate weights", ".gitattributes": b"*"}


def _model_dir(root: Path, files: dict[str, bytes] = MODEL_FILES, extra: bool = True) -> Path:
    for rel, data in {**files, **(EXTRA_FILES if extra else {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tree(root: Path, skip_manifest: bool = True) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip_manifest and p.name == WEIGHTS_MANIFEST)}


def _expected_tree(files: dict[str, bytes] = MODEL_FILES) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def _check_manifest(manifest: dict, files: dict[str, bytes] = MODEL_FILES) -> None:
    assert [f["path"] for f in manifest["files"]] == sorted(files)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == _expected_tree(files)
    assert {f["path"]: f["size"] for f in manifest["files"]} == {k: len(v) for k, v in files.items()}
    assert manifest["total_bytes"] == sum(len(v) for v in files.values())
    canonical = json.dumps(sorted(({"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                   for p, d in files.items()), key=lambda e: e["path"]),
                           sort_keys=True, separators=(",", ":")).encode()
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()


# ------------------------------------------------------------------------------ config


def test_config_errors_name_the_flag_or_path(tmp_path):
    dest = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--source .*missing.*does not exist"):
        sw.StageWeightsConfig(source=str(tmp_path / "missing"), destination=dest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--source .*empty.*is empty"):
        sw.StageWeightsConfig(source=str(tmp_path / "empty"), destination=dest)
    _model_dir(tmp_path / "noconfig", {"model.safetensors": b"x"}, extra=False)
    with pytest.raises(ValueError, match=r"--source .*noconfig.*has no config\.json"):
        sw.StageWeightsConfig(source=str(tmp_path / "noconfig"), destination=dest)
    with pytest.raises(ValueError, match=r"--source: .*bucket name"):
        sw.StageWeightsConfig(source="gs://Bad_Bucket!/x", destination=dest)
    with pytest.raises(ValueError, match=r"--destination: .*gs://"):
        sw.StageWeightsConfig(source="google/gemma-4-e2b-it", destination="gs://b//x")
    with pytest.raises(ValueError, match=r"--source .*neither"):
        sw.StageWeightsConfig(source="not a repo id!", destination=dest)
    src = _model_dir(tmp_path / "src")
    with pytest.raises(ValueError, match="must not contain one another"):
        sw.StageWeightsConfig(source=str(src), destination=str(src / "sub"))
    with pytest.raises(ValueError, match="--chunk-size-mib"):
        sw.StageWeightsConfig(source=str(src), destination=dest, chunk_size_mib=0)
    with pytest.raises(ValueError, match="--allow-patterns .*config.json"):
        sw.StageWeightsConfig(source=str(src), destination=dest, allow_patterns=["*.safetensors"])
    assert sw.main(["--source", str(tmp_path / "missing"), "--destination", dest]) == 2
    # Source kinds, incl. Vertex FUSE paths read through the API
    assert sw.StageWeightsConfig(source="google/gemma-4-e2b-it", destination=dest).source_kind == "hf"
    cfg = sw.StageWeightsConfig(source="/gcs/bkt/models/g", destination="/gcs/bkt/out")
    assert (cfg.source_kind, cfg.source_location) == ("gcs", "gs://bkt/models/g")
    assert (cfg.destination_kind, cfg.destination_location) == ("gcs", "gs://bkt/out")


# ------------------------------------------------------------------------- local -> local


def test_local_to_local_hardlinks_verifies_and_rerun_changes_nothing(tmp_path):
    src = _model_dir(tmp_path / "src")
    dest = tmp_path / "artifact"
    manifest = sw.run(sw.StageWeightsConfig(source=str(src), destination=str(dest)))

    _check_manifest(manifest)
    assert manifest["source_kind"] == "local" and manifest["source"] == str(src)
    assert sw.read_json(dest / WEIGHTS_MANIFEST) == manifest
    assert _tree(dest) == _expected_tree()  # README, .bin, .gitattributes not staged
    assert all(os.path.samefile(src / rel, dest / rel) for rel in MODEL_FILES)  # hard links

    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.rglob("*")}
    again = sw.run(sw.StageWeightsConfig(source=str(src), destination=str(dest)))
    assert again == manifest
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.rglob("*")} == before


def test_local_copy_without_hardlink_and_changed_source_restages(tmp_path):
    src = _model_dir(tmp_path / "src")
    dest = tmp_path / "artifact"
    first = sw.run(sw.StageWeightsConfig(source=str(src), destination=str(dest), hardlink=False))
    assert not any(os.path.samefile(src / rel, dest / rel) for rel in MODEL_FILES)
    # A staged file damaged after the fact (same size) is noticed on the rerun and re-copied.
    (dest / "tokenizer.model").write_bytes(_bytes(3 * KiB, 77))
    assert sw.run(sw.StageWeightsConfig(source=str(src), destination=str(dest),
                                        hardlink=False))["files"] == first["files"]
    assert _tree(dest) == _expected_tree()
    # A new shard layout at the source: the old shard must not survive in the destination.
    (src / "model-00002-of-00002.safetensors").unlink()
    (src / "model-00001-of-00002.safetensors").rename(src / "model.safetensors")
    files = {k: v for k, v in MODEL_FILES.items() if not k.startswith("model-0000")}
    files["model.safetensors"] = MODEL_FILES["model-00001-of-00002.safetensors"]
    second = sw.run(sw.StageWeightsConfig(source=str(src), destination=str(dest), hardlink=False))
    _check_manifest(second, files)
    assert second["manifest_sha256"] != first["manifest_sha256"]
    assert _tree(dest) == _expected_tree(files)


def test_cli_entrypoint(tmp_path):
    from components.__main__ import main as gemma_pets

    src = _model_dir(tmp_path / "src")
    assert gemma_pets(["stage-weights", "--source", str(src), "--destination",
                       str(tmp_path / "out"), "--allow-patterns", "*.json", "*.safetensors"]) == 0
    manifest = sw.read_json(tmp_path / "out" / WEIGHTS_MANIFEST)
    assert {f["path"] for f in manifest["files"]} == {k for k in MODEL_FILES if k.endswith(
        (".json", ".safetensors"))}


# ---------------------------------------------------------------------------- gs:// paths


def test_local_to_gcs_then_gcs_to_local_and_reruns_transfer_nothing(gcs_env, tmp_path):
    src = _model_dir(tmp_path / "src")
    staged_uri = gcs_env.uri("models/gemma")
    up = sw.run(sw.StageWeightsConfig(source=str(src), destination=staged_uri, **SMALL))
    _check_manifest(up)
    remote = {gcs.relative_name(o, staged_uri): o for o in gcs.list_objects(staged_uri)}
    assert set(remote) == set(MODEL_FILES) | {WEIGHTS_MANIFEST}
    assert json.loads(gcs.download_bytes(gcs.join_uri(staged_uri, WEIGHTS_MANIFEST))) == up
    assert any(r.is_compose for r in gcs_env.emulator.snapshot())  # the 40 KiB shard went in pieces

    gcs_env.emulator.clear_log()
    assert sw.run(sw.StageWeightsConfig(source=str(src), destination=staged_uri, **SMALL)) == up
    assert gcs_env.emulator.uploads() == [] and gcs_env.emulator.media_downloads() != []
    # (the only download is the destination's manifest, read to decide there is nothing to do)
    assert all(r.path.split("?")[0].endswith(WEIGHTS_MANIFEST)
               for r in gcs_env.emulator.media_downloads())

    dest = tmp_path / "artifact"
    gcs_env.emulator.clear_log()
    down = sw.run(sw.StageWeightsConfig(source=staged_uri, destination=str(dest), **SMALL))
    _check_manifest(down)
    assert down["manifest_sha256"] == up["manifest_sha256"]  # same bytes, same lineage hash
    assert down["source_kind"] == "gcs" and down["origin"]["source"] == str(src)
    assert _tree(dest) == _expected_tree()
    ranged = [r for r in gcs_env.emulator.media_downloads() if r.range]
    assert len(ranged) >= 10  # the 40 KiB shard came as 4 KiB ranged GETs

    gcs_env.emulator.clear_log()
    assert sw.run(sw.StageWeightsConfig(source=staged_uri, destination=str(dest), **SMALL)) == down
    weight_downloads = [r for r in gcs_env.emulator.media_downloads()
                        if not r.path.split("?")[0].endswith(WEIGHTS_MANIFEST)]
    assert weight_downloads == [] and gcs_env.emulator.uploads() == []


def test_interrupted_gcs_download_resumes_missing_chunks(gcs_env, tmp_path):
    src = _model_dir(tmp_path / "src")
    staged_uri = gcs_env.uri("models/gemma")
    sw.run(sw.StageWeightsConfig(source=str(src), destination=staged_uri, **SMALL))
    dest = tmp_path / "artifact"
    one_worker = {**SMALL, "max_workers": 1}  # deterministic: chunks 0, 1, 2 land, then the fault

    real = gcs._fetch_range
    calls = []

    def flaky(blob, start, end, sink):
        calls.append((blob.name, start))
        if len(calls) > 3:
            raise ConnectionResetError("injected: connection lost mid-copy")
        return real(blob, start, end, sink)

    with pytest.MonkeyPatch.context() as fault, pytest.raises(ConnectionResetError):
        fault.setattr(gcs, "_fetch_range", flaky)
        sw.run(sw.StageWeightsConfig(source=staged_uri, destination=str(dest), **one_worker))
    big = "model-00001-of-00002.safetensors"
    assert calls[:3] == [(f"models/gemma/{big}", i * 4 * KiB) for i in range(3)]
    assert not (dest / WEIGHTS_MANIFEST).exists() and not (dest / big).exists()

    gcs_env.emulator.clear_log()
    manifest = sw.run(sw.StageWeightsConfig(source=staged_uri, destination=str(dest), **SMALL))
    _check_manifest(manifest)
    big_gets = sorted(r.range for r in gcs_env.emulator.media_downloads() if big in r.path)
    assert len(big_gets) == 7  # chunks 3..9 only
    assert not any(r.startswith(f"bytes={i * 4 * KiB}-") for r in big_gets for i in range(3))
    assert _tree(dest) == _expected_tree()
    assert not list(dest.rglob("*.partial*"))


def test_interrupted_gcs_upload_resumes_missing_pieces(gcs_env, tmp_path):
    src = _model_dir(tmp_path / "src")
    uri = gcs_env.uri("w")
    real = gcs._upload_part
    calls = []

    def flaky(blob, data):
        calls.append(blob.name)
        if len(calls) > 4:
            raise ConnectionResetError("injected: connection lost mid-upload")
        return real(blob, data)

    one_worker = {**SMALL, "max_workers": 1}
    with pytest.MonkeyPatch.context() as fault, pytest.raises(ConnectionResetError):
        fault.setattr(gcs, "_upload_part", flaky)
        sw.run(sw.StageWeightsConfig(source=str(src), destination=uri, **one_worker))
    assert gcs.stat(gcs.join_uri(uri, WEIGHTS_MANIFEST)) is None

    gcs_env.emulator.clear_log()
    manifest = sw.run(sw.StageWeightsConfig(source=str(src), destination=uri, **SMALL))
    _check_manifest(manifest)
    # Upload requests on the wire: the 40 KiB shard's 10 pieces minus the 4 already there, the
    # 9 KiB + 7 shard's 3 pieces, the 5 small files (one request each) and the manifest.
    assert len(gcs_env.emulator.uploads()) == (10 - 4) + 3 + 5 + 1
    out = tmp_path / "back"
    gcs.download_dir(uri, out)
    assert _tree(out) == _expected_tree()


def test_checksum_mismatch_names_the_file_and_writes_no_manifest(gcs_env, tmp_path):
    src = _model_dir(tmp_path / "src")
    uri = gcs_env.uri("models/gemma")
    sw.run(sw.StageWeightsConfig(source=str(src), destination=uri, **SMALL))
    # Replace one staged object behind the manifest's back (same size, different bytes): GCS's
    # CRC32C agrees with the new bytes, only the manifest's SHA-256 can tell.
    shard = "model-00002-of-00002.safetensors"
    gcs.upload_bytes(_bytes(len(MODEL_FILES[shard]), 99), gcs.join_uri(uri, shard))
    dest = tmp_path / "artifact"
    with pytest.raises(sw.StageError, match=rf"{shard}: sha256 .* source states"):
        sw.run(sw.StageWeightsConfig(source=uri, destination=str(dest), **SMALL))
    assert not (dest / WEIGHTS_MANIFEST).exists()


def test_gcs_source_errors(gcs_env, tmp_path):
    with pytest.raises(sw.StageError, match=r"--source gs://.*/nothing.*no objects"):
        sw.run(sw.StageWeightsConfig(source=gcs_env.uri("nothing"), destination=str(tmp_path / "o")))
    gcs.upload_bytes(b"x", gcs_env.uri("noconf/model.safetensors"))
    with pytest.raises(sw.StageError, match=r"--source gs://.*/noconf.*no config\.json"):
        sw.run(sw.StageWeightsConfig(source=gcs_env.uri("noconf"), destination=str(tmp_path / "o")))


# --------------------------------------------------------------------- fake Hugging Face Hub


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class FakeHub:
    repo: str
    files: dict[str, bytes]
    sha: str = hashlib.sha1(b"fake commit").hexdigest()
    requests: list = dataclasses.field(default_factory=list)
    fail_once: set = dataclasses.field(default_factory=set)  # paths whose next GET gets a 500
    serve_instead: dict = dataclasses.field(default_factory=dict)  # path -> wrong bytes served

    def is_lfs(self, path: str) -> bool:
        return path.endswith((".safetensors", ".model", ".bin"))

    def tree(self) -> list[dict]:
        out = []
        for path, data in sorted(self.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            out.append(entry)
        return out

    def file_gets(self) -> list[str]:
        prefix = f"/{self.repo}/resolve/{self.sha}/"
        return [p[len(prefix):] for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)]


def _serve_hub(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(),
                       {"Content-Type": "application/json", **(headers or {})})

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("authorization")))
            api = f"/api/models/{hub.repo}"
            if path.startswith(f"{api}/revision/"):
                rev = path[len(f"{api}/revision/"):]
                if rev not in ("main", hub.sha):
                    return self._json({"error": "Invalid rev id"}, 404,
                                      {"X-Error-Code": "RevisionNotFound"})
                return self._json({"id": hub.repo, "sha": hub.sha,
                                   "siblings": [{"rfilename": p} for p in sorted(hub.files)]})
            if path.startswith(f"{api}/tree/{hub.sha}"):
                return self._json(hub.tree())
            resolve = f"/{hub.repo}/resolve/"
            if path.startswith(resolve):
                rev, _, name = path[len(resolve):].partition("/")
                if rev not in ("main", hub.sha) or name not in hub.files:
                    return self._json({"error": "Entry not found"}, 404,
                                      {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.sha})
                if not head and name in hub.fail_once:
                    hub.fail_once.discard(name)
                    return self._json({"error": "injected outage"}, 500)
                data = hub.files[name]
                headers = {"X-Repo-Commit": hub.sha, "ETag": f'"{_git_oid(data)}"',
                           "Content-Type": "application/octet-stream"}
                if hub.is_lfs(name):
                    headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                    "X-Linked-Size": str(len(data))})
                body = hub.serve_instead.get(name, data)
                return self._send(200, body, headers, head=head)
            return self._json({"error": "Repository not found"}, 404,
                              {"X-Error-Code": "RepoNotFound"})

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    hub = FakeHub(repo="google/gemma-test", files={**MODEL_FILES, **EXTRA_FILES})
    server, thread = _serve_hub(hub)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    # tests/conftest.py switches the Hub off for every other test; this one has its own Hub.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _assert_token_nowhere(root: Path, *texts: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert PLANTED_TOKEN.encode() not in path.read_bytes(), path
    for text in texts:
        assert PLANTED_TOKEN not in text


def test_hf_source_via_fake_hub_token_only_in_headers(fake_hub, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    dest = tmp_path / "artifact"
    manifest = sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(dest)))

    _check_manifest(manifest)
    assert manifest["source_kind"] == "hf" and manifest["revision"] == fake_hub.sha
    assert manifest["requested_revision"] == "main"
    assert _tree(dest) == _expected_tree()  # README, .bin, .gitattributes left on the Hub
    assert not (dest / ".cache").exists()  # huggingface_hub's bookkeeping removed after success
    assert sorted(fake_hub.file_gets()) == sorted(MODEL_FILES)
    # Every request carried the token as a bearer header.
    assert {auth for _, _, auth in fake_hub.requests} == {f"Bearer {PLANTED_TOKEN}"}
    out, err = capfd.readouterr()
    _assert_token_nowhere(tmp_path, caplog.text, out, err)

    fake_hub.requests.clear()
    assert sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(dest))) == manifest
    assert fake_hub.file_gets() == []  # only the revision + tree look-ups

    # Re-staging the staged folder keeps the Hub commit as its revision (lineage carries over).
    copy = sw.run(sw.StageWeightsConfig(source=str(dest), destination=str(tmp_path / "copy")))
    assert copy["revision"] == fake_hub.sha and copy["origin"]["source"] == fake_hub.repo
    assert copy["manifest_sha256"] == manifest["manifest_sha256"]


def test_hf_interrupted_download_refetches_only_missing_files(fake_hub, tmp_path):
    dest = tmp_path / "artifact"
    fake_hub.fail_once.add("model-00001-of-00002.safetensors")
    with pytest.raises(Exception, match="500"):
        sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(dest), max_workers=1))
    assert not (dest / WEIGHTS_MANIFEST).exists()
    fetched_first = set(fake_hub.file_gets())

    fake_hub.requests.clear()
    manifest = sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(dest)))
    _check_manifest(manifest)
    refetched = set(fake_hub.file_gets())
    assert "model-00001-of-00002.safetensors" in refetched
    # Files that completed in the first run are not fetched again.
    completed = fetched_first - {"model-00001-of-00002.safetensors"}
    assert completed and not (refetched & completed)


def test_hf_content_not_matching_the_hub_checksum_is_rejected(fake_hub, tmp_path):
    shard = "model-00002-of-00002.safetensors"
    fake_hub.serve_instead[shard] = _bytes(len(MODEL_FILES[shard]), 1234)
    dest = tmp_path / "artifact"
    with pytest.raises(sw.StageError, match=rf"{shard}: sha256 .* source states"):
        sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(dest)))
    assert not (dest / WEIGHTS_MANIFEST).exists()


def test_hf_to_gcs_through_staging_dir(fake_hub, gcs_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    uri = gcs_env.uri("from-hub")
    staging = tmp_path / "scratch"
    manifest = sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=uri,
                                            staging_dir=str(staging), **SMALL))
    _check_manifest(manifest)
    out = tmp_path / "back"
    gcs.download_dir(uri, out)
    assert _tree(out) == _expected_tree()
    _assert_token_nowhere(out, caplog.text)
    _assert_token_nowhere(staging)


def test_hf_errors_name_the_flag(fake_hub, tmp_path, monkeypatch):
    errors = []
    with pytest.raises(sw.StageError, match=r"--revision v9: not found") as err:
        sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(tmp_path / "o"),
                                     revision="v9"))
    errors.append(err.value)
    with pytest.raises(sw.StageError, match=r"--source google/other: no such local folder, and the Hugging Face Hub .*could not serve it: .*not found") as err:
        sw.run(sw.StageWeightsConfig(source="google/other", destination=str(tmp_path / "o")))
    errors.append(err.value)
    fake_hub.files = {"README.md": b"no weights here"}
    with pytest.raises(sw.StageError, match=r"--source google/gemma-test .*no files match"):
        sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(tmp_path / "o")))
    # A Hub that is not there (a port nothing listens on: bind, read the port, close).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(sw.StageError, match=r"--source google/gemma-test: no such local folder, .*cannot reach") as err:
        sw.run(sw.StageWeightsConfig(source=fake_hub.repo, destination=str(tmp_path / "o")))
    errors.append(err.value)
    _assert_token_nowhere(tmp_path, *(str(e) for e in errors))
