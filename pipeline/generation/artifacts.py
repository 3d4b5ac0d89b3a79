"""Where generated images and run records go: a local folder or an s3:// prefix (pipeline/storage.py).

An object appears only when it is complete (storage.write_bytes), so whoever sees the object -- or the output row
written after it -- sees all of it. Failed writes are retried with backoff. Once a write has failed after all
retries the store counts as down: later writes fail at once, and one write every `cooldown_seconds` tries again (a
dead store fails the remaining images in moments, not after minutes of backoff each; one that comes back is used
again).
"""

from __future__ import annotations

import logging
import posixpath
import time
from pathlib import Path

from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_attempt, wait_exponential

from pipeline import storage

log = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """A write failed after the retries."""


class ArtifactStore:
    def __init__(self, root: str | Path, retries: int = 3, backoff_seconds: float = 0.5, cooldown_seconds: float = 30):
        root = str(root)
        storage.filesystem(root)  # a UserError for s3:// without a bucket
        self.root = root.rstrip("/") if storage.is_s3(root) else str(Path(root).expanduser().resolve())
        self.retries, self.backoff, self.cooldown = retries, backoff_seconds, cooldown_seconds
        self.down: str | None = None  # why the last write failed after all retries
        self._down_at = 0.0

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root})"

    def uri(self, key: str) -> str:
        return storage.join(self.root, key)

    def relative(self, from_key_dir: str, uri: str) -> str:
        """A link from an object under key folder `from_key_dir` to `uri` (for the HTML gallery)."""
        prefix = self.root + "/"
        if uri.startswith(prefix):
            return posixpath.relpath(uri[len(prefix):], from_key_dir)
        return uri

    def put(self, key: str, data: bytes) -> str:
        """Write the object completely (or not at all) and return its URI; StorageUnavailable after the retries."""
        if self.down and time.monotonic() - self._down_at < self.cooldown:
            ago = time.monotonic() - self._down_at
            raise StorageUnavailable(f"artifact store {self.root} unreachable (failed {ago:.0f} s ago; not tried "
                                     f"again yet): {self.down}")
        tries = 1 if self.down else self.retries + 1
        attempts = Retrying(stop=stop_after_attempt(tries), wait=wait_exponential(multiplier=self.backoff),
                            retry=retry_if_exception_type(storage.StorageError), reraise=True,
                            before_sleep=before_sleep_log(log, logging.WARNING))
        try:
            uri = attempts(storage.write_bytes, self.uri(key), data)
        except storage.StorageError as e:
            self.down, self._down_at = f"{type(e).__name__}: {str(e)[:300]}", time.monotonic()
            raise StorageUnavailable(f"artifact store {self.root} unreachable after {tries} "
                                     f"{'try' if tries == 1 else 'tries'}: {self.down}") from None
        self.down = None
        return uri

    def read(self, uri: str) -> bytes:
        return storage.read_bytes(uri)

    def exists(self, uri: str) -> bool:
        return storage.exists(uri)
