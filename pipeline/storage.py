"""Files on the local disk or on S3 (`s3://BUCKET/KEY`), through one fsspec interface.

S3 goes through s3fs: the endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), never from files we commit;
botocore retries transient faults (standard mode). Failures arrive as the two errors below, by type:
`NotFound` (the object or file does not exist), `Unreachable` (the endpoint did not answer: transient) and
`StorageError` (the base: no credentials, access denied, ...), all UserErrors that name the URI.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from functools import lru_cache
from pathlib import Path

import fsspec
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError


class StorageError(UserError):
    """A file or object could not be read or written."""


class NotFound(StorageError):
    """The file or object does not exist (or is a directory)."""


class Unreachable(StorageError):
    """The store did not answer (endpoint down, network, timeouts): worth trying again later."""


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_s3(root) else str(Path(root) / name)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, key_id: str | None, region: str):
    config = {"retries": {"max_attempts": 5, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 60}
    if endpoint:
        config["s3"] = {"addressing_style": "path"}  # S3-compatible servers (MinIO, rclone) serve path-style
    # listings are not cached: another process (a DAG task, a worker) may have written since
    return fsspec.filesystem("s3", endpoint_url=endpoint, client_kwargs={"region_name": region},
                             config_kwargs=config, use_listings_cache=False, skip_instance_cache=True)


def filesystem(uri: str | Path):
    """(fsspec filesystem, path inside it) for a local path or an s3:// URI."""
    s = str(uri)
    if is_s3(s):
        bucket = s[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise UserError(f"{s}: no bucket name (expected s3://BUCKET/KEY)")
        fs = _s3(_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, s[len("s3://"):]
    return LocalFileSystem(), str(Path(s).expanduser().resolve())


def _explain(uri: str, e: Exception) -> StorageError:
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        what = "is a directory, not a file" if isinstance(e, IsADirectoryError) else "not found"
        detail = f" ({e.strerror or e})" if is_s3(uri) else ""  # S3 says which: no such key, no such bucket
        return NotFound(f"{uri}: {what}{detail}")
    if isinstance(e, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(and AWS_ENDPOINT_URL for a non-AWS server)")
    if isinstance(e, EndpointConnectionError | ConnectionError | TimeoutError):
        return Unreachable(f"{uri}: S3 endpoint unreachable ({e}); check AWS_ENDPOINT_URL and the network")
    if isinstance(e, PermissionError):
        return StorageError(f"{uri}: access denied ({e}); check the credentials and the bucket policy")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return StorageError(f"{uri}: S3 error {err.get('Code', '?')}: {err.get('Message', e)}")
    if isinstance(e, OSError):
        return StorageError(f"{uri}: {e.strerror or e}")
    return StorageError(f"{uri}: request failed ({type(e).__name__}: {e})")


_FAULTS = (OSError, BotoCoreError, ClientError)  # what fsspec and s3fs raise; anything else is a bug, not a fault


def _on(uri: str | Path, action):
    """action(filesystem, path) for `uri`, with the filesystem's faults as the errors above."""
    fs, path = filesystem(uri)
    try:
        return action(fs, path)
    except _FAULTS as e:
        raise _explain(str(uri), e) from None


def read_bytes(uri: str | Path) -> bytes:
    return _on(uri, lambda fs, path: fs.cat_file(path))


def open_stream(uri: str | Path):
    """A readable binary stream of the file (tar archives are read from it in one pass)."""
    return _on(uri, lambda fs, path: fs.open(path, "rb"))


def _uris(prefix: str | Path, paths: list[str]) -> list[str]:
    return sorted(f"s3://{p}" if is_s3(prefix) else p for p in paths)


def list_files(prefix: str | Path) -> list[str]:
    """Every file under a folder or s3:// prefix (recursively), as full URIs or paths, sorted."""
    return _uris(prefix, _on(prefix, lambda fs, path: fs.find(path)))


def list_dir(prefix: str | Path) -> list[str]:
    """The files directly in a folder or s3:// prefix (not in sub-folders), as full URIs or paths, sorted."""
    return _uris(prefix, _on(prefix, lambda fs, path: [e["name"] for e in fs.ls(path, detail=True)
                                                     if e["type"] == "file"]))


def exists(uri: str | Path) -> bool:
    return _on(uri, lambda fs, path: fs.isfile(path))


def write_bytes(uri: str | Path, data: bytes) -> str:
    """Write the file completely or not at all, and return its URI: an S3 PUT is atomic; a local file is written
    to a temporary name in the same folder, synced and renamed into place."""

    def write(fs, path: str) -> str:
        if is_s3(uri):
            fs.pipe_file(path, data)
            return str(uri)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path),
                             f".{posixpath.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        return path

    return _on(uri, write)


def upload_file(local: Path, uri: str) -> None:
    """Copy a local file to `uri` (an S3 object appears only once the upload completed)."""
    _on(uri, lambda fs, path: fs.put_file(str(local), path))
