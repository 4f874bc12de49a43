"""components.gcs against a real GCS emulator (gcp-storage-emulator) on 127.0.0.1.

Sizes are KBs with chunk sizes of a few KB, so chunking, the compose tree (> 32 pieces) and
resume are really exercised while the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from components import gcs
from components.files import sha256_file
from tests.gcs_emulator import gcs_emulator_fixture

gcs_env = gcs_emulator_fixture("gcs_env")

KiB = 1024
# Chunked when >= 8 KiB and bigger than one 4 KiB chunk; 2 threads (the test machine has 2 cores).
SMALL_CHUNKS = gcs.TransferOptions(chunk_size=4 * KiB, parallel_threshold=8 * KiB, max_workers=2)


def _random_bytes(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- URIs


def test_uri_helpers():
    assert gcs.is_gcs("gs://b/x") and not gcs.is_gcs("/gcs/b/x") and not gcs.is_gcs(None)
    assert gcs.split_uri("gs://my-bucket/a/b.txt") == ("my-bucket", "a/b.txt")
    assert gcs.split_uri("gs://my-bucket") == ("my-bucket", "")
    assert gcs.split_uri("gs://my-bucket/") == ("my-bucket", "")
    assert gcs.fuse_path("gs://my-bucket/a/b") == "/gcs/my-bucket/a/b"
    assert gcs.fuse_path("gs://my-bucket") == "/gcs/my-bucket"
    assert gcs.gcs_uri_from_fuse("/gcs/my-bucket/a/b") == "gs://my-bucket/a/b"
    assert gcs.gcs_uri_from_fuse(gcs.fuse_path("gs://b-1/x/y.json")) == "gs://b-1/x/y.json"
    assert gcs.join_uri("gs://b/x/", "/y", "z") == "gs://b/x/y/z"
    for bad in ("s3://b/x", "gs://", "gs://UPPER/x", "gs://a/x", "gs://b//x", "/tmp/x"):
        with pytest.raises(ValueError, match="gs://|bucket|empty"):
            gcs.split_uri(bad)
    with pytest.raises(ValueError, match="FUSE"):
        gcs.gcs_uri_from_fuse("/tmp/b/x")


def test_client_uses_emulator_without_credentials(gcs_env, monkeypatch):
    # No ADC here: a client that tried to find credentials would raise DefaultCredentialsError.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/adc.json")
    client = gcs.make_client()
    assert client._connection.API_BASE_URL == gcs_env.emulator.host
    assert gcs.list_objects(gcs_env.uri(), client) == []


# ---------------------------------------------------------------------------- round trip


def test_round_trip_upload_list_download(gcs_env, tmp_path):
    src = tmp_path / "src"
    files = {
        "config.json": b'{"a": 1}',
        "empty.txt": b"",
        "sub/dir/tokenizer.model": _random_bytes(3 * KiB, 1),
        "model.safetensors": _random_bytes(37 * KiB + 5, 2),  # 10 pieces, last one short
    }
    for rel, data in files.items():
        _write(src / rel, data)
    dest = gcs_env.uri("models/m1")

    up = gcs.upload_dir(src, dest, options=SMALL_CHUNKS)
    assert set(up) == set(files)
    assert all(up[rel].sha256 == hashlib.sha256(data).hexdigest() for rel, data in files.items())

    listed = gcs.list_objects(dest)
    assert [gcs.relative_name(o, dest) for o in listed] == sorted(files)
    for obj in listed:
        data = files[gcs.relative_name(obj, dest)]
        assert obj.size == len(data) and obj.crc32c == gcs.crc32c_b64(data)
    # The large file went as pieces + compose, and no piece is left behind.
    assert any(r.is_compose for r in gcs_env.emulator.snapshot())
    assert gcs.list_objects(gcs_env.uri(SMALL_CHUNKS.parts_prefix)) == []
    # A sibling folder sharing the prefix string is not part of the folder.
    gcs.upload_bytes(b"x", gcs_env.uri("models/m10/other.json"))
    assert len(gcs.list_objects(dest)) == len(files)

    gcs_env.emulator.clear_log()
    out = tmp_path / "out"
    down = gcs.download_dir(dest, out, options=SMALL_CHUNKS)
    assert _tree(out) == _tree(src)
    assert {rel: d.sha256 for rel, d in down.items()} == _tree(src)
    ranges = [r.range for r in gcs_env.emulator.media_downloads()]
    assert sum(1 for r in ranges if r and r.startswith("bytes=")) >= 10  # chunked ranged GETs
    assert not list(out.rglob("*.partial*"))


def test_compose_tree_beyond_32_pieces(gcs_env, tmp_path):
    data = _random_bytes(40 * 2 * KiB + 3, 3)  # 41 pieces of 2 KiB: two compose levels
    src = _write(tmp_path / "big.bin", data)
    options = gcs.TransferOptions(chunk_size=2 * KiB, parallel_threshold=4 * KiB, max_workers=2)
    stats = gcs.TransferStats()
    gcs.upload_file(src, gcs_env.uri("big.bin"), options=options, stats=stats)
    assert stats.chunks_transferred == 41
    composes = [r for r in gcs_env.emulator.snapshot() if r.is_compose]
    assert len(composes) == 2 + 1  # ceil(41/32) groups, then the final join
    obj = gcs.stat(gcs_env.uri("big.bin"))
    assert obj.size == len(data) and obj.crc32c == gcs.crc32c_b64(data)
    assert gcs.list_objects(gcs_env.uri(options.parts_prefix)) == []
    got = gcs.download_file(gcs_env.uri("big.bin"), tmp_path / "back.bin", options=options)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------- rerun moves nothing


def test_rerun_transfers_nothing_and_changed_file_is_recopied(gcs_env, tmp_path):
    src = tmp_path / "src"
    _write(src / "a.json", b'{"x": 1}')
    _write(src / "w.safetensors", _random_bytes(20 * KiB, 4))
    dest = gcs_env.uri("w")
    gcs.upload_dir(src, dest, options=SMALL_CHUNKS)
    out = tmp_path / "out"
    gcs.download_dir(dest, out, options=SMALL_CHUNKS)

    gcs_env.emulator.clear_log()
    stats = gcs.TransferStats()
    gcs.upload_dir(src, dest, options=SMALL_CHUNKS, stats=stats)
    gcs.download_dir(dest, out, options=SMALL_CHUNKS, stats=stats)
    assert gcs_env.emulator.uploads() == [] and gcs_env.emulator.media_downloads() == []
    assert stats.bytes_transferred == 0 and stats.files_skipped == 4

    # Same size, one byte different: size alone would miss it, crc32c does not.
    changed = bytearray((src / "a.json").read_bytes())
    changed[-2] = ord("2")
    (src / "a.json").write_bytes(bytes(changed))
    gcs_env.emulator.clear_log()
    stats = gcs.TransferStats()
    gcs.upload_dir(src, dest, options=SMALL_CHUNKS, stats=stats)
    assert stats.files_copied == 1 and stats.files_skipped == 1
    assert len(gcs_env.emulator.uploads()) == 1
    gcs.download_dir(dest, out, options=SMALL_CHUNKS)
    assert (out / "a.json").read_bytes() == bytes(changed)


# ------------------------------------------------------------------------------ resume


class _Fault(RuntimeError):
    pass


def _fail_after(mp: pytest.MonkeyPatch, name: str, calls_allowed: int) -> list[int]:
    """Make gcs.<name> raise after ``calls_allowed`` successful calls (an interrupted copy).

    Use a separate ``MonkeyPatch.context()``: undoing the test's own ``monkeypatch`` would also
    undo the fixture's STORAGE_EMULATOR_HOST."""
    real = getattr(gcs, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_allowed:
            raise _Fault(f"injected fault in {name} after {calls_allowed} calls")
        return real(*args, **kwargs)

    mp.setattr(gcs, name, flaky)
    return calls


def test_interrupted_download_resumes_missing_chunks_only(gcs_env, tmp_path):
    data = _random_bytes(40 * KiB, 5)  # 10 chunks of 4 KiB
    uri = gcs_env.uri("w.bin")
    gcs.upload_bytes(data, uri)
    target = tmp_path / "w.bin"
    one_worker = gcs.TransferOptions(chunk_size=4 * KiB, parallel_threshold=8 * KiB, max_workers=1)

    with pytest.MonkeyPatch.context() as fault, pytest.raises(_Fault):
        _fail_after(fault, "_fetch_range", 3)
        gcs.download_file(uri, target, options=one_worker)
    assert not target.exists()
    state = json.loads((tmp_path / "w.bin.partial.chunks").read_text())
    assert state["done"] == [0, 1, 2]

    gcs_env.emulator.clear_log()
    stats = gcs.TransferStats()
    digest = gcs.download_file(uri, target, options=SMALL_CHUNKS, stats=stats)
    fetched = sorted(r.range for r in gcs_env.emulator.media_downloads())
    assert len(fetched) == 7 and "bytes=0-4095" not in fetched and "bytes=12288-16383" in fetched
    assert stats.chunks_skipped == 3 and stats.bytes_transferred == 28 * KiB
    assert target.read_bytes() == data and digest.sha256 == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "w.bin.partial").exists()
    assert not (tmp_path / "w.bin.partial.chunks").exists()


def test_resume_starts_over_when_object_changed(gcs_env, tmp_path):
    uri = gcs_env.uri("w.bin")
    gcs.upload_bytes(_random_bytes(40 * KiB, 6), uri)
    target = tmp_path / "w.bin"
    with pytest.MonkeyPatch.context() as fault, pytest.raises(_Fault):
        _fail_after(fault, "_fetch_range", 2)
        gcs.download_file(uri, target, options=SMALL_CHUNKS)
    new = _random_bytes(40 * KiB, 7)  # same size, new generation: old chunks are worthless
    gcs.upload_bytes(new, uri)
    stats = gcs.TransferStats()
    gcs.download_file(uri, target, options=SMALL_CHUNKS, stats=stats)
    assert stats.chunks_skipped == 0 and stats.chunks_transferred == 10
    assert target.read_bytes() == new


def test_interrupted_upload_resumes_missing_pieces_only(gcs_env, tmp_path):
    data = _random_bytes(40 * KiB + 1, 8)  # 11 pieces
    src = _write(tmp_path / "w.bin", data)
    uri = gcs_env.uri("dest/w.bin")
    one_worker = gcs.TransferOptions(chunk_size=4 * KiB, parallel_threshold=8 * KiB, max_workers=1)

    with pytest.MonkeyPatch.context() as fault, pytest.raises(_Fault):
        _fail_after(fault, "_upload_part", 4)
        gcs.upload_file(src, uri, options=one_worker)
    assert gcs.stat(uri) is None  # nothing under the final name before compose
    assert len(gcs.list_objects(gcs_env.uri(one_worker.parts_prefix))) == 4

    gcs_env.emulator.clear_log()
    stats = gcs.TransferStats()
    gcs.upload_file(src, uri, options=SMALL_CHUNKS, stats=stats)
    assert stats.chunks_skipped == 4 and stats.chunks_transferred == 7
    assert len(gcs_env.emulator.uploads()) == 7
    assert gcs.download_bytes(uri) == data
    assert gcs.list_objects(gcs_env.uri(one_worker.parts_prefix)) == []


# ---------------------------------------------------------------------------- checksums


def test_corrupted_download_is_caught_and_not_kept(gcs_env, tmp_path, monkeypatch):
    data = _random_bytes(40 * KiB, 9)
    uri = gcs_env.uri("w.bin")
    gcs.upload_bytes(data, uri)
    real = gcs._fetch_range

    def corrupting(blob, start, end, sink):
        class Flip:
            def write(self, chunk):
                chunk = bytearray(chunk)
                if start == 8 * KiB:
                    chunk[0] ^= 0xFF  # one bit-flipped byte in chunk 2
                return sink.write(bytes(chunk))

            def flush(self):
                pass

        real(blob, start, end, Flip())

    monkeypatch.setattr(gcs, "_fetch_range", corrupting)
    with pytest.raises(gcs.ChecksumMismatch, match=r"gs://.*/w\.bin.*crc32c"):
        gcs.download_file(uri, tmp_path / "w.bin", options=SMALL_CHUNKS)
    assert list(tmp_path.iterdir()) == []  # no final file, no partial, no sidecar


def test_download_missing_object_names_it(gcs_env, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gs://.*/nope\.bin"):
        gcs.download_file(gcs_env.uri("nope.bin"), tmp_path / "x")
