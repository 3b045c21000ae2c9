"""Checkpoint storage over fsspec: URLs in, fresh listings, atomic small writes, bounded retries.

fsspec (and s3fs behind it) is imported on first use. S3 endpoints and credentials come from the
standard environment variables only, because DCP rebuilds its filesystem without options.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import CheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 4
RETRY_FIRST_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 2.0
_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)


def fsspec_io() -> tuple[type[FileSystemWriter], type[FileSystemReader]]:
    """DCP's `(FsspecWriter, FsspecReader)`, from the public module when torch has it, else the private one."""
    try:
        module = importlib.import_module("torch.distributed.checkpoint.fsspec_filesystem")
    except ImportError:
        module = importlib.import_module("torch.distributed.checkpoint._fsspec_filesystem")
    return module.FsspecWriter, module.FsspecReader


def protocol_of(url: str) -> str:
    """`s3` for `s3://b/p`, `file` for a plain path or `file://`."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def url_to_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and protocol-less path for `url`; a missing extra is a one-line hint."""
    try:
        from fsspec.core import url_to_fs as _url_to_fs

        return _url_to_fs(url)
    except ImportError as e:
        extra = "s3" if protocol_of(url) in ("s3", "s3a") else None
        hint = f"pip install igniter-dist[{extra}]" if extra else "install the fsspec backend for it"
        raise CheckpointError(f"Cannot open checkpoint URL {url}: {e}; {hint}.") from None
    except ValueError as e:
        raise CheckpointError(f"{url!r} is not a checkpoint folder or URL fsspec understands ({e}).") from None


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` looks like a network or throttling hiccup that a retry may cure."""
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY):
        return True
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(
        exc, (botocore.ConnectionError, botocore.HTTPClientError, botocore.ReadTimeoutError)
    ):
        return True
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, aiohttp.ClientError)


def is_outage(exc: BaseException) -> bool:
    """Whether a failed read means the storage is unreachable or refuses access (try again later),
    rather than that the files read are damaged."""
    return isinstance(exc, PermissionError) or is_transient(exc) or _sdk_retried(exc)


def _sdk_retried(exc: BaseException) -> bool:
    """botocore retries its own errors with backoff (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS): retrying
    them again here would multiply the wait on an outage."""
    return type(exc).__module__.startswith("botocore")


def retry(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Call `fn`, retrying transient storage errors with bounded exponential backoff."""
    delay = RETRY_FIRST_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e) or _sdk_retried(e):
                raise
            log.warning("%s failed (%s: %s); retry %d of %d in %.2fs", what, type(e).__name__, e,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


class Storage:
    """One checkpoint root (a folder or URL) and the few file operations the protocol needs."""

    def __init__(self, url: str):
        if not isinstance(url, str) or not url.strip():
            raise CheckpointError(f"The checkpoint location must be a folder or URL, got {url!r}.")
        self.url = url.rstrip("/") or "/"
        self.protocol = protocol_of(self.url)
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs) or "local" in _protocols(self.fs)

    def url_of(self, *parts: str) -> str:
        """The URL of a path under the root, as given to DCP and shown in messages."""
        return "/".join([self.url, *parts]) if parts else self.url

    def path_of(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def invalidate(self) -> None:
        """Forget cached listings (s3fs keeps them per instance) so the next read sees other writers."""
        self.fs.invalidate_cache()

    def find(self, *parts: str) -> dict[str, int]:
        """Every file under the root (or a folder in it) with its size, keyed by path relative to
        that folder, listed fresh: s3fs would otherwise answer from a cache that misses other writers."""
        base = self.path_of(*parts)

        def _find() -> dict[str, int]:
            self.invalidate()
            if not self.fs.exists(base):
                self._check_bucket()
                return {}
            found = self.fs.find(base, detail=True)
            return {p[len(base):].lstrip("/"): int(info.get("size") or 0) for p, info in found.items()
                    if info.get("type", "file") == "file"}

        return retry(_find, f"listing {self.url_of(*parts)}")

    def read_bytes(self, *parts: str) -> bytes:
        path = self.path_of(*parts)
        return retry(lambda: self.fs.cat_file(path), f"reading {self.url_of(*parts)}")

    def exists(self, *parts: str) -> bool:
        path = self.path_of(*parts)
        return retry(lambda: self.fs.exists(path), f"checking {self.url_of(*parts)}")

    def makedirs(self, *parts: str) -> None:
        path = self.path_of(*parts)
        if self.is_local:
            retry(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {self.url_of(*parts)}")
        else:
            self._check_bucket()  # object stores have no folders; only the bucket must exist

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Write a small file so that readers see it whole or not at all (tmp + fsync + rename locally;
        one PUT on object stores)."""
        path = self.path_of(*parts)
        if not self.is_local:
            retry(lambda: self.fs.pipe_file(path, data), f"writing {self.url_of(*parts)}")
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.fs.mv(tmp, path)

    def rm(self, *parts: str) -> None:
        """Delete one file (absent is fine)."""
        path = self.path_of(*parts)

        def _rm() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        retry(_rm, f"deleting {self.url_of(*parts)}")

    def rm_tree(self, *parts: str) -> None:
        """Delete a folder and everything in it (absent is fine)."""
        path = self.path_of(*parts)

        def _rm() -> None:
            self.fs.invalidate_cache(path)
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        retry(_rm, f"deleting {self.url_of(*parts)}")

    def bucket(self) -> str | None:
        """The bucket of an object-store URL (`s3://bucket/prefix`), None for anything else."""
        if self.protocol not in _BUCKET_PROTOCOLS:
            return None
        return self.root.split("/", 1)[0] or None

    def _check_bucket(self) -> None:
        bucket = self.bucket()
        if bucket is None:
            return
        try:
            present = retry(lambda: self.fs.exists(bucket), f"checking bucket {bucket}")
        except PermissionError:
            return  # ListBucket on the bucket itself may be denied while the prefix is readable
        if not present:
            raise FileNotFoundError(errno.ENOENT, f"bucket {bucket!r} does not exist", bucket)

    def describe(self, exc: BaseException) -> str:
        """One clause naming the cause of a storage failure (never by matching error text)."""
        exc = root_cause(exc)
        bucket = self.bucket()
        if isinstance(exc, FileNotFoundError) and bucket is not None:
            try:
                missing = not self.fs.exists(bucket)
            except Exception:
                missing = False
            if missing:
                return f"the bucket {bucket!r} does not exist (create it or fix the URL)"
        if isinstance(exc, PermissionError):
            return ("access was denied (the credentials need s3:ListBucket, s3:GetObject, s3:PutObject "
                    "and s3:DeleteObject on it)" if bucket else "permission denied")
        if is_transient(exc):
            return f"the storage could not be reached after retries ({type(exc).__name__}: {exc})"
        return f"{type(exc).__name__}: {exc}"

    def error(self, action: str, exc: BaseException, url: str | None = None) -> CheckpointError:
        """A CheckpointError for `action` on `url` (default: the root) with the described cause."""
        return CheckpointError(f"Could not {action} {url or self.url}: {self.describe(exc)}.")


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException, else `exc` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return root_cause(inner)
    return exc


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
