"""All Cloud Storage access of the project: URIs, a client, listing, resumable parallel copies.

Every copy compares size and CRC32C before it moves bytes; large files go in chunks that resume
after an interruption (ranged GETs into ``.partial`` with a ``.partial.chunks`` record; composite
uploads from content-named pieces). Design, emulator coverage and cost notes: docs/steps.md;
why not ``transfer_manager``: docs/design.md.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import google_crc32c

from components.files import CHUNK, write_json_atomic

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
FUSE_ROOT = "/gcs"
MiB = 1024 * 1024
COMPOSE_LIMIT = 32  # GCS accepts at most 32 source objects per compose request
PARTIAL_SUFFIX = ".partial"
CHUNKS_SUFFIX = ".partial.chunks"  # sidecar of a chunked download: which chunks are on disk

# Bucket names: 3-63 chars of lowercase letters, digits, - _ . (dotted names up to 222).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


# --------------------------------------------------------------------------------------------
# Paths and URIs
# --------------------------------------------------------------------------------------------


def is_gcs(path: str | os.PathLike | None) -> bool:
    return isinstance(path, str) and path.startswith("gs://")


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``; ``gs://bucket`` -> ``("bucket", "")``."""
    if not is_gcs(uri):
        raise ValueError(f"{uri!r} is not a gs:// URI (expected gs://BUCKET/PATH)")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(
            f"{uri!r}: bucket name {bucket!r} is not valid (3-63 lowercase letters, digits, '-', "
            "'_' or '.', starting and ending with a letter or digit)"
        )
    if "//" in name or name.startswith("/"):
        raise ValueError(f"{uri!r}: object path has an empty component ('//')")
    return bucket, name


def join_uri(uri: str, *parts: str) -> str:
    """``join_uri("gs://b/x/", "y", "z")`` -> ``gs://b/x/y/z`` (no doubled slashes)."""
    out = uri.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def fuse_path(uri: str) -> str:
    """``gs://bucket/x`` -> ``/gcs/bucket/x``, where Vertex AI mounts the bucket."""
    bucket, name = split_uri(uri)
    return f"{FUSE_ROOT}/{bucket}/{name}" if name else f"{FUSE_ROOT}/{bucket}"


def is_fuse_path(path: str | os.PathLike) -> bool:
    return str(path).startswith(FUSE_ROOT + "/") and len(str(path)) > len(FUSE_ROOT) + 1


def gcs_uri_from_fuse(path: str | os.PathLike) -> str:
    """``/gcs/bucket/x`` -> ``gs://bucket/x`` (inverse of :func:`fuse_path`)."""
    path = str(path)
    if not is_fuse_path(path):
        raise ValueError(f"{path!r} is not under the Cloud Storage FUSE root {FUSE_ROOT}/")
    uri = "gs://" + path[len(FUSE_ROOT) + 1:]
    split_uri(uri)  # validates the bucket name
    return uri


def _dir_prefix(name: str) -> str:
    """Object-name prefix of a "folder": ``a/b`` -> ``a/b/`` so ``a/bc`` is not listed."""
    return name if not name or name.endswith("/") else name + "/"


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def make_client(project: str | None = None, pool_size: int = 32):
    """A storage client; against ``STORAGE_EMULATOR_HOST`` when that is set.

    ``pool_size`` is the number of HTTP connections kept per host: one per transfer thread
    (requests' default of 10 would make more than 10 workers wait for a free connection).
    """
    from google.cloud import storage  # imported here: listing URIs needs no client library

    if os.environ.get(EMULATOR_ENV):
        from google.auth.credentials import AnonymousCredentials

        project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or "emulator-project"
        client = storage.Client(project=project, credentials=AnonymousCredentials())
    else:
        client = storage.Client(project=project)
    import requests.adapters

    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    client._http.mount("https://", adapter)  # the session behind every JSON/media request
    client._http.mount("http://", adapter)
    return client


# --------------------------------------------------------------------------------------------
# Checksums and bookkeeping
# --------------------------------------------------------------------------------------------


def crc32c_b64(data: bytes) -> str:
    """CRC32C in GCS's format: base64 of the big-endian 4-byte value."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


@dataclasses.dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    crc32c: str  # base64, as GCS reports it


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Size, SHA-256 and CRC32C of a local file in one read."""
    sha = hashlib.sha256()
    crc = google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            sha.update(block)
            crc.update(block)
            size += len(block)
    return FileDigest(size=size, sha256=sha.hexdigest(),
                      crc32c=base64.b64encode(crc.digest()).decode("ascii"))


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    name: str
    size: int
    crc32c: str | None
    md5: str | None
    generation: int | None

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @classmethod
    def from_blob(cls, blob) -> "ObjectInfo":
        return cls(bucket=blob.bucket.name, name=blob.name, size=int(blob.size or 0),
                   crc32c=blob.crc32c, md5=blob.md5_hash,
                   generation=int(blob.generation) if blob.generation else None)


class ChecksumMismatch(RuntimeError):
    """Bytes that arrived differ from what the other side says they are."""


@dataclasses.dataclass
class TransferStats:
    """What a copy actually moved; thread-safe counters, logged and used by the tests."""

    files_copied: int = 0
    files_skipped: int = 0
    bytes_transferred: int = 0
    chunks_transferred: int = 0
    chunks_skipped: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                              compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.startswith("_")}


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    chunk_size: int = 64 * MiB  # bytes per ranged GET / composite piece
    # Files at least this big go in parallel chunks; smaller ones in one request each
    # (one request per file is cheaper than chunking below a few chunk sizes).
    parallel_threshold: int = 256 * MiB
    max_workers: int = 8  # threads: per large file (chunks) or per batch of small files
    parts_prefix: str = ".gemma-pets-upload-parts"  # where composite-upload pieces live

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 byte, got {self.chunk_size}")
        if self.parallel_threshold < 0:
            raise ValueError(f"parallel_threshold must be >= 0, got {self.parallel_threshold}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if not self.parts_prefix.strip("/"):
            raise ValueError("parts_prefix must name a folder, e.g. '.gemma-pets-upload-parts'")


def _is_large(size: int, options: TransferOptions) -> bool:
    """Goes in parallel chunks: at least the threshold and more than one chunk."""
    return size >= max(options.parallel_threshold, 1) and size > options.chunk_size


def _run_parallel(fn: Callable, items: Sequence, max_workers: int) -> list:
    """``[fn(x) for x in items]`` over threads; on the first error, cancel what has not started,
    let running calls finish (so their chunks are recorded for a resume), then raise it."""
    if not items:
        return []
    if max_workers == 1 or len(items) == 1:
        return [fn(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, pending = concurrent.futures.wait(
            futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()
    return [future.result() for future in futures]


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def stat(uri: str, client=None) -> ObjectInfo | None:
    """The object at ``uri``, or None when there is none."""
    bucket_name, name = split_uri(uri)
    if not name:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    client = client or make_client()
    blob = client.bucket(bucket_name).get_blob(name)
    return ObjectInfo.from_blob(blob) if blob is not None else None


def list_objects(uri: str, client=None, *, recursive: bool = True) -> list[ObjectInfo]:
    """Objects under the folder ``uri`` (``gs://b/x`` lists ``x/...``), sorted by name.

    Folder placeholders (names ending in "/", made by the console) are left out.
    """
    bucket_name, name = split_uri(uri)
    client = client or make_client()
    blobs = client.list_blobs(bucket_name, prefix=_dir_prefix(name) or None,
                              delimiter=None if recursive else "/")
    out = [ObjectInfo.from_blob(b) for b in blobs if not b.name.endswith("/")]
    return sorted(out, key=lambda o: o.name)


def relative_name(obj: ObjectInfo, folder_uri: str) -> str:
    _, name = split_uri(folder_uri)
    prefix = _dir_prefix(name)
    if not obj.name.startswith(prefix):
        raise ValueError(f"{obj.uri} is not under {folder_uri}")
    return obj.name[len(prefix):]


def _same_content(digest: FileDigest, obj: ObjectInfo) -> bool:
    return digest.size == obj.size and obj.crc32c is not None and digest.crc32c == obj.crc32c


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


class _OffsetWriter:
    """File-like sink that writes at a fixed offset of an open fd (threads share the fd)."""

    def __init__(self, fd: int, offset: int):
        self.fd, self.offset, self.written = fd, offset, 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset + self.written)
            self.written += n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass


def _fetch_range(blob, start: int, end: int, sink) -> None:
    """Bytes ``start..end`` (inclusive) of ``blob`` into ``sink`` (one ranged GET)."""
    blob.download_to_file(sink, start=start, end=end, raw_download=True, checksum=None)


def _blob_at_generation(client, obj: ObjectInfo):
    # Pinning the generation makes every request fail (404) if the object is replaced mid-copy,
    # instead of stitching chunks of two different versions together.
    return client.bucket(obj.bucket).blob(obj.name, generation=obj.generation)


def download_file(uri: str, local_path: str | os.PathLike, *, client=None,
                  options: TransferOptions = TransferOptions(), obj: ObjectInfo | None = None,
                  stats: TransferStats | None = None) -> FileDigest:
    """Copy one object to ``local_path``; returns the local file's digest.

    Skips the transfer when the local file already has the object's size and CRC32C. Large
    objects go in parallel ranged chunks and resume from ``<path>.partial`` after an
    interruption. The file only gets its final name after its CRC32C matched the object's.
    """
    client = client or make_client()
    stats = stats if stats is not None else TransferStats()
    obj = obj or stat(uri, client)
    if obj is None:
        raise FileNotFoundError(f"{uri}: no such object")
    local_path = Path(local_path)
    if local_path.is_file() and local_path.stat().st_size == obj.size:
        digest = file_digest(local_path)
        if _same_content(digest, obj):
            stats.add(files_skipped=1)
            log.debug("skip %s: %s already has its size and crc32c", uri, local_path)
            return digest
    local_path.parent.mkdir(parents=True, exist_ok=True)
    partial = local_path.with_name(local_path.name + PARTIAL_SUFFIX)
    sidecar = local_path.with_name(local_path.name + CHUNKS_SUFFIX)
    if _is_large(obj.size, options):
        _download_chunked(client, obj, partial, sidecar, options, stats)
    else:
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
        with open(partial, "wb") as fh:
            if obj.size:  # a Range of an empty object is unsatisfiable (416)
                _fetch_range(_blob_at_generation(client, obj), 0, obj.size - 1, fh)
            fh.flush()
            os.fsync(fh.fileno())
        stats.add(bytes_transferred=obj.size, chunks_transferred=1)
    digest = file_digest(partial)
    if not _same_content(digest, obj):
        partial.unlink()
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
        raise ChecksumMismatch(
            f"{uri}: downloaded {digest.size} bytes with crc32c {digest.crc32c}, but the object "
            f"has {obj.size} bytes with crc32c {obj.crc32c}; the partial file was removed, "
            "rerun to fetch it again"
        )
    os.replace(partial, local_path)
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()
    stats.add(files_copied=1)
    return digest


def _download_chunked(client, obj: ObjectInfo, partial: Path, sidecar: Path,
                      options: TransferOptions, stats: TransferStats) -> None:
    chunk = options.chunk_size
    n_chunks = -(-obj.size // chunk)
    identity = {"uri": obj.uri, "generation": obj.generation, "size": obj.size,
                "crc32c": obj.crc32c, "chunk_size": chunk}
    done: set[int] = set()
    if partial.is_file() and partial.stat().st_size == obj.size and sidecar.is_file():
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(sidecar.read_text())
            if {k: state.get(k) for k in identity} == identity:
                done = {int(i) for i in state.get("done", []) if 0 <= int(i) < n_chunks}
    if not done:
        # Fresh start (or the object / chunk size changed): a sparse file of the final size.
        with open(partial, "wb") as fh:
            fh.truncate(obj.size)
        write_json_atomic(sidecar, {**identity, "done": []})
    todo = [i for i in range(n_chunks) if i not in done]
    stats.add(chunks_skipped=n_chunks - len(todo))
    if done:
        log.info("resuming %s: %d of %d chunks already on disk", obj.uri, len(done), n_chunks)
    blob = _blob_at_generation(client, obj)
    lock = threading.Lock()
    fd = os.open(partial, os.O_WRONLY)
    try:
        def fetch(index: int) -> None:
            start = index * chunk
            end = min(obj.size, start + chunk) - 1
            sink = _OffsetWriter(fd, start)
            _fetch_range(blob, start, end, sink)
            if sink.written != end - start + 1:
                raise ChecksumMismatch(f"{obj.uri}: chunk {index} returned {sink.written} bytes, "
                                       f"expected {end - start + 1}")
            os.fdatasync(fd)  # on disk before the sidecar says so
            with lock:
                done.add(index)
                write_json_atomic(sidecar, {**identity, "done": sorted(done)})
            stats.add(bytes_transferred=sink.written, chunks_transferred=1)

        _run_parallel(fetch, todo, options.max_workers)
    finally:
        os.close(fd)


def download_dir(uri: str, local_dir: str | os.PathLike, *, client=None,
                 options: TransferOptions = TransferOptions(),
                 include: Callable[[str], bool] | None = None,
                 objects: Iterable[ObjectInfo] | None = None,
                 stats: TransferStats | None = None) -> dict[str, FileDigest]:
    """Copy every object under the folder ``uri`` (or ``objects``) into ``local_dir``.

    ``include(relative_path)`` filters. Returns ``{relative_path: digest}``.
    """
    client = client or make_client()
    stats = stats if stats is not None else TransferStats()
    objects = list(objects) if objects is not None else list_objects(uri, client)
    local_dir = Path(local_dir)
    chosen: list[tuple[str, ObjectInfo]] = []
    for obj in objects:
        rel = relative_name(obj, uri)
        if rel.split("/", 1)[0] == options.parts_prefix.strip("/"):
            continue  # pieces of an unfinished composite upload into this folder
        if include is None or include(rel):
            _check_relative(rel, uri)
            chosen.append((rel, obj))

    def one(item: tuple[str, ObjectInfo]) -> tuple[str, FileDigest]:
        rel, obj = item
        return rel, download_file(obj.uri, local_dir / rel, client=client, options=options,
                                  obj=obj, stats=stats)

    return dict(_transfer_many(one, chosen, [o.size for _, o in chosen], options))


def _check_relative(rel: str, where: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where}: refusing object path {rel!r} (empty, '.' or '..' component)")


def _transfer_many(fn: Callable, items: list, sizes: list[int], options: TransferOptions) -> list:
    """Large files one after another (each is parallel inside), small files in parallel."""
    big = [it for it, size in zip(items, sizes) if _is_large(size, options)]
    small = [it for it, size in zip(items, sizes) if not _is_large(size, options)]
    results = [fn(it) for it in big]
    results += _run_parallel(fn, small, options.max_workers)
    return results


# --------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------


def _upload_part(blob, data: bytes) -> None:
    """One piece of a composite upload (or a whole small file) in one request."""
    # Pieces are immutable and named by content, so retrying an upload is always safe.
    from google.cloud.storage.retry import DEFAULT_RETRY

    blob.upload_from_string(data, content_type="application/octet-stream", checksum="crc32c",
                            retry=DEFAULT_RETRY)


def _upload_whole(blob, local_path: Path) -> None:
    """A file below the parallel threshold in one upload (the library streams it: a multipart
    request up to 8 MiB, a resumable upload above)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    blob.upload_from_filename(str(local_path), content_type="application/octet-stream",
                              checksum="crc32c", retry=DEFAULT_RETRY)


def upload_file(local_path: str | os.PathLike, uri: str, *, client=None,
                options: TransferOptions = TransferOptions(),
                digest: FileDigest | None = None, existing: ObjectInfo | None | bool = False,
                stats: TransferStats | None = None) -> FileDigest:
    """Copy one local file to ``uri``; returns its digest.

    Skipped when the object already has the file's size and CRC32C (``existing``: the object
    if the caller listed it already, None if known absent; default: look it up). Large files
    go as a parallel composite upload that resumes after an interruption.
    """
    client = client or make_client()
    stats = stats if stats is not None else TransferStats()
    bucket_name, name = split_uri(uri)
    if not name or name.endswith("/"):
        raise ValueError(f"{uri!r}: destination must name an object, not a folder")
    local_path = Path(local_path)
    if not local_path.is_file():
        raise FileNotFoundError(f"{local_path}: no such file to upload to {uri}")
    digest = digest or file_digest(local_path)
    if existing is False:
        existing = stat(uri, client)
    if existing is not None and _same_content(digest, existing):
        stats.add(files_skipped=1)
        log.debug("skip %s: object already has the file's size and crc32c", uri)
        return digest
    bucket = client.bucket(bucket_name)
    if _is_large(digest.size, options):
        _composite_upload(client, bucket, name, local_path, digest, options, stats)
    else:
        blob = bucket.blob(name)
        _upload_whole(blob, local_path)
        stats.add(bytes_transferred=digest.size, chunks_transferred=1)
        # The server's CRC32C of what it stored vs. the digest taken before the upload: catches
        # corruption on the way and a file that changed while it was being read.
        if blob.crc32c != digest.crc32c or int(blob.size) != digest.size:
            raise ChecksumMismatch(f"{uri}: stored object has crc32c {blob.crc32c} and size "
                                   f"{blob.size}, the local file {local_path} has "
                                   f"{digest.crc32c} and {digest.size}")
    stats.add(files_copied=1)
    return digest


def _parts_folder(bucket_name: str, name: str, digest: FileDigest, options: TransferOptions) -> str:
    # Named by destination + content + chunk size: a rerun finds its own pieces, and a changed
    # file or chunk size never reuses stale ones.
    target = hashlib.sha256(f"{bucket_name}/{name}".encode()).hexdigest()[:16]
    return (f"{options.parts_prefix.strip('/')}/{target}/"
            f"{digest.sha256[:16]}-{digest.size}-{options.chunk_size}/")


def _composite_upload(client, bucket, name: str, local_path: Path, digest: FileDigest,
                      options: TransferOptions, stats: TransferStats) -> None:
    uri = f"gs://{bucket.name}/{name}"
    chunk = options.chunk_size
    n_parts = -(-digest.size // chunk)
    folder = _parts_folder(bucket.name, name, digest, options)
    existing = {o.name: o for o in list_objects(f"gs://{bucket.name}/{folder}", client)}
    part_names = [f"{folder}{i:06d}" for i in range(n_parts)]

    def put(index: int) -> None:
        with open(local_path, "rb") as fh:
            fh.seek(index * chunk)
            data = fh.read(chunk)
        crc = crc32c_b64(data)
        have = existing.get(part_names[index])
        if have is not None and have.size == len(data) and have.crc32c == crc:
            stats.add(chunks_skipped=1)
            return
        blob = bucket.blob(part_names[index])
        _upload_part(blob, data)
        if blob.crc32c != crc:
            raise ChecksumMismatch(f"{uri}: piece {index} stored with crc32c {blob.crc32c}, "
                                   f"sent {crc}")
        stats.add(bytes_transferred=len(data), chunks_transferred=1)

    if existing:
        log.info("resuming upload of %s: %d of %d pieces already uploaded", uri,
                 sum(1 for p in part_names if p in existing), n_parts)
    _run_parallel(put, list(range(n_parts)), options.max_workers)

    from google.cloud.storage.retry import DEFAULT_RETRY

    # Compose in a tree: each level joins groups of up to 32 objects, in order.
    level, sources, temporary = 0, [bucket.blob(p) for p in part_names], []
    while len(sources) > COMPOSE_LIMIT:
        joined = []
        for g, start in enumerate(range(0, len(sources), COMPOSE_LIMIT)):
            out = bucket.blob(f"{folder}compose-{level}-{g:06d}")
            out.content_type = "application/octet-stream"
            out.compose(sources[start:start + COMPOSE_LIMIT], retry=DEFAULT_RETRY)
            joined.append(out)
        temporary += joined
        sources, level = joined, level + 1
    final = bucket.blob(name)
    final.content_type = "application/octet-stream"
    final.compose(sources, retry=DEFAULT_RETRY)
    if final.crc32c != digest.crc32c or int(final.size) != digest.size:
        raise ChecksumMismatch(
            f"{uri}: composed object has crc32c {final.crc32c} and size {final.size}, the local "
            f"file {local_path} has {digest.crc32c} and {digest.size}; pieces under "
            f"gs://{bucket.name}/{folder} are kept for inspection")
    for blob in [bucket.blob(p) for p in part_names] + temporary:
        try:
            blob.delete()
        except Exception as err:  # a leftover piece costs storage, not correctness
            log.warning("could not delete upload piece gs://%s/%s: %s", bucket.name, blob.name, err)


def upload_dir(local_dir: str | os.PathLike, uri: str, *, client=None,
               options: TransferOptions = TransferOptions(), files: Iterable[str] | None = None,
               digests: dict[str, FileDigest] | None = None,
               stats: TransferStats | None = None) -> dict[str, FileDigest]:
    """Copy ``files`` (relative paths; default: every file under ``local_dir``, minus partial
    downloads) to the folder ``uri``. Returns ``{relative_path: digest}``."""
    client = client or make_client()
    stats = stats if stats is not None else TransferStats()
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir}: no such folder to upload to {uri}")
    if files is None:
        files = [p.relative_to(local_dir).as_posix() for p in sorted(local_dir.rglob("*"))
                 if p.is_file() and not p.name.endswith((PARTIAL_SUFFIX, CHUNKS_SUFFIX))]
    files = sorted(files)
    digests = digests or {}
    # One listing answers "is it there already?" for every file (instead of a GET per file).
    remote = {relative_name(o, uri): o for o in list_objects(uri, client)}

    def one(rel: str) -> tuple[str, FileDigest]:
        return rel, upload_file(local_dir / rel, join_uri(uri, rel), client=client,
                                options=options, digest=digests.get(rel),
                                existing=remote.get(rel), stats=stats)

    sizes = [(local_dir / rel).stat().st_size for rel in files]
    return dict(_transfer_many(one, files, sizes, options))


def upload_bytes(data: bytes, uri: str, *, client=None,
                 content_type: str = "application/octet-stream") -> None:
    """Write a small object (e.g. a manifest) in one request; GCS makes it visible whole."""
    client = client or make_client()
    bucket_name, name = split_uri(uri)
    blob = client.bucket(bucket_name).blob(name)
    blob.upload_from_string(data, content_type=content_type, checksum="crc32c")


def download_bytes(uri: str, *, client=None) -> bytes | None:
    """A small object's bytes, or None when there is no such object."""
    from google.api_core.exceptions import NotFound

    client = client or make_client()
    bucket_name, name = split_uri(uri)
    try:
        return client.bucket(bucket_name).blob(name).download_as_bytes()
    except NotFound:
        return None


def delete_objects(uris: Iterable[str], *, client=None) -> None:
    client = client or make_client()
    for uri in uris:
        bucket_name, name = split_uri(uri)
        client.bucket(bucket_name).blob(name).delete()
