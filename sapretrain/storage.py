"""Local paths and fsspec URLs (``s3://``, ``gs://``, ``https://``…) behind one small interface.

Credentials and endpoints come from the environment or fsspec's own config (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``, or ``FSSPEC_S3_*``), never
from our configs, so they cannot leak into a saved config, a log or a checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec


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


def read_bytes(url: str) -> bytes:
    if not is_url(url):  # plain files skip fsspec's per-call set-up (hot path: one call per image)
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        # Object stores publish an object only when its upload completes: a PUT is atomic.
        fs.pipe_file(path, data)


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
        os.replace(tmp, path)
        return
    try:
        fs.put_file(tmp, path)
    finally:
        os.unlink(tmp)
