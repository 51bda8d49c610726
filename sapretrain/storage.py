"""Local paths and fsspec URLs (``s3://``, ``gs://``, ``https://``…) behind one small interface.

Credentials and endpoints come from the environment or fsspec's own config (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``, or ``FSSPEC_S3_*``), never
from our configs, so they cannot leak into a saved config, a log or a checkpoint.

Transient errors (connection refused/reset, timeouts, HTTP 5xx, throttling: ``is_transient``) are
retried with exponential backoff for a bounded time per outage (``retry_transient``; shard reads
through ``open_retrying``, which resumes a broken read at the byte it reached), then
``StorageUnavailable``. Missing objects, denied permissions and bad requests are not retried. The
budget counts from the first failure; one attempt may itself take as long as the client's own
timeouts and retries (botocore: ``AWS_MAX_ATTEMPTS``, connect/read timeouts).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

def url_to_fs(url: str):
    """``(filesystem, path)`` for a local path or fsspec URL."""
    return fsspec.core.url_to_fs(str(url))


def is_url(ref: str) -> bool:
    return "://" in ref


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def join(base: str, ref: str) -> str:
    """Resolve ``ref`` against directory ``base`` unless it is already absolute or a URL."""
    if is_url(ref) or os.path.isabs(ref):
        return ref
    return f"{str(base).rstrip('/')}/{ref}"


def parent(url: str) -> str:
    url = str(url).rstrip("/")
    if is_url(url):
        protocol, _, rest = url.partition("://")
        return f"{protocol}://{rest.rpartition('/')[0]}" if "/" in rest else url
    return str(Path(url).resolve().parent)


# --------------------------------------------------------------------------------------------
# Transient errors: an object store that is briefly unreachable is waited for, never skipped

RETRY_SECONDS = 300.0  # default budget of one outage (``data.storage_retry_seconds`` for shards)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 30.0  # seconds before the 2nd attempt; longest single wait
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
# By class name (and the module they come from), so that none of these optional clients is imported
# here: connection refused / reset / closed, timeouts, a response cut short.
_TRANSIENT_CLASSES = {
    "botocore": {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                 "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError"},
    "aiohttp": {"ClientConnectionError", "ServerTimeoutError", "ClientPayloadError", "ConnectionTimeoutError",
                "SocketTimeoutError"},
    "fsspec": {"FSTimeoutError"},
    "requests": {"ConnectionError", "Timeout", "ChunkedEncodingError"},
    "urllib3": {"ProtocolError", "TimeoutError", "NewConnectionError", "IncompleteRead"},
    "http": {"IncompleteRead", "RemoteDisconnected"},
}
# S3 error codes that mean "try again" (the HTTP status is 5xx for all but the throttling ones).
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                       "ThrottlingException", "RequestTimeTooSkewed"}


class StorageUnavailable(RuntimeError):
    """Storage stayed unreachable (connection, timeout, HTTP 5xx) for the whole retry budget.

    Not an ``OSError``: code that skips unreadable *content* (a truncated tar) must not catch it.
    The only argument is the message, so a DataLoader worker's copy re-raises as this type.
    """

    @classmethod
    def from_worker(cls, error: "StorageUnavailable") -> "StorageUnavailable":
        """The original message of an error re-raised by a DataLoader worker (whose text is
        "Caught StorageUnavailable in DataLoader worker ... Original Traceback ...")."""
        text = str(error)
        if "Original Traceback" not in text:
            return error
        last = [line for line in text.splitlines() if line.strip()][-1]
        return cls(last.split(f"{cls.__name__}: ", 1)[-1])


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says "the storage is unreachable now":
    connection refused/reset/closed, a timeout, HTTP 5xx or S3 throttling. A missing object,
    a denied permission, bad credentials or a bad request are not transient."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        verdict = _transient_one(error)
        if verdict is not None:
            return verdict
        error = error.__cause__ or error.__context__
    return False


def _transient_one(error: BaseException) -> bool | None:
    """True / False when ``error`` itself decides it, None to look at the error it came from."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):  # refused, reset, aborted, broken pipe, timeouts
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    for klass in type(error).__mro__:
        if klass.__name__ in _TRANSIENT_CLASSES.get(klass.__module__.split(".")[0], ()):
            return True
    response = getattr(error, "response", None)  # botocore ClientError: a dict; requests HTTPError: an object
    if isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_S3_CODES or _is_5xx(status) or _is_5xx(code)
    status = getattr(error, "status", None) or getattr(error, "status_code", None)  # aiohttp, HTTP clients
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    if status is None and type(error).__name__ == "HttpError":  # gcsfs
        status = getattr(error, "code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return _is_5xx(status)
    return None


def _is_5xx(status: Any) -> bool:
    try:
        return 500 <= int(status) <= 599
    except (TypeError, ValueError):
        return False


class _Backoff:
    """Exponential waits (with jitter, so ranks do not retry in lock-step) within one outage's
    budget: the clock starts at the first failure and ``reset`` after a success."""

    _jitter = random.Random()  # private: the training RNG state must not depend on outages

    def __init__(self, what: str, seconds: float):
        self.what, self.seconds = what, seconds
        self.reset()

    def reset(self) -> None:
        self.start: float | None = None
        self.attempts = 0

    def wait_or_raise(self, error: BaseException) -> None:
        """After a transient ``error``: sleep before the next attempt, or raise StorageUnavailable
        when the budget is spent."""
        now = time.monotonic()
        if self.start is None:
            self.start = now
        self.attempts += 1
        elapsed = now - self.start
        if elapsed >= self.seconds:
            raise StorageUnavailable(
                f"{self.what}: storage unreachable, gave up after {elapsed:.1f} s and {self.attempts} attempts "
                f"(retry budget {self.seconds:g} s): {type(error).__name__}: {_one_line(error)}"
            ) from error
        if self.attempts == 1:
            log.warning("%s: %s: %s; retrying for up to %g s", self.what, type(error).__name__, _one_line(error),
                        self.seconds)
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (self.attempts - 1)) * self._jitter.uniform(0.75, 1.0)
        time.sleep(max(0.0, min(delay, self.seconds - elapsed)))


def _one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]


def retry_transient(fn: Callable[[], T], what: str, seconds: float = RETRY_SECONDS) -> T:
    """``fn()``, retried with exponential backoff while it fails with a transient error, for at
    most ``seconds`` in all; then StorageUnavailable. Other errors propagate at once."""
    backoff = _Backoff(what, seconds)
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            backoff.wait_or_raise(e)


class RetryingReader:
    """A binary file opened with ``open_file`` that survives transient errors: a failed ``read``
    re-opens the file, goes back to the position reached and reads again, within ``seconds`` per
    outage. Sequential reads only (what ``tarfile``'s stream mode does)."""

    def __init__(self, open_file: Callable[[], Any], what: str, seconds: float = RETRY_SECONDS):
        self._open, self.what, self.seconds = open_file, what, seconds
        self.name = what
        self.position = 0
        self._backoff = _Backoff(what, seconds)
        self._file = retry_transient(open_file, what, seconds)

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                if self._file is None:
                    self._file = self._reopen()
                data = self._file.read(size)
            except Exception as e:
                if not is_transient(e):
                    raise
                self._drop()
                self._backoff.wait_or_raise(e)
                continue
            self._backoff.reset()
            self.position += len(data)
            return data

    def _reopen(self):
        f = self._open()
        if self.position:
            try:
                f.seek(self.position)
            except (OSError, ValueError, AttributeError):  # not seekable: read up to where we were
                left = self.position
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise EOFError(f"{self.what}: shorter on re-opening than the {self.position} bytes read before")
                    left -= len(chunk)
        return f

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass  # a broken connection may fail to close; the next attempt opens a new one

    def tell(self) -> int:
        return self.position

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_retrying(url: str, seconds: float = RETRY_SECONDS) -> RetryingReader:
    """A local path or fsspec URL opened for sequential binary reads that wait out transient
    storage errors (for at most ``seconds`` per outage, then StorageUnavailable)."""
    if is_url(url) and not url.startswith("file://"):
        return RetryingReader(lambda: fsspec.open(url, "rb").open(), url, seconds)
    path = url.removeprefix("file://")
    return RetryingReader(lambda: open(path, "rb", buffering=1 << 20), url, seconds)


def read_bytes(url: str) -> bytes:
    """The whole file; ``<tar>#<member>[@<offset>:<size>]`` (web-tar images, see ``tars.parse_ref``)
    reads one member: one ranged read when the reference has the member's location."""
    if "#" in url:
        from sapretrain import tars  # tars reads through this module, so it is imported here, not above

        tar_ref = tars.parse_ref(url)
        if tar_ref is not None:
            return tars.read_ref(tar_ref)
    if not is_url(url):  # plain files skip fsspec's per-call set-up (hot path: one call per image)
        with open(url, "rb") as f:
            return f.read()

    def read() -> bytes:
        with fsspec.open(url, "rb") as f:
            return f.read()

    return retry_transient(read, url)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path) if is_local(fs) else retry_transient(lambda: fs.exists(path), url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it; a failed write (a full
    disk) leaves neither the file nor its temporary copy."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise
    else:
        # Object stores publish an object only when its upload completes: a PUT is atomic (and
        # so safe to repeat after a transient failure).
        retry_transient(lambda: fs.pipe_file(path, data), url)


def remove_quietly(path: str) -> None:
    """Remove a local temporary file if it is there (clean-up after a failure)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def local_temp_for(url: str) -> str:
    """A temporary local file name from which ``commit`` can publish ``url`` atomically."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return f"{path}.tmp.{os.getpid()}"
    fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=Path(path).name + ".")
    os.close(fd)
    return tmp


def commit(tmp: str, url: str) -> None:
    """Publish the finished local file ``tmp`` as ``url`` (rename locally, upload otherwise)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        try:
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise
        return
    try:
        retry_transient(lambda: fs.put_file(tmp, path), url)
    finally:
        remove_quietly(tmp)
