"""Resolve step: what a weights or dataset source is right now, cheaply, without copying it.

A scheduled run passes the same parameters every week (revision ``main``, the same folder or
bucket prefix), so the parameters cannot tell the ingest steps' caches that the source moved.
This step turns a source into an identity that changes exactly when its content may have:

* a Hugging Face repo id: the commit sha the revision (branch, tag or sha) points at now
  (``HfApi.model_info`` / ``dataset_info``; token only from ``HF_TOKEN``);
* a local folder or file: a fingerprint of its listing (relative names, sizes, mtimes in ns);
* a ``gs://`` prefix or object (or Vertex's ``/gcs/`` FUSE path of one): a fingerprint of the
  object listing (names, sizes, generations), read through ``components.gcs``;
* a comma pair of tarballs (the official Oxford-IIIT Pet layout): both parts.

The pipeline passes the fingerprint and resolved revision to stage-weights / prepare-dataset as
inputs, so their cache keys change with the source; reading no file's bytes keeps it cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.cli import parse_config

KINDS = ("model", "dataset")


@dataclass
class ResolveSourceConfig:
    """Resolve one source to (kind, resolved revision, listing fingerprint)."""

    source: str = field(metadata={"help": "Hugging Face repo id, local folder/file, gs:// URI, "
                                          "/gcs/ path, or a comma pair of those"})
    kind: str = field(default="model", metadata={
        "help": "model or dataset: which Hugging Face API resolves a repo id", "choices": list(KINDS)})
    revision: str = field(default="", metadata={
        "help": "Hugging Face branch, tag or sha (default: main); ignored for folders and gs://"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be model or dataset, got {self.kind!r}")
        if not self.source.strip():
            raise ValueError("--source is empty")


def _digest(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def local_listing(path: Path) -> list[list[Any]]:
    """[relative name, size, mtime_ns] of every file under ``path`` (or of the file itself)."""
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if not path.is_dir():
        raise FileNotFoundError(f"--source {path}: no such file or folder")
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = Path(root) / name
            stat = file.stat()
            entries.append([file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns])
    return entries


def gcs_listing(uri: str, client=None) -> list[list[Any]]:
    """[relative name, size, generation] of the objects under ``uri`` (or of the object)."""
    from components import gcs

    objects = gcs.list_objects(uri, client)
    if objects:
        return [[gcs.relative_name(o, uri), o.size, o.generation] for o in objects]
    single = gcs.stat(uri, client)
    if single is None:
        raise FileNotFoundError(f"--source {uri}: no object and no objects under it")
    return [[single.name.rsplit("/", 1)[-1], single.size, single.generation]]


def hf_revision(repo_id: str, kind: str, revision: str) -> str:
    """The commit sha ``revision`` of the hub repo points at now."""
    from huggingface_hub import HfApi

    from components.stage_weights import _hf_endpoint, _hf_token  # one home for hub settings

    api = HfApi(endpoint=_hf_endpoint(), token=_hf_token())
    info = (api.model_info if kind == "model" else api.dataset_info)(repo_id, revision=revision or None)
    return str(info.sha)


def _resolve_part(part: str, kind: str, revision: str, client) -> dict[str, Any]:
    from components import gcs

    if gcs.is_fuse_path(part):
        part = gcs.gcs_uri_from_fuse(part)
    if gcs.is_gcs(part):
        return {"type": "gcs", "at": part.rstrip("/"), "listing": gcs_listing(part, client)}
    path = Path(part).expanduser()
    if path.exists() or part.startswith(("/", "./", "../", "~")):
        return {"type": "local", "at": str(path.resolve()), "listing": local_listing(path)}
    return {"type": "hf", "at": part, "revision": hf_revision(part, kind, revision)}


def run(config: ResolveSourceConfig, client=None) -> dict[str, Any]:
    """{source, kind, resolved_revision (hub sha or ""), fingerprint, files, bytes}."""
    parts = [p.strip() for p in config.source.split(",")]
    resolved = [_resolve_part(p, config.kind, config.revision, client) for p in parts]
    listings = [r.get("listing", []) for r in resolved]
    shas = [r["revision"] for r in resolved if r["type"] == "hf"]
    return {"source": config.source, "kind": config.kind,
            "resolved_revision": shas[0] if len(shas) == 1 and len(parts) == 1 else "",
            "fingerprint": _digest(resolved),
            "files": sum(len(x) for x in listings),
            "bytes": sum(entry[1] for x in listings for entry in x)}


def main(argv: list[str] | None = None) -> int:
    config = parse_config(ResolveSourceConfig, argv)
    try:
        result = run(config)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
