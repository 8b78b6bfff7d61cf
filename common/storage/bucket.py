"""A bucket workdir's connection: its URL, its fsspec filesystem, retries of transient errors, verified uploads.

`s3://bucket/prefix` goes through `s3fs`, `gs://bucket/prefix` through `gcsfs`; both come with the
`cloud` extra (`pip install -e '.[cloud]'`). Credentials and endpoints are found the usual way:
  - S3: the AWS environment and config files; `AWS_ENDPOINT_URL` with `AWS_ACCESS_KEY_ID` and
    `AWS_SECRET_ACCESS_KEY` points `s3://` at any S3-compatible server (MinIO, an emulator);
  - GCS: Application Default Credentials; `STORAGE_EMULATOR_HOST` points `gs://` at an emulator,
    which takes no credentials.
Every request goes through `Bucket.call`, which retries transient failures (timeouts, resets,
refused connections, 5xx, throttling) with jittered exponential backoff and logs each retry; a
request with no answer for `REQUEST_TIMEOUT_SECS` is cut and counts as one of them.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import BucketUnusable, UsageError, WorkdirIOError

SCHEMES = ("s3", "gs")
_URL = re.compile(r"^(s3|gs)://([^/]+)/?(.*)$")
ATTEMPTS = 8  # tries of one request before it fails (waits up to 0.2, 0.4, ... 12.8 s between them: 25 s at most)
BACKOFF_SECS = 0.2
REQUEST_TIMEOUT_SECS = 60.0  # a request without an answer (or a body that stops coming) for this long is cut
CONNECT_TIMEOUT_SECS = 10.0
PART_BYTES = 16 << 20  # multipart uploads and ranged downloads move a large object in parts of this size
CONCURRENCY = 8  # parts of one object, or objects of one checkpoint, moved at once
# Errors that say something about the request, not the network: retrying cannot help.
_FINAL = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)

log = logging.getLogger("ckpt_watch.bucket")
T = TypeVar("T")


def is_bucket_url(value: str | os.PathLike[str]) -> bool:
    """Whether `value` names a workdir in a bucket (`s3://...` or `gs://...`)."""
    return bool(_URL.match(os.fspath(value)))


@dataclass(frozen=True)
class BucketURL:
    """A parsed `s3://bucket/prefix` or `gs://bucket/prefix`."""

    scheme: str  # "s3" or "gs"
    bucket: str  # the bucket's name
    prefix: str  # the folder inside the bucket, without slashes at either end ("" for the bucket's root)

    @classmethod
    def parse(cls, url: str) -> BucketURL:
        """Split a bucket URL. Raises UsageError naming the value when it is not one."""
        match = _URL.match(url)
        if not match or any(p in ("..", ".") for p in match.group(3).split("/")):
            raise UsageError(f"--workdir {url!r}: not a bucket URL such as s3://bucket/prefix or gs://bucket/prefix")
        return cls(match.group(1), match.group(2), match.group(3).strip("/"))

    def path(self, key: str = "") -> str:
        """The fsspec path (no scheme) of `key` under the prefix."""
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def url(self, key: str = "") -> str:
        """`key` as a URL, for messages."""
        return f"{self.scheme}://{self.path(key)}"


def filesystem(url: BucketURL, *, timeout: float = REQUEST_TIMEOUT_SECS) -> Any:
    """A fresh fsspec filesystem for the URL's store, without listing caches (every read must see the store).

    `timeout`: seconds a request may go without an answer before it is cut (then `Bucket.call` retries it).
    Large objects move in `PART_BYTES` parts, `CONCURRENCY` at once: S3 multipart uploads and
    ranged downloads (s3fs), GCS ranged downloads (gcsfs; its uploads are resumable, in sequence).

    Raises:
      UsageError: the `cloud` extra is not installed.
    """
    try:
        if url.scheme == "s3":
            import s3fs

            # Botocore's and s3fs' own retries are off: `Bucket.call` retries, and says so in the log.
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, max_concurrency=CONCURRENCY,
                                   default_block_size=PART_BYTES,
                                   config_kwargs={"connect_timeout": min(CONNECT_TIMEOUT_SECS, timeout),
                                                  "read_timeout": timeout,
                                                  "retries": {"total_max_attempts": 1, "mode": "standard"}})
            fs.retries = 1
            return fs
        # gcsfs.core.GCSFileSystem, not the `gcsfs` default: that one first asks a gRPC control API for
        # the bucket's type, which an emulator does not serve (measured: a 60 s timeout per bucket).
        # gcsfs retries 5xx, 429 and network errors itself (6 tries over about 30 s; not configurable per
        # instance): `_GcsfsRetries` logs each of those retries as ours.
        from gcsfs.core import GCSFileSystem

        _GcsfsRetries.install()
        token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None  # an emulator takes no credentials
        return GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, token=token,
                             requests_timeout=timeout)
    except ImportError as e:
        raise UsageError(f"--workdir {url.url()}: {url.scheme}:// workdirs need the cloud extra "
                         f"(pip install -e '.[cloud]'): {e}") from e


class _GcsfsRetries(logging.Filter):
    """Turns gcsfs' own retries (debug lines) into warnings of this module's log, one line each, and counts them.

    gcsfs logs a retry at debug level and its last failure with a traceback; both become one line here.
    What it calls a non-retriable exception (a 412 of a conditional create, say) goes to the caller,
    which handles it: it is not logged.
    """

    seen = 0  # gcsfs retries in this process (for tests and figures)

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger("gcsfs")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
            logger.setLevel(logging.DEBUG)  # the filter drops every record: it re-logs only the retries

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "retrying after exception" in text:
            type(self).seen += 1
            log.warning("gcsfs %s", text.splitlines()[0])
        elif "out of retries" in text:
            log.warning("gcsfs %s", text.splitlines()[0])
        return False


def transient(error: BaseException) -> bool:
    """Whether retrying the request may help: timeouts, network errors, 5xx and throttling (429)."""
    if isinstance(error, _FINAL) or _precondition_failed(error) or "Credentials" in type(error).__name__:
        return False  # botocore's NoCredentialsError and the like: the environment must change, not the network
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code >= 500 or code == 429
    # aiohttp's and botocore's errors are the network's: a reset, a timeout, a body cut short.
    return isinstance(error, OSError | TimeoutError) or type(error).__module__.split(".")[0] in ("aiohttp", "botocore")


class Bucket:
    """One workdir's connection to its bucket: `call` runs a request with retries."""

    def __init__(self, url: BucketURL, fs: Any = None, *, attempts: int = ATTEMPTS,
                 backoff_secs: float = BACKOFF_SECS) -> None:
        if attempts < 1 or backoff_secs < 0:
            raise ValueError(f"attempts ({attempts}) must be at least 1 and backoff_secs ({backoff_secs}) not negative")
        self.url = url
        self.fs = fs if fs is not None else filesystem(url)
        self.attempts = attempts
        self.backoff_secs = backoff_secs
        self.retries = 0  # transient failures retried so far (for tests and figures)

    def call(self, what: str, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, retried on transient errors; `what` and `key` name the request in messages.

        Raises:
          FileNotFoundError, FileExistsError, PermissionError: as the store answered.
          OSError: a transient error persisted through every attempt (errno EIO, one line).
        """
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not transient(e):
                    raise
                text = one_line(e)
                if attempt == self.attempts:
                    raise OSError(errno.EIO, f"{what} {self.url.url(key)} failed {attempt} times: {text}") from e
                # Jittered, so that the clients a store throttled at once do not come back at once.
                wait = self.backoff_secs * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                self.retries += 1
                log.warning("%s %s: %s; retrying in %.1f s (attempt %d of %d)", what, self.url.url(key), text,
                            wait, attempt + 1, self.attempts)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def head(self, key: str) -> dict[str, Any] | None:
        """The metadata of object `key` in one request (fsspec's `info` lists too when it is absent); None if absent."""
        path = self.url.path(key)
        try:
            if self.url.scheme == "s3":
                bucket, _, name = path.partition("/")
                reply = self.call("checking", key, self.fs.call_s3, "head_object", Bucket=bucket, Key=name)
                return {"ETag": reply.get("ETag"), "LastModified": reply.get("LastModified"),
                        "size": reply.get("ContentLength")}
            from fsspec.asyn import sync

            return dict(self.call("checking", key, sync, self.fs.loop, self.fs._get_object, path))
        except FileNotFoundError:
            return None

    def delete_if_unchanged(self, key: str, version: dict[str, Any]) -> bool:
        """Delete object `key` only if it is still the version `head` returned; whether it is gone now.

        S3: `If-Match: <ETag>` on the DELETE; GCS: `ifGenerationMatch`. (fake-gcs-server ignores the
        latter on a DELETE, measured: there the delete is unconditional.)
        """
        bucket, _, name = self.url.path(key).partition("/")
        try:
            if self.url.scheme == "s3":
                self.call("deleting", key, self.fs.call_s3, "delete_object", Bucket=bucket, Key=name,
                          IfMatch=version["ETag"])
            else:
                from fsspec.asyn import sync

                self.call("deleting", key, sync, self.fs.loop, self.fs._call, "DELETE", "b/{}/o/{}", bucket, name,
                          ifGenerationMatch=version["generation"])
        except FileNotFoundError:
            return True
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def check_bucket(self) -> None:
        """Raise UsageError (one line) when the bucket does not exist: creating it is the user's job."""
        try:
            self.call("listing", "", self.fs.ls, self.url.bucket, detail=False)
        except FileNotFoundError:
            raise BucketUnusable(self.url.url(), f"the bucket {self.url.bucket!r} does not exist "
                                 "(create it first)") from None
        except PermissionError as e:
            raise BucketUnusable(self.url.url(), f"access denied to the bucket: {one_line(e)}") from None
        except OSError as e:  # retried in vain: the store cannot be reached
            raise WorkdirIOError(f"--workdir {self.url.url()}: cannot reach the bucket: {one_line(e)}") from None
        except Exception as e:  # no credentials, or another answer that no retry changes
            raise BucketUnusable(self.url.url(), f"cannot use the bucket: {one_line(e)}") from None

    def upload(self, key: str, local: str | os.PathLike[str]) -> None:
        """Upload a local file as object `key` (in `PART_BYTES` parts when large), then check it (`verify`).

        Raises:
          OSError: the upload failed through every retry, or the object does not verify (errno EIO).
        """
        self.call("uploading", key, self.fs.put_file, os.fspath(local), self.url.path(key), chunksize=PART_BYTES)
        self.verify(key, Digest.of(local))

    def verify(self, key: str, digest: Digest) -> None:
        """Check an uploaded object against the local file's `digest` (see `mismatch`).

        Raises:
          OSError: the object is missing or differs (errno EIO).
        """
        info = self.call("checking", key, self.fs.info, self.url.path(key))
        why = mismatch(info, digest)
        if why:
            raise OSError(errno.EIO, f"upload of {self.url.url(key)} did not verify: {why}")


@dataclass(frozen=True)
class Digest:
    """What a local file's bytes give to compare with a store's own checksums."""

    size: int  # bytes
    md5: bytes  # MD5 of the whole file (GCS `md5Hash`, the S3 ETag of a single-part upload)
    parts: tuple[bytes, ...]  # MD5 of each `PART_BYTES` part (an S3 multipart ETag is the MD5 of these)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Digest:
        """The digest of a local file, read once."""
        whole, parts, size = hashlib.md5(usedforsecurity=False), [], 0
        with open(path, "rb") as f:
            while chunk := f.read(PART_BYTES):  # a part per read: the parts' digests come with the whole one
                whole.update(chunk)
                parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
                size += len(chunk)
        return cls(size, whole.digest(), tuple(parts))


def mismatch(info: dict[str, Any], digest: Digest) -> str | None:
    """Why the object that `info` (fsspec's `info`, or `Bucket.head`) describes is not the local file of `digest`.

    The size always; then the MD5 where the store gives one: GCS `md5Hash`, the ETag of a single-part
    S3 upload, or of a multipart upload made in `PART_BYTES` parts (`Bucket.upload`), which is the
    MD5 of the parts' MD5s followed by `-<parts>`. An object of other parts is checked by its size alone.
    None when they agree.
    """
    size = int(info.get("size") or 0)
    if size != digest.size:
        return f"the store holds {size} bytes, the local copy {digest.size}"
    stored = store_md5(info)
    if stored is not None:
        return None if stored == digest.md5 else "the MD5 differs"
    multipart = re.fullmatch(r"([0-9a-f]{32})-(\d+)", str(info.get("ETag") or "").strip('"'))
    if multipart and int(multipart.group(2)) == len(digest.parts):
        joined = hashlib.md5(b"".join(digest.parts), usedforsecurity=False).hexdigest()
        return None if joined == multipart.group(1) else "the multipart ETag differs"
    return None


def _precondition_failed(error: BaseException) -> bool:
    """Whether the store refused a conditional request because the object changed (HTTP 412)."""
    return getattr(error, "code", None) == 412 or "pre-condition" in str(error) or "PreconditionFailed" in str(error)


def store_md5(info: dict[str, Any]) -> bytes | None:
    """The MD5 digest the store reports for an object, or None when it reports none."""
    if info.get("md5Hash"):
        return base64.b64decode(info["md5Hash"])
    etag = str(info.get("ETag") or "").strip('"')
    return bytes.fromhex(etag) if re.fullmatch(r"[0-9a-f]{32}", etag) else None


def one_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
