"""Where generated images and run records go: a local folder or an s3:// prefix.

An object appears only when it is complete (local: a temp file in the same folder, fsync, rename; S3: a PUT is
atomic), so whoever sees the object -- or the output row written after it -- sees all of it. Failed writes are
retried with backoff. Once a write has failed after all retries the store counts as down: later writes fail at
once, and one write every `cooldown_seconds` tries again (a dead store fails the remaining images in moments, not
after minutes of backoff each; one that comes back is used again).
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from pathlib import Path

from pipeline import s3
from pipeline.errors import UserError

log = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """A write failed after the retries."""


class ArtifactStore:
    def __init__(self, root: str | Path, retries: int = 3, backoff_seconds: float = 0.5, cooldown_seconds: float = 30):
        root = str(root)
        self.is_s3 = s3.is_s3(root)
        if self.is_s3:
            s3.split_uri(root)  # a UserError for s3:// without a bucket
            self.root = root.rstrip("/")
        else:
            self.root = str(Path(root).expanduser().resolve())
        self.retries, self.backoff, self.cooldown = retries, backoff_seconds, cooldown_seconds
        self.down: str | None = None  # why the last write failed after all retries
        self._down_at = 0.0

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root})"

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}" if self.is_s3 else str(Path(self.root, key))

    def relative(self, from_key_dir: str, uri: str) -> str:
        """A link from an object under key folder `from_key_dir` to `uri` (for the HTML gallery)."""
        prefix = self.root + "/"
        if uri.startswith(prefix):
            return posixpath.relpath(uri[len(prefix):], from_key_dir)
        return uri

    def _put_once(self, key: str, data: bytes) -> str:
        uri = self.uri(key)
        if self.is_s3:
            s3.put_bytes(data, uri)
            return uri
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return uri

    def put(self, key: str, data: bytes) -> str:
        """Write the object completely (or not at all) and return its URI; StorageUnavailable after the retries."""
        if self.down and time.monotonic() - self._down_at < self.cooldown:
            ago = time.monotonic() - self._down_at
            raise StorageUnavailable(f"artifact store {self.root} unreachable (failed {ago:.0f} s ago; not tried "
                                     f"again yet): {self.down}")
        tries = 1 if self.down else self.retries + 1
        last: Exception | None = None
        for attempt in range(tries):
            try:
                uri = self._put_once(key, data)
                self.down = None
                return uri
            except (OSError, UserError) as e:  # S3 faults arrive as UserError from pipeline.s3
                last = e
                if attempt + 1 < tries:
                    wait = self.backoff * 2**attempt
                    log.warning("writing %s failed (%s); retry %d/%d in %.1f s", key, e, attempt + 1,
                                self.retries, wait)
                    time.sleep(wait)
        self.down, self._down_at = f"{type(last).__name__}: {str(last)[:300]}", time.monotonic()
        raise StorageUnavailable(f"artifact store {self.root} unreachable after {tries} "
                                 f"{'try' if tries == 1 else 'tries'}: {self.down}")

    def read(self, uri: str) -> bytes:
        return s3.read_bytes(uri) if s3.is_s3(uri) else Path(uri).read_bytes()

    def exists(self, uri: str) -> bool:
        return s3.exists(uri) if s3.is_s3(uri) else Path(uri).is_file()
