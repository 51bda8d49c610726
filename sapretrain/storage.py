"""Local paths and fsspec URLs (``s3://``, ``gs://``, ``https://``…) behind one small interface.

Credentials and endpoints come from the environment or fsspec's own config (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``, or ``FSSPEC_S3_*``), never
from our configs, so they cannot leak into a saved config, a log or a checkpoint.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import fsspec

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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
    """The whole file; ``<tar>#<member>`` (web-tar images, see ``split_tar_ref``) reads one member."""
    tar_ref = split_tar_ref(url)
    if tar_ref is not None:
        return read_tar_member(*tar_ref)
    if not is_url(url):  # plain files skip fsspec's per-call set-up (hot path: one call per image)
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# Members of tar files (img2dataset shards: ``s3://bucket/cc3m/00012.tar#000120034.jpg``)


def split_tar_ref(ref: str) -> tuple[str, str] | None:
    """``(tar url, member)`` for a tar-member reference ``<tar>#<member>``, else None."""
    tar, sep, member = str(ref).rpartition("#")
    if sep and member and tar.lower().endswith(TAR_SUFFIXES):
        return tar, member
    return None


_TAR_INDEXES: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
_TAR_INDEXES_MAX = 64  # tars whose member offsets a process keeps (~100 bytes a member)
_TAR_LOCK = threading.Lock()


def tar_index(tar_url: str) -> dict[str, tuple[int, int]]:
    """``member -> (data offset, size)`` of an uncompressed tar, read once per process.

    One streaming pass over the headers (the whole file for a remote tar); a truncated tar
    gives the members before the damage. Cached for the ``_TAR_INDEXES_MAX`` latest tars, so
    a curated manifest (consecutive samples from the same web shard) reads each tar once.
    """
    with _TAR_LOCK:
        if tar_url in _TAR_INDEXES:
            _TAR_INDEXES.move_to_end(tar_url)
            return _TAR_INDEXES[tar_url]
    index = {}
    with fsspec.open(tar_url, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isfile():
                        index[info.name] = (info.offset_data, info.size)
        except (tarfile.ReadError, EOFError):
            pass  # truncated: keep what was indexed
    with _TAR_LOCK:
        _TAR_INDEXES[tar_url] = index
        while len(_TAR_INDEXES) > _TAR_INDEXES_MAX:
            _TAR_INDEXES.popitem(last=False)
    return index


def read_tar_member(tar_url: str, member: str) -> bytes:
    """One member of a tar: a ranged read via the cached index (uncompressed tars), or a
    streaming scan (compressed tars: no random access). FileNotFoundError when absent."""
    if not tar_url.lower().endswith(".tar"):
        with fsspec.open(tar_url, "rb", compression="infer") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if info.name == member and info.isfile():
                    return tar.extractfile(info).read()
        raise FileNotFoundError(f"{member} not in {tar_url}")
    entry = tar_index(tar_url).get(member)
    if entry is None:
        raise FileNotFoundError(f"{member} not in {tar_url} (or the tar is truncated before it)")
    offset, size = entry
    if not is_url(tar_url):
        with open(tar_url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    else:
        fs, path = url_to_fs(tar_url)
        data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise OSError(f"{tar_url}#{member}: {len(data)} of {size} bytes (truncated tar)")
    return data


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
