"""Stage a model's weights into a folder (the KFP artifact) or a gs:// prefix, verified and resumable.

Sources: a Hugging Face repo id (at ``--revision``), a local folder, or a gs:// prefix (or its
/gcs/ FUSE path). Every file is checked against what the source states; ``weights_manifest.json``
(files, SHA-256s, the resolved revision, ``manifest_sha256``: the weights' lineage hash) is
written last; a rerun with the same source moves nothing. Guarantees in full: docs/steps.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import gcs
from components.artifacts import WEIGHTS_MANIFEST
from components.cli import entrypoint, hub_id, parse_config
from components.files import link_or_copy, read_json, write_json_atomic

log = logging.getLogger(__name__)

HF_TOKEN_ENV = "HF_TOKEN"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
HF_METADATA_DIR = ".cache"  # huggingface_hub's local_dir bookkeeping (.cache/huggingface/...)
DEFAULT_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken")
REQUIRED_FILE = "config.json"
HUB_TIMEOUT_S = 10  # seconds per Hub metadata request: an unreachable Hub fails fast


class StageError(RuntimeError):
    """Staging cannot proceed or produced a wrong result; the message names the flag or file."""


@dataclass
class StageWeightsConfig:
    """Stage model weights (Hugging Face repo, local folder or gs:// prefix) into a folder or
    gs:// prefix, verify every file's SHA-256 and write weights_manifest.json last."""

    source: str = field(metadata={
        "help": "Hugging Face repo id (e.g. google/gemma-4-e2b-it), a local folder, or gs://BUCKET/PREFIX"})
    destination: str = field(metadata={
        "help": "folder (e.g. the KFP artifact's path) or gs://BUCKET/PREFIX to stage into"})
    revision: str = field(default="main", metadata={
        "help": "Hugging Face revision (branch, tag or commit sha); the manifest records the commit sha"})
    allow_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOW_PATTERNS),
                                      metadata={"help": "glob patterns of the files to stage"})
    chunk_size_mib: float = field(default=64.0, metadata={
        "help": "MiB per parallel chunk of a large gs:// transfer (ranged GET / composite piece)"})
    parallel_threshold_mib: float = field(default=256.0, metadata={
        "help": "gs:// files at least this many MiB go in parallel chunks; smaller ones whole"})
    max_workers: int = field(default=8, metadata={
        "help": "parallel transfer threads (chunks of one large file, or small files)"})
    staging_dir: str = field(default="", metadata={
        "help": "scratch folder for a non-local --source staged to gs:// (default: one under the temp "
                "dir named after source and destination, so a rerun resumes; removed after success)"})
    hardlink: bool = field(default=True, metadata={
        "help": "hard-link a local --source into a local --destination when on one filesystem"})
    fuse_via_api: bool = field(default=True, metadata={
        "help": "treat /gcs/BUCKET/... paths (Vertex's Cloud Storage FUSE mount) as gs://BUCKET/... "
                "and move bytes through the GCS API (parallel, resumable) instead of FUSE"})

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def source_kind(self) -> str:
        return _classify_source(self)[0]

    @property
    def source_location(self) -> str:
        return _classify_source(self)[1]

    @property
    def destination_kind(self) -> str:
        return _classify_destination(self)[0]

    @property
    def destination_location(self) -> str:
        return _classify_destination(self)[1]

    def transfer_options(self) -> gcs.TransferOptions:
        return gcs.TransferOptions(chunk_size=max(1, int(self.chunk_size_mib * gcs.MiB)),
                                   parallel_threshold=int(self.parallel_threshold_mib * gcs.MiB),
                                   max_workers=self.max_workers)


def _check_config(config: StageWeightsConfig) -> None:
    if not config.source or not config.source.strip():
        raise ValueError("--source must not be empty")
    if not config.destination or not config.destination.strip():
        raise ValueError("--destination must not be empty")
    if not config.revision:
        raise ValueError("--revision must not be empty (use 'main' for the default branch)")
    if isinstance(config.allow_patterns, str):  # KFP / callers may pass "a,b" as one string
        config.allow_patterns = [config.allow_patterns]
    config.allow_patterns = [p.strip() for item in config.allow_patterns
                             for p in item.split(",") if p.strip()]
    if not config.allow_patterns:
        raise ValueError("--allow-patterns must list at least one glob pattern")
    if not any(fnmatch.fnmatch(REQUIRED_FILE, p) for p in config.allow_patterns):
        raise ValueError(f"--allow-patterns {config.allow_patterns} must match {REQUIRED_FILE}")
    if not config.chunk_size_mib > 0:
        raise ValueError(f"--chunk-size-mib must be > 0, got {config.chunk_size_mib}")
    if config.parallel_threshold_mib < 0:
        raise ValueError(f"--parallel-threshold-mib must be >= 0, got {config.parallel_threshold_mib}")
    if config.max_workers < 1:
        raise ValueError(f"--max-workers must be >= 1, got {config.max_workers}")
    kind, location = config.source_kind, config.source_location  # validates --source
    dest_kind, dest = config.destination_kind, config.destination_location
    if kind == "local":
        src_path = Path(location)
        if not src_path.exists():
            raise ValueError(f"--source {config.source}: folder does not exist")
        if not src_path.is_dir():
            raise ValueError(f"--source {config.source}: not a folder")
        if not (src_path / REQUIRED_FILE).is_file():
            what = "is empty" if not any(src_path.iterdir()) else f"has no {REQUIRED_FILE}"
            raise ValueError(f"--source {config.source}: folder {what}; expected a model "
                             f"folder with {REQUIRED_FILE} and weights")
        if dest_kind == "local":
            a, b = src_path.resolve(), Path(dest).resolve()
            if a == b or a in b.parents or b in a.parents:
                raise ValueError(f"--destination {config.destination} and --source "
                                 f"{config.source} must not contain one another")
    if kind == "gcs" and dest_kind == "gcs":
        if location.rstrip("/") == dest.rstrip("/"):
            raise ValueError("--destination must differ from --source")
    if dest_kind == "local" and Path(dest).exists() and not Path(dest).is_dir():
        raise ValueError(f"--destination {config.destination}: exists and is not a folder")


def _gcs_uri(path: str, flag: str, fuse_via_api: bool) -> str | None:
    """The gs:// URI ``path`` names (itself, or a /gcs/ FUSE path moved through the API)."""
    if gcs.is_gcs(path):
        _check_uri(path, flag)
        return path
    if fuse_via_api and gcs.is_fuse_path(path):
        return _fuse_to_uri(path, flag)
    return None


def _classify_source(config: StageWeightsConfig) -> tuple[str, str]:
    source = config.source.strip()
    if uri := _gcs_uri(source, "--source", config.fuse_via_api):
        return "gcs", uri
    if hub_id(source):  # owner/name and no such local path: the one shape sent to the Hub
        return "hf", source
    if source.startswith(("/", ".", "~")) or "/" in source or os.path.isdir(source):
        return "local", str(Path(source).expanduser())
    raise ValueError(f"--source {source!r} is neither a gs:// URI, an existing folder, nor a "
                     "Hugging Face repo id (owner/name)")


def _classify_destination(config: StageWeightsConfig) -> tuple[str, str]:
    dest = config.destination.strip()
    if uri := _gcs_uri(dest, "--destination", config.fuse_via_api):
        return "gcs", uri
    return "local", str(Path(dest).expanduser())


def _check_uri(uri: str, flag: str) -> None:
    try:
        gcs.split_uri(uri)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _fuse_to_uri(path: str, flag: str) -> str:
    try:
        return gcs.gcs_uri_from_fuse(path)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


# ------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def files_sha256(files: list[dict[str, Any]]) -> str:
    """The weights' lineage hash: SHA-256 of the canonical JSON of the files list (each entry
    exactly {path, size, sha256}, sorted by path). Later steps recompute it to check a manifest."""
    entries = sorted(({"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"]}
                      for f in files), key=lambda f: f["path"])
    return hashlib.sha256(canonical_json(entries)).hexdigest()


def verify_manifest(manifest: dict[str, Any]) -> None:
    """Raise if ``manifest_sha256`` or ``total_bytes`` disagree with the files list."""
    if manifest.get("manifest_sha256") != files_sha256(manifest["files"]):
        raise StageError("weights manifest: manifest_sha256 does not match its files list")
    if manifest.get("total_bytes") != sum(int(f["size"]) for f in manifest["files"]):
        raise StageError("weights manifest: total_bytes does not match its files list")


# ------------------------------------------------------------------------------------------
# Source description (metadata only, before any bytes move)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceFile:
    path: str  # relative, "/"-separated
    size: int
    sha256: str | None = None  # expected SHA-256 when the source states one
    git_oid: str | None = None  # Hub: git blob id of a non-LFS file
    crc32c: str | None = None  # GCS: the object's CRC32C
    obj: gcs.ObjectInfo | None = None


@dataclasses.dataclass
class SourcePlan:
    kind: str
    files: list[SourceFile]
    revision: str  # HF commit sha; for other sources the revision their own manifest recorded
    fingerprint: str  # changes iff the set of files or their stated content changes
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _matches(path: str, patterns: list[str]) -> bool:
    # fnmatch on the whole relative path, like huggingface_hub's filter ('*' also matches '/').
    name = path.rsplit("/", 1)[-1]
    if path == WEIGHTS_MANIFEST or name.endswith((gcs.PARTIAL_SUFFIX, gcs.CHUNKS_SUFFIX)):
        return False
    if path.split("/", 1)[0] == HF_METADATA_DIR:
        return False
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _fingerprint(kind: str, files: list[SourceFile], revision: str) -> str:
    stated = [{"path": f.path, "size": f.size,
               "id": f.sha256 or f.git_oid or f.crc32c or ""} for f in files]
    return hashlib.sha256(canonical_json({"kind": kind, "revision": revision,
                                          "files": stated})).hexdigest()


def _require_config(files: list[SourceFile], where: str) -> None:
    if not files:
        raise StageError(f"{where}: no files match --allow-patterns")
    if not any(f.path == REQUIRED_FILE for f in files):
        raise StageError(f"{where}: has no {REQUIRED_FILE} among the files matching "
                         "--allow-patterns; expected a model folder")


def _stated_sha256(manifest: dict[str, Any] | None, where: str) -> dict[str, dict[str, Any]]:
    if manifest is None:
        return {}
    try:
        verify_manifest(manifest)
    except (StageError, KeyError, TypeError, ValueError) as err:
        raise StageError(f"{where}/{WEIGHTS_MANIFEST}: not a valid weights manifest ({err})") from None
    return {f["path"]: f for f in manifest["files"]}


def _describe_local(config: StageWeightsConfig) -> SourcePlan:
    root = Path(config.source_location)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    chosen = [p for p in paths if _matches(p, config.allow_patterns)]
    own_path = root / WEIGHTS_MANIFEST  # a folder staged earlier by this step states its hashes
    own = read_json(own_path) if own_path.is_file() else None
    stated = _stated_sha256(own, str(root))
    files, digests = [], {}
    for rel in chosen:
        digest = gcs.file_digest(root / rel)  # SHA-256 of the source: what the copy must equal
        digests[rel] = digest
        if rel in stated and (stated[rel]["sha256"] != digest.sha256
                              or int(stated[rel]["size"]) != digest.size):
            raise StageError(f"--source {config.source}: {rel} does not match the folder's own "
                             f"{WEIGHTS_MANIFEST} (sha256 {digest.sha256}, manifest says "
                             f"{stated[rel]['sha256']})")
        files.append(SourceFile(path=rel, size=digest.size, sha256=digest.sha256))
    _require_config(files, f"--source {config.source}")
    revision = str(own.get("revision") or "") if own else ""
    plan = SourcePlan("local", files, revision, _fingerprint("local", files, revision))
    plan.extra["digests"] = digests
    if own:
        plan.extra["origin"] = {"source": own.get("source"), "source_kind": own.get("source_kind")}
    return plan


def _describe_gcs(config: StageWeightsConfig, client) -> SourcePlan:
    uri = config.source_location
    objects = gcs.list_objects(uri, client)
    if not objects:
        raise StageError(f"--source {config.source}: no objects under this prefix")
    raw = gcs.download_bytes(gcs.join_uri(uri, WEIGHTS_MANIFEST), client=client)
    own = json.loads(raw) if raw is not None else None
    stated = _stated_sha256(own, uri)
    files = []
    for obj in objects:
        rel = gcs.relative_name(obj, uri)
        if not _matches(rel, config.allow_patterns):
            continue
        if rel.split("/", 1)[0] == gcs.TransferOptions().parts_prefix:
            continue
        expected = stated.get(rel)
        if expected is not None and int(expected["size"]) != obj.size:
            raise StageError(f"--source {config.source}: {rel} has {obj.size} bytes but the "
                             f"source's {WEIGHTS_MANIFEST} says {expected['size']}")
        files.append(SourceFile(path=rel, size=obj.size, crc32c=obj.crc32c, obj=obj,
                                sha256=expected["sha256"] if expected else None))
    _require_config(files, f"--source {config.source}")
    revision = str(own.get("revision") or "") if own else ""
    plan = SourcePlan("gcs", files, revision, _fingerprint("gcs", files, revision))
    if own:
        plan.extra["origin"] = {"source": own.get("source"), "source_kind": own.get("source_kind")}
    return plan


def _hf_endpoint() -> str | None:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return os.environ.get(HF_ENDPOINT_ENV) or None


def _hf_token() -> str | bool:
    # False, not None: never fall back to a token saved on disk by `hf auth login`.
    return os.environ.get(HF_TOKEN_ENV) or False


def _describe_hf(config: StageWeightsConfig) -> SourcePlan:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo = config.source_location
    api = HfApi(endpoint=_hf_endpoint(), token=_hf_token())
    print(f"--source {repo} is not a local folder: staging it from the Hugging Face Hub at "
          f"{api.endpoint}", file=sys.stderr)
    where = f"--source {repo} (Hugging Face Hub at {api.endpoint})"
    unserved = f"--source {repo}: no such local folder, and the Hugging Face Hub at {api.endpoint} could not serve it"
    try:
        info = api.repo_info(repo, revision=config.revision, timeout=HUB_TIMEOUT_S)
        commit = info.sha
        tree = [f for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                if isinstance(f, RepoFile)]
    except RevisionNotFoundError:
        raise StageError(f"--revision {config.revision}: not found in {repo}") from None
    except GatedRepoError:
        raise StageError(f"{unserved}: gated repository; accept its license on the Hub and set "
                         f"{HF_TOKEN_ENV} to a token with access") from None
    except RepositoryNotFoundError:
        hint = "" if os.environ.get(HF_TOKEN_ENV) else f" (set {HF_TOKEN_ENV} for a private repo)"
        raise StageError(f"{unserved}: repository not found or not accessible{hint}") from None
    except HfHubHTTPError as err:
        raise StageError(f"{unserved}: {err}") from None
    except OSError as err:  # connection refused, DNS, timeouts (httpx errors subclass neither)
        raise StageError(f"{unserved} (cannot reach the Hub, offline?): {err}") from None
    except Exception as err:
        if type(err).__module__.split(".")[0].startswith("httpx"):
            raise StageError(f"{unserved} (cannot reach the Hub, offline?): {type(err).__name__}: {err}") from None
        raise
    if not commit:
        raise StageError(f"{where}: the Hub did not report a commit sha for {config.revision}")
    files = []
    for f in sorted(tree, key=lambda f: f.path):
        if not _matches(f.path, config.allow_patterns):
            continue
        if f.lfs is not None:
            files.append(SourceFile(path=f.path, size=int(f.lfs.size), sha256=f.lfs.sha256))
        else:
            files.append(SourceFile(path=f.path, size=int(f.size), git_oid=f.blob_id))
    _require_config(files, where)
    plan = SourcePlan("hf", files, commit, _fingerprint("hf", files, commit))
    plan.extra["requested_revision"] = config.revision
    return plan


def describe_source(config: StageWeightsConfig, client=None) -> SourcePlan:
    kind = config.source_kind
    if kind == "local":
        return _describe_local(config)
    if kind == "gcs":
        return _describe_gcs(config, client)
    return _describe_hf(config)


# ------------------------------------------------------------------------------------------
# Destination
# ------------------------------------------------------------------------------------------


def _read_destination_manifest(config: StageWeightsConfig, client) -> dict[str, Any] | None:
    if config.destination_kind == "local":
        path = Path(config.destination_location) / WEIGHTS_MANIFEST
        if not path.is_file():
            return None
        with contextlib.suppress(ValueError, OSError):
            return read_json(path)
        return None
    raw = gcs.download_bytes(gcs.join_uri(config.destination_location, WEIGHTS_MANIFEST),
                             client=client)
    with contextlib.suppress(ValueError):
        return json.loads(raw) if raw is not None else None
    return None


def _destination_intact(config: StageWeightsConfig, manifest: dict[str, Any], client) -> bool:
    """Does the destination still hold exactly what ``manifest`` lists? (Reads, never copies.)"""
    try:
        verify_manifest(manifest)
    except (StageError, KeyError, TypeError, ValueError):
        return False
    if config.destination_kind == "local":
        root = Path(config.destination_location)
        for entry in manifest["files"]:
            path = root / entry["path"]
            if not path.is_file() or path.stat().st_size != int(entry["size"]):
                return False
            if gcs.file_digest(path).sha256 != entry["sha256"]:
                log.warning("%s changed since it was staged; staging again", path)
                return False
        return True
    crcs = manifest.get("crc32c") or {}
    uri = config.destination_location
    remote = {gcs.relative_name(o, uri): o for o in gcs.list_objects(uri, client)}
    for entry in manifest["files"]:
        obj = remote.get(entry["path"])
        if obj is None or obj.size != int(entry["size"]) or obj.crc32c != crcs.get(entry["path"]):
            return False
    return True


def _remove_destination_manifest(config: StageWeightsConfig, client) -> None:
    """Before anything changes: a destination without a manifest reads as 'not staged'."""
    if config.destination_kind == "local":
        with contextlib.suppress(FileNotFoundError):
            (Path(config.destination_location) / WEIGHTS_MANIFEST).unlink()
        return
    from google.api_core.exceptions import NotFound

    with contextlib.suppress(NotFound):
        gcs.delete_objects([gcs.join_uri(config.destination_location, WEIGHTS_MANIFEST)],
                           client=client)


def _remove_stale(config: StageWeightsConfig, keep: set[str], client) -> list[str]:
    """Delete model files (matching --allow-patterns) that an earlier staging left behind, so
    the destination holds exactly the manifest's files. Other files are left alone."""
    removed = []
    if config.destination_kind == "local":
        root = Path(config.destination_location)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in keep and _matches(rel, config.allow_patterns):
                path.unlink()
                removed.append(rel)
    else:
        uri = config.destination_location
        stale = [o for o in gcs.list_objects(uri, client)
                 if gcs.relative_name(o, uri) not in keep
                 and _matches(gcs.relative_name(o, uri), config.allow_patterns)]
        gcs.delete_objects([o.uri for o in stale], client=client)
        removed = [gcs.relative_name(o, uri) for o in stale]
    if removed:
        log.info("removed %d stale file(s) from an earlier staging: %s", len(removed),
                 ", ".join(removed[:10]))
    return removed


# ------------------------------------------------------------------------------------------
# Copy
# ------------------------------------------------------------------------------------------


def _git_blob_oid(path: Path, size: int) -> str:
    sha1 = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(8 * gcs.MiB):
            sha1.update(block)
    return sha1.hexdigest()


def _verify(plan: SourcePlan, root: Path, digests: dict[str, gcs.FileDigest], where: str) -> None:
    """Every staged file against what its source stated; the error names the file."""
    for f in plan.files:
        digest = digests[f.path]
        if digest.size != f.size:
            raise StageError(f"{where}/{f.path}: {digest.size} bytes after the copy, the source "
                             f"has {f.size}; no manifest written, rerun to copy it again")
        if f.sha256 is not None and digest.sha256 != f.sha256:
            raise StageError(f"{where}/{f.path}: sha256 {digest.sha256} after the copy, the "
                             f"source states {f.sha256}; no manifest written")
        if f.git_oid is not None and _git_blob_oid(root / f.path, digest.size) != f.git_oid:
            raise StageError(f"{where}/{f.path}: git blob id after the copy differs from the "
                             f"Hub's {f.git_oid}; no manifest written")
        if f.crc32c is not None and digest.crc32c != f.crc32c:
            raise StageError(f"{where}/{f.path}: crc32c {digest.crc32c} after the copy, the "
                             f"object has {f.crc32c}; no manifest written")


def _stage_local_to_local(config: StageWeightsConfig, plan: SourcePlan,
                          stats: gcs.TransferStats) -> dict[str, gcs.FileDigest]:
    src_root, dst_root = Path(config.source_location), Path(config.destination_location)
    source_digests: dict[str, gcs.FileDigest] = plan.extra["digests"]
    digests = {}
    for f in plan.files:
        src, dst = src_root / f.path, dst_root / f.path
        if dst.is_file() and dst.stat().st_size == f.size:
            if os.path.samefile(src, dst) or gcs.file_digest(dst).sha256 == f.sha256:
                stats.add(files_skipped=1)
                digests[f.path] = source_digests[f.path]
                continue
        how = link_or_copy(src, dst, config.hardlink)
        stats.add(files_copied=1, bytes_transferred=0 if how == "linked" else f.size)
        # A link is the same inode (nothing to compare); a copy is read back and hashed.
        digests[f.path] = (source_digests[f.path] if os.path.samefile(src, dst)
                           else gcs.file_digest(dst))
    return digests


def _default_staging_dir(config: StageWeightsConfig, plan: SourcePlan) -> Path:
    key = hashlib.sha256(f"{config.source}\n{plan.revision}\n{config.destination}".encode())
    return Path(tempfile.gettempdir()) / "gemma-pets-stage" / key.hexdigest()[:16]


def _materialize(config: StageWeightsConfig, plan: SourcePlan, client,
                 stats: gcs.TransferStats) -> tuple[Path, dict[str, gcs.FileDigest], Path | None]:
    """Put the source's files in a local folder; returns (folder, digests, scratch-to-remove)."""
    if plan.kind == "local":
        if config.destination_kind == "local":
            digests = _stage_local_to_local(config, plan, stats)
            return Path(config.destination_location), digests, None
        return Path(config.source_location), plan.extra["digests"], None
    if config.destination_kind == "local":
        root, scratch = Path(config.destination_location), None
    else:
        root = Path(config.staging_dir) if config.staging_dir else _default_staging_dir(config, plan)
        scratch = root
    root.mkdir(parents=True, exist_ok=True)
    if plan.kind == "gcs":
        digests = gcs.download_dir(config.source_location, root, client=client,
                                   options=config.transfer_options(),
                                   objects=[f.obj for f in plan.files], stats=stats)
    else:
        digests = _download_hf(config, plan, root, stats)
    return root, digests, scratch


def _download_hf(config: StageWeightsConfig, plan: SourcePlan, root: Path,
                 stats: gcs.TransferStats) -> dict[str, gcs.FileDigest]:
    from huggingface_hub import snapshot_download

    def signature(path: Path) -> tuple[int, int] | None:
        return (path.stat().st_ino, path.stat().st_mtime_ns) if path.is_file() else None

    before = {f.path: signature(root / f.path) for f in plan.files}
    snapshot_download(
        config.source_location, revision=plan.revision,  # the resolved sha: no branch can move
        local_dir=str(root), allow_patterns=[f.path for f in plan.files],
        cache_dir=str(root / HF_METADATA_DIR / "huggingface" / "hub"),  # nothing outside root
        token=_hf_token(), endpoint=_hf_endpoint(), max_workers=config.max_workers)
    digests = {}
    for f in plan.files:
        path = root / f.path
        if not path.is_file():
            raise StageError(f"--source {config.source}: {f.path} was not downloaded")
        digests[f.path] = gcs.file_digest(path)
    # huggingface_hub writes a downloaded file under a new name and renames it into place, so a
    # file it fetched has a new inode/mtime; one it kept has the old ones.
    fetched = [f for f in plan.files if signature(root / f.path) != before[f.path]]
    stats.add(files_copied=len(fetched), files_skipped=len(plan.files) - len(fetched),
              bytes_transferred=sum(f.size for f in fetched))
    return digests


# ------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------


def run(config: StageWeightsConfig) -> dict[str, Any]:
    """Stage the weights; returns the manifest (the existing one when nothing had to move)."""
    needs_gcs = "gcs" in (config.source_kind, config.destination_kind)
    client = gcs.make_client(pool_size=max(10, config.max_workers)) if needs_gcs else None
    plan = describe_source(config, client)
    log.info("source %s (%s%s): %d files, %d bytes", config.source, plan.kind,
             f" @ {plan.revision}" if plan.revision else "", len(plan.files),
             sum(f.size for f in plan.files))

    existing = _read_destination_manifest(config, client)
    if (existing and existing.get("source") == config.source
            and existing.get("source_fingerprint") == plan.fingerprint
            and _destination_intact(config, existing, client)):
        log.info("%s already holds these weights (manifest %s); nothing transferred",
                 config.destination, existing["manifest_sha256"])
        return existing
    if existing is not None:
        _remove_destination_manifest(config, client)

    stats = gcs.TransferStats()
    root, digests, scratch = _materialize(config, plan, client, stats)
    _verify(plan, root, digests, str(root) if scratch is None else config.source)
    if config.destination_kind == "gcs":
        gcs.upload_dir(root, config.destination_location, client=client,
                       options=config.transfer_options(), files=[f.path for f in plan.files],
                       digests=digests, stats=stats)
    _remove_stale(config, {f.path for f in plan.files}, client)

    files = [{"path": f.path, "size": digests[f.path].size, "sha256": digests[f.path].sha256}
             for f in plan.files]
    manifest: dict[str, Any] = {
        "source": config.source,
        "source_kind": plan.kind,
        "revision": plan.revision,
        **({"requested_revision": plan.extra["requested_revision"]} if plan.kind == "hf" else {}),
        **({"origin": plan.extra["origin"]} if "origin" in plan.extra else {}),
        "allow_patterns": list(config.allow_patterns),
        "source_fingerprint": plan.fingerprint,
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "manifest_sha256": files_sha256(files),
        "crc32c": {f.path: digests[f.path].crc32c for f in plan.files},  # GCS skip checks
        "staged_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if config.destination_kind == "local":
        shutil.rmtree(root / HF_METADATA_DIR / "huggingface", ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / HF_METADATA_DIR).rmdir()  # only if nothing else lives there
        write_json_atomic(Path(config.destination_location) / WEIGHTS_MANIFEST, manifest)
    else:
        gcs.upload_bytes((json.dumps(manifest, indent=2) + "\n").encode(),
                         gcs.join_uri(config.destination_location, WEIGHTS_MANIFEST),
                         client=client, content_type="application/json")
    if scratch is not None and not config.staging_dir:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("staged %d files (%d bytes) into %s: %s; manifest %s", len(files),
             manifest["total_bytes"], config.destination, stats.as_dict(),
             manifest["manifest_sha256"])
    return manifest


def _main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parse_config(StageWeightsConfig, argv))
    return 0


main = entrypoint(_main, user_errors=(StageError,))


if __name__ == "__main__":
    sys.exit(main())
