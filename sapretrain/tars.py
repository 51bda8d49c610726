"""Tar I/O, once: members of a tar stream, records grouped by key, one member by reference.

    for record in tars.records(stream, url):          # {"__key__", "__url__", ext: bytes, ...}
        ...
    tars.read_ref("s3://bucket/cc3m/00012.tar#000120034.jpg@1536:48213")  # one ranged read
    tars.read_member("s3://bucket/cc3m/00012.tar", "000120034.jpg")   # via the tar's index
    # storage.read_bytes(ref) does the same for any TAR#member[@offset:size] reference

**The record-key rule** is webdataset's (``tariterators.tar_file_iterator`` + ``base_plus_ext`` +
``group_by_keys(lcase=True)``), so a tar read here and by ``wds.WebDataset`` gives the same records:

- only regular files count (directories and links are stepped over);
- a member whose name starts with a ``__NAME__`` component (``__index__``, ``__meta__/x.json``) is
  metadata, not part of a record;
- the key is the member name up to the first dot of its basename, directories included; the rest is
  the extension, lower-cased: ``d/000012.a.subj.JPG`` is key ``d/000012``, extension ``a.subj.jpg``.
  A basename without a dot (``README``) belongs to no record; as in webdataset's regex
  ``^((?:.*/|)[^.]+)[.]([^/]*)$``, ``d/.x`` falls back to key ``d/``, extension ``x``;
- a record is a run of consecutive members with one key (a key that comes back after another
  starts a new record); an extension twice in one record is a damaged tar, as in webdataset.

**Damage** is ``BadTar`` (a ``tarfile.ReadError``, with ``members``: headers read before it): a
member cut short, a header cut short or garbage where a header belongs (which ``tarfile`` alone
would take for the end), a missing end-of-archive block, a broken gzip stream, a repeated
extension. The record being read then is never yielded (it may lack members); the records before
it are. Storage outages (``storage.StorageUnavailable``) and other ``OSError`` s pass through as
they are: they are not the tar's content. Callers decide what damage costs (docs/shards.md).
"""
from __future__ import annotations

import logging
import re
import tarfile
import threading
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec

from sapretrain import storage

log = logging.getLogger(__name__)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_DAMAGE = (tarfile.TarError, EOFError, zlib.error)


class BadTar(tarfile.ReadError):
    """A truncated or corrupt tar; ``members``: the headers read before the damage."""

    def __init__(self, message: str, members: int = 0):
        super().__init__(message)
        self.members = members


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, lower-case extension)`` of a member name, or None when it belongs to no record."""
    if META_RE.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


class Member:
    """One regular file of a tar being streamed; ``read()`` only before the iteration moves on."""

    __slots__ = ("name", "size", "offset", "key", "ext", "_tar", "_info", "_url", "headers")

    def __init__(self, tar: tarfile.TarFile, info: tarfile.TarInfo, url: str, headers: int):
        self.name, self.size, self.offset = info.name, info.size, info.offset_data
        self.key, self.ext = split_key(info.name) or (None, None)
        self._tar, self._info, self._url, self.headers = tar, info, url, headers

    def read(self) -> bytes:
        try:
            data = self._tar.extractfile(self._info).read()
        except _DAMAGE as e:
            raise BadTar(f"{self._url}: member {self.name}: {type(e).__name__}: {e}", self.headers) from e
        if len(data) != self.size:
            raise BadTar(f"{self._url}: member {self.name} truncated: {len(data)} of {self.size} bytes",
                         self.headers)
        return data


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers why the archive ended: tarfile takes a cut-off or garbled header for the end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.end_reason = e
            raise


def files(fileobj, url: str = "") -> Iterator[Member]:
    """Every regular file of the tar stream ``fileobj`` (plain or compressed), in tar order.

    Stream mode: no seeking, so it reads object storage the same way as a local disk, and keeps no
    list of headers. ``url`` names the tar in errors. BadTar on damage (see the module doc)."""
    headers = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo) as tar:
            for info in tar:
                headers += 1
                tar.members = []  # stream mode: do not keep every header in memory
                if info.isreg():
                    yield Member(tar, info, url, headers)
            end = getattr(tar, "end_reason", None)
            if headers and not isinstance(end, tarfile.EOFHeaderError):
                raise BadTar(f"{url}: no end-of-archive block after {headers} members ({type(end).__name__}: "
                             f"{end}): truncated or corrupt", headers)
    except BadTar as e:
        e.members = e.members or headers
        raise
    except _DAMAGE as e:
        raise BadTar(f"{url}: {type(e).__name__}: {e} after {headers} members", headers) from e


def members(fileobj, url: str = "", stray: Callable[[str], Any] | None = None) -> Iterator[Member]:
    """The files that belong to a record (``key``/``ext`` set); ``stray(name)`` sees the others."""
    for member in files(fileobj, url):
        if member.key is not None:
            yield member
        elif stray is not None:
            stray(member.name)


def records(fileobj, url: str = "", *, skip: int = 0, read: Callable[[Member], Any] = Member.read,
            stray: Callable[[str], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Records ``{"__key__", "__url__", ext: read(member)}`` of a tar stream, by the key rule.

    ``skip``: the first records are stepped over without reading their members. ``read``: what a
    member's value is (default its bytes; None leaves it out). A record is yielded once the next
    key's header (or the end of the archive) shows it complete, so a caller that stops after the
    records it wants never reads the next record's data."""
    index, current = -1, None
    for member in members(fileobj, url, stray):
        if current is None or member.key != current["__key__"]:
            if current is not None and index >= skip:
                yield current
            index += 1
            current = {"__key__": member.key, "__url__": url}
        if index < skip:
            continue
        if member.ext in current:
            raise BadTar(f"{url}: {member.name}: a second .{member.ext} member for key {member.key!r}",
                         member.headers)
        value = read(member)
        if value is not None:
            current[member.ext] = value
    if current is not None and index >= skip:
        yield current


def list_keys(url: str) -> list[str]:
    """The record keys of the tar at ``url`` (local path or fsspec URL), in order, members unread."""
    with storage.open_retrying(url) as f:
        return [r["__key__"] for r in records(f, url, read=lambda member: None)]


# --------------------------------------------------------------------------------------------
# Members by reference: ``<tar>#<member>`` or, located, ``<tar>#<member>@<offset>:<size>``
#
# (img2dataset tars: ``s3://bucket/cc3m/00012.tar#000120034.jpg@1536:48213``). ``offset`` is the byte
# offset of the member's data in the (uncompressed) tar, ``size`` its length: what a sequential
# reader knows for free (``Member.offset``/``size``). A located reference is read with ONE ranged
# read of ``[offset - 512, offset + size)``: the member's own 512-byte header and its data, so the
# header can vouch that the offset still points at this member (a tar rewritten since the
# reference was made). A reference without a location (or one whose header does not match: a
# stale offset, counted in ``STALE_OFFSETS``) is read through the tar's index, built by one
# streaming pass over the tar (once per process for the ``_INDEXES_MAX`` latest tars).

BLOCK = tarfile.BLOCKSIZE
LOCATION_RE = re.compile(r"@(\d+):(\d+)$")  # the tail of a located member; image names end in .ext, never so
STALE_OFFSETS: Counter[str] = Counter()  # tar url -> located reads whose header did not match (then scanned)
_STALE_LOCK = threading.Lock()


@dataclass(frozen=True)
class TarRef:
    """A parsed tar-member reference; ``offset``/``size`` are None when the reference has no location."""

    tar: str
    member: str
    offset: int | None = None
    size: int | None = None

    def __str__(self) -> str:
        return make_ref(self.tar, self.member, self.offset, self.size)


def make_ref(tar_url: str, member: str, offset: int | None = None, size: int | None = None) -> str:
    """``tar#member``, with ``@offset:size`` when both are given (uncompressed tars only: the offset
    of a member of a compressed tar is in the decompressed stream, no use for a ranged read)."""
    if offset is None or size is None or not str(tar_url).lower().endswith(".tar"):
        return f"{tar_url}#{member}"
    return f"{tar_url}#{member}@{offset}:{size}"


def parse_ref(ref: str) -> TarRef | None:
    """The ``TarRef`` of ``<tar>#<member>[@<offset>:<size>]``, else None (not a tar-member reference).

    ValueError for a location that cannot be a tar member's (data starts after a header, on a
    512-byte block)."""
    tar, sep, member = str(ref).rpartition("#")
    if not (sep and member and tar.lower().endswith(TAR_SUFFIXES)):
        return None
    match = LOCATION_RE.search(member)
    if match is None:
        return TarRef(tar, member)
    offset, size = int(match.group(1)), int(match.group(2))
    if offset < BLOCK or offset % BLOCK:
        raise ValueError(f"{ref}: offset {offset} is not where a tar member's data can start "
                         f"(a multiple of {BLOCK} bytes, after a header)")
    return TarRef(tar, member[: match.start()], offset, size)


def split_ref(ref: str) -> tuple[str, str] | None:
    """``(tar url, member name)`` for a tar-member reference, location dropped; else None."""
    parsed = parse_ref(ref)
    return (parsed.tar, parsed.member) if parsed is not None else None


def read_ref(ref: str | TarRef) -> bytes:
    """The bytes of the member ``ref`` names: one ranged read when it is located, else ``read_member``."""
    parsed = ref if isinstance(ref, TarRef) else parse_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref}: not a tar-member reference (<tar>#<member>)")
    return read_member(parsed.tar, parsed.member, parsed.offset, parsed.size)


_INDEXES: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
_INDEXES_MAX = 64  # tars whose member offsets a process keeps (~100 bytes a member)
_INDEX_LOCK = threading.Lock()


def index(tar_url: str) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of an uncompressed tar, read once per process.

    One streaming pass over the headers (the whole file for a remote tar); a damaged tar gives the
    members before the damage. Cached for the ``_INDEXES_MAX`` latest tars, so a curated manifest
    (consecutive samples from the same web shard) reads each tar once."""
    with _INDEX_LOCK:
        if tar_url in _INDEXES:
            _INDEXES.move_to_end(tar_url)
            return _INDEXES[tar_url]
    found = {}
    with storage.open_retrying(tar_url) as f:
        try:
            for member in files(f, tar_url):
                found[member.name] = (member.offset, member.size)
        except BadTar:
            pass  # keep what was indexed
    with _INDEX_LOCK:
        _INDEXES[tar_url] = found
        while len(_INDEXES) > _INDEXES_MAX:
            _INDEXES.popitem(last=False)
    return found


def read_member(tar_url: str, name: str, offset: int | None = None, size: int | None = None) -> bytes:
    """One member of a tar by name. With its location (``offset``/``size``, uncompressed tars): one
    ranged read, checked against the member's header; a mismatch (stale offset) is counted in
    ``STALE_OFFSETS`` and read by name instead. Without: a ranged read via the cached ``index``
    (uncompressed tars), or a streaming scan (compressed tars: no random access).
    FileNotFoundError when absent, OSError when the tar is damaged before or in the member."""
    if not tar_url.lower().endswith(".tar"):
        with fsspec.open(tar_url, "rb") as f:
            try:
                for member in files(f, tar_url):
                    if member.name == name:
                        return member.read()
            except BadTar as e:
                raise OSError(f"{tar_url}#{name}: the tar is damaged before the member: {e}") from e
        raise FileNotFoundError(f"{name} not in {tar_url}")
    if offset is not None and size is not None:
        data = _read_range(tar_url, offset - BLOCK, offset + size, f"{tar_url}#{name}")
        problem = _header_problem(data, name, size)
        if problem is None:
            if len(data) != BLOCK + size:
                raise OSError(f"{tar_url}#{name}: {len(data) - BLOCK} of {size} bytes (truncated tar)")
            return data[BLOCK:]
        with _STALE_LOCK:
            STALE_OFFSETS[tar_url] += 1
            first = STALE_OFFSETS[tar_url] == 1
        if first:
            log.warning("%s#%s@%d:%d: %s; reading it by name (a scan of the tar) instead. Was the tar rewritten "
                        "after the references were made?", tar_url, name, offset, size, problem)
    entry = index(tar_url).get(name)
    if entry is None:
        raise FileNotFoundError(f"{name} not in {tar_url} (or the tar is truncated before it)")
    offset, size = entry
    data = _read_range(tar_url, offset, offset + size, f"{tar_url}#{name}")
    if len(data) != size:
        raise OSError(f"{tar_url}#{name}: {len(data)} of {size} bytes (truncated tar)")
    return data


def _read_range(url: str, start: int, end: int, what: str) -> bytes:
    """Bytes ``[start, end)`` of a file (fewer at its end): one seek + read, or one ranged GET."""
    if not storage.is_url(url) or url.startswith("file://"):
        with open(url.removeprefix("file://"), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, path = storage.url_to_fs(url)
    return storage.retry_transient(lambda: fs.cat_file(path, start=start, end=end), what)


def _header_problem(data: bytes, name: str, size: int) -> str | None:
    """Why ``data`` (what a located read returns: 512 bytes of header, then the data) is not the
    header of the member ``name`` of ``size`` bytes, or None when it is.

    The header's checksum, type and size must hold, and its name must be ``name``, except for a
    name too long or not ASCII for the ustar field: tarfile and GNU tar then keep the full name in
    a pax or ``././@LongLink`` header before this one and a shortened one here (cut at 100 bytes,
    ``?`` for each non-ASCII character), which is checked as a prefix."""
    try:
        info = tarfile.TarInfo.frombuf(data[:BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"no tar header before the offset ({type(e).__name__}: {e})"
    if not info.isreg() or info.size != size:
        return f"the header before the offset is {info.name!r} ({info.size} bytes), not a {size}-byte file"
    if info.name == name:
        return None
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not name.isascii():
        shown = info.name.encode("utf-8", "surrogateescape").split(b"?", 1)[0]
        if encoded.startswith(shown):
            return None
    return f"the header before the offset names {info.name!r}"
