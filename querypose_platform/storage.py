"""Object storage through pyarrow.fs: one code path for local folders, s3:// and gs:// URIs, and a per-node cache
of remote files that a library needs as a local path (backbone weights for `querypose.build_model`).

Credentials and endpoints come from each store's usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ...), the same on every node, so a URI means the same object everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from querypose.config import ModelConfig
from querypose_platform.config import is_uri

COPY_CHUNK = 8 * 1024 * 1024


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    return pafs.FileSystem.from_uri(uri)


def cache_dir() -> Path:
    """Where remote files are copied on this node: $QUERYPOSE_CACHE, else ~/.cache/querypose."""
    return Path(os.environ.get("QUERYPOSE_CACHE") or Path.home() / ".cache" / "querypose")


def fetch_to_local(uri: str, cache: Path | None = None) -> Path:
    """A local copy of the file at `uri` (a local path is returned as it is).

    The copy lands in `cache` (default cache_dir()), written to a temporary name and renamed, so the workers of
    a node that fetch the same URI at once never read a partial file."""
    if not is_uri(uri):
        return Path(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri} does not exist (or is not a file)")
    # The folder is named by the URI and the object's version (size, modification time): a rewritten object
    # gets a new copy, an unchanged one is reused.
    version = f"{uri}\n{info.size}\n{info.mtime_ns}"
    folder = (cache or cache_dir()) / "remote" / hashlib.sha256(version.encode()).hexdigest()[:16]
    local = folder / (Path(path).name or "object")
    if local.is_file() and local.stat().st_size == info.size:
        return local
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{local.name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_input_stream(path) as source, staging.open("wb") as target:
            shutil.copyfileobj(source, target, COPY_CHUNK)
        staging.replace(local)
    finally:
        staging.unlink(missing_ok=True)
    return local


def resolve_backbone_weights(model: ModelConfig) -> ModelConfig:
    """The model config with an object-store `backbone_weights` URI replaced by its local copy on this node;
    local paths and hub names pass through for the model library to load."""
    if not model.backbone_weights or not is_uri(model.backbone_weights):
        return model
    return dataclasses.replace(model, backbone_weights=str(fetch_to_local(model.backbone_weights)))
