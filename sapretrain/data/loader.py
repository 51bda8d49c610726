"""The trainer's streaming loader: WebDataset shards → model batches, per rank, resumable.

    loader = build_loader(cfg.data, preprocess, rank, world_size, epoch=0, start_batch=0)
    for batch in loader:            # one epoch (epoch mode) or forever (resampled mode)
        ...                         # batch: collate_records' dict, batch_pairs / world_size pairs
        ckpt["data"] = loader.state_dict()      # {"epoch", "batch", "rank", "raw", "layout"}
    loader.load_state_dict(ckpt["data"])        # before iterating: continue exactly there
    loader.stats()                  # skipped records / shards by reason, so far
    loader.close()                  # optional: stop the persistent workers now (collection does it too)

The contract (the specification is docs/loader.md):

- every rank yields ``len(loader) = floor(total_records / batch_pairs)`` batches per epoch, each of
  ``batch_pairs / world_size`` pairs; record counts come from ``sizes.json``, which is required;
- epoch mode reads every record at most once per epoch (R×W contiguous slices of the shuffled
  shard order, at least one shard per reader); resampled mode draws shards with replacement;
- a checkpointed ``state_dict`` resumes with exactly the batches an uninterrupted run gives next;
- with workers, one set of DataLoader worker processes runs epoch after epoch
  (``data.persistent_workers``), giving the batches workers started per epoch would give;
- bad data (missing shard, damaged tar, short shard, bad member, side-car or image) is skipped,
  counted by reason, logged once per shard and topped up from re-reads; no progress at all raises;
- storage outages are waited out (``data.storage_retry_seconds``), then end the run with
  ``storage.StorageUnavailable``: never skipped;
- ``data.features`` streams feature shards (docs/features.md) through the same stages;
- tars are read by ``sapretrain.tars`` (webdataset's key rule); importing this module patches
  nothing (``register_fsspec_gopen`` is opt-in, for plain ``wds.WebDataset`` on ``s3://``).
"""
from __future__ import annotations

import atexit
import hashlib
import importlib
import io
import itertools
import logging
import math
import random
import signal
import tarfile
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import braceexpand
import fsspec
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sapretrain import jsonl, storage, tars
from sapretrain.config import require
from sapretrain.data.batch import collate_features, collate_records, decode_features
from sapretrain.shards import schema

log = logging.getLogger(__name__)

IMAGE_KEYS = tuple(ext for ext in schema.EXTENSIONS if ext != "json")  # a.jpg, a.subj.jpg, ...
BAD_STREAK_SHARDS = 10  # a reader gives up after this many shards' worth of undecodable records in a row
MAX_EMPTY_DRAWS = 100  # resampled mode: shard draws in a row without one valid record
FSSPEC_GOPEN_SCHEMES = ("s3", "s3a", "gcs", "az", "abfs", "abfss", "oss")


@dataclass
class LoaderConfig:
    """The ``data`` section of the training config.

    shards: a directory holding ``sizes.json`` (local or fsspec URL), a brace pattern
    ``dir/shard-{000000..000008}.tar``, or a comma list of either kind of shard name.
    """

    shards: str = "data/shards/demo"
    batch_pairs: int = 512  # anchor/positive pairs per GLOBAL batch (all ranks); divisible by world size
    workers: int = 2  # DataLoader workers per rank (0: read in the training process)
    shuffle_shards: bool = True  # epoch mode: shard order shuffled per (seed, epoch)
    shuffle_buffer: int = 1000  # records per reader's shuffle buffer (raw bytes; 0 or 1: off)
    resampled: bool = False  # infinite seeded draws of shards with replacement, instead of epochs
    seed: int = 0
    image_size: int | None = None  # squash-resize decoded images to this square (JPEG draft decode) before preprocess
    # Feature shards of `shards` (tools/cache_features.py): streamed instead of `shards`; the
    # frozen vision tower is not run (needs model.lock_image; docs/features.md). Local or fsspec URL.
    features: str | None = None
    # A shard that cannot be reached (connection refused/reset, timeout, HTTP 5xx) is retried with
    # backoff for this long per outage; then the run stops (StorageUnavailable) and resumes exactly
    # with --resume auto. Never skipped: only damaged *content* is. 0: stop at the first such error.
    storage_retry_seconds: float = 300.0
    # workers > 0: one set of DataLoader worker processes for the whole run; they go on from one
    # epoch to the next by themselves (the next epoch's first batches are prefetched). The batches
    # are the same either way; false starts new workers every epoch (docs/loader.md).
    persistent_workers: bool = True

    def __post_init__(self):
        require(bool(str(self.shards).strip() or self.features), "data.shards", self.shards,
                "must name a shard directory, a brace pattern or a comma list of shards")
        require(self.batch_pairs > 0, "data.batch_pairs", self.batch_pairs, "must be > 0 (pairs per global batch)")
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0 (0: read in the training process)")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0 (0 or 1: off)")
        require(self.image_size is None or self.image_size > 0, "data.image_size", self.image_size,
                "must be > 0, or null to keep the stored size")
        require(self.storage_retry_seconds >= 0 and math.isfinite(self.storage_retry_seconds),
                "data.storage_retry_seconds", self.storage_retry_seconds, "must be a finite number >= 0")


@dataclass(frozen=True)
class Shard:
    url: str
    records: int


@dataclass(frozen=True)
class Slice:
    """Records ``[start, stop)`` of one shard, read by reader ``worker`` of ``rank``; with ``keep``,
    only those record indices of the range (what an elastic resume found unread there)."""

    url: str
    start: int
    stop: int
    rank: int = 0
    worker: int = 0
    keep: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.keep) if self.keep is not None else self.stop - self.start


@dataclass(frozen=True)
class PassEnd:
    """Marks the end of one pass over a reader's slices (the shuffle buffer drains there)."""

    number: int


# ---------------------------------------------------------------- shard lists, opening


def list_shards(spec: str) -> list[Shard]:
    """Shards named by ``spec`` with their record counts from ``sizes.json``."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError("data.shards is empty: give a shard directory, a brace pattern or a comma list")
    if len(parts) == 1 and not _is_shard_name(parts[0]):
        directory = parts[0].rstrip("/")
        sizes = _read_sizes(directory, what=f"shard directory {directory}")
        return [Shard(storage.join(directory, name), n) for name, n in sorted(sizes.items())]
    urls = [url for part in parts for url in braceexpand.braceexpand(part)]
    sizes_by_dir: dict[str, dict[str, int]] = {}
    shards = []
    for url in urls:
        directory = _dirname(url)
        if directory not in sizes_by_dir:
            sizes_by_dir[directory] = _read_sizes(directory, what=f"shards in {directory}")
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in sizes_by_dir[directory]:
            raise ValueError(f"{url}: not listed in {directory}/sizes.json; the loader needs every shard's record count")
        shards.append(Shard(url, sizes_by_dir[directory][name]))
    return shards


def _is_shard_name(part: str) -> bool:
    return "{" in part or part.endswith(".tar") or part.endswith(".tar.gz")


def _dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."


def _read_sizes(directory: str, what: str) -> dict[str, int]:
    url = f"{directory}/sizes.json"
    if not storage.exists(url):
        raise FileNotFoundError(
            f"{what}: no {url}. The loader needs exact record counts to give every rank the same "
            "number of batches; tools/make_shards.py writes sizes.json, for other shards write "
            '{"shard-000000.tar": N, ...} next to them.'
        )
    try:
        return schema.validate_sizes(jsonl.parse_record(storage.read_bytes(url)), url)
    except jsonl.BadLine as e:
        raise ValueError(f"{url} is not a JSON object ({e.reason}: {e.detail}); it should be "
                         '{"shard-000000.tar": N, ...} as tools/make_shards.py writes it') from None
    except schema.SchemaError as e:
        raise ValueError(f"{e}; it should be {{\"shard-000000.tar\": N, ...}} as tools/make_shards.py "
                         "writes it") from None


def open_shard(url: str, retry_seconds: float = storage.RETRY_SECONDS):
    """A binary file object for a local path or any fsspec URL (credentials from the environment),
    for sequential reads; transient storage errors are waited out for ``retry_seconds``, then
    ``storage.StorageUnavailable`` (see ``storage.open_retrying``)."""
    return storage.open_retrying(url, retry_seconds)


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """``webdataset.gopen`` handler for fsspec URLs (webdataset 1.0.2 has no s3 opener)."""
    return fsspec.open(url, mode).open()


def register_fsspec_gopen(schemes: Iterable[str] = FSSPEC_GOPEN_SCHEMES) -> None:
    """Let plain ``wds.WebDataset`` open these URL schemes through fsspec; existing handlers are
    kept, so calling it again changes nothing. Opt-in: importing this module patches nothing, and
    ``build_loader`` does not need it (it opens shards itself, through ``open_shard``)."""
    table = importlib.import_module("webdataset.gopen").gopen_schemes  # the package re-exports a function of that name
    for scheme in schemes:
        table.setdefault(scheme, gopen_fsspec)



# ---------------------------------------------------------------- planning


def seeded(*parts: Any) -> random.Random:
    """A ``random.Random`` fixed by ``parts`` (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def reader_batches(batches: int, workers: int, worker: int) -> int:
    """How many of global batches ``[0, batches)`` reader ``worker`` makes (batch b: reader b % W)."""
    return max(0, (batches - worker + workers - 1) // workers)


def plan_epoch(shards: list[Shard], world_size: int, workers: int, pairs_per_rank: int, batches: int,
               epoch: int, seed: int, shuffle: bool) -> list[Slice]:
    """Cut the epoch's record stream into one contiguous run of records per (rank, reader)."""
    return cut(epoch_stream(shards, epoch, seed, shuffle), reader_quotas(world_size, workers, pairs_per_rank, batches))


def epoch_stream(shards: list[Shard], epoch: int, seed: int, shuffle: bool) -> list[Slice]:
    """The epoch's records in order: whole shards, shuffled with ``(seed, epoch)`` when ``shuffle``."""
    order = list(shards)
    if shuffle:
        seeded(seed, epoch, "shards").shuffle(order)
    return [Slice(s.url, 0, s.records) for s in order if s.records > 0]


def reader_quotas(world_size: int, workers: int, pairs_per_rank: int, batches: int,
                  start: int = 0) -> list[tuple[int, int, int]]:
    """``(rank, reader, records)`` in plan order: what each reader owes for batches ``[start, batches)``."""
    return [(rank, w, (reader_batches(batches, workers, w) - reader_batches(start, workers, w)) * pairs_per_rank)
            for rank in range(world_size) for w in range(workers)]


def take(sl: Slice, n: int) -> tuple[Slice, Slice | None]:
    """The first ``n`` records of ``sl`` and the rest (None when nothing is left)."""
    if n >= sl.size:
        return sl, None
    if sl.keep is None:
        return replace(sl, stop=sl.start + n), replace(sl, start=sl.start + n)
    head, tail = sl.keep[:n], sl.keep[n:]
    return replace(sl, stop=head[-1] + 1, keep=head), replace(sl, start=tail[0], keep=tail)


def cut(stream: Iterable[Slice], quotas: list[tuple[int, int, int]]) -> list[Slice]:
    """Consecutive runs of ``stream`` for the readers of ``quotas``, in order (a slice may be split
    between two readers). A stream that runs short leaves the last readers short."""
    stream = iter(stream)
    current: Slice | None = None
    out = []
    for rank, worker, need in quotas:
        while need > 0:
            if current is None:
                current = next(stream, None)
                if current is None:
                    return out
            head, current = take(current, need)
            out.append(replace(head, rank=rank, worker=worker))
            need -= head.size
    return out


def unread(slices: list[Slice], raw: int, bufsize: int, rng: random.Random) -> list[Slice]:
    """What a reader of ``slices`` had not yet taken from its shuffle buffer after ``raw`` records,
    in its read order (as slices): the buffer's content and everything after it.

    Replays ``shuffle_records`` itself on record positions: its draws depend only on how many
    records entered the buffer, so no shard is read. Exact when every record of the part read
    reached the buffer (records dropped before it, as missing or damaged, shift the replay).
    """
    total = sum(sl.size for sl in slices)
    if raw >= total:
        return []
    pending: set[int] = set()  # positions that entered the buffer (or are entering) and did not leave
    entered = 0

    def positions():
        nonlocal entered
        for j in range(total):
            pending.add(j)
            entered = j + 1
            yield j
        yield PassEnd(0)

    for j in itertools.islice(shuffle_records(positions(), bufsize, rng), raw):
        pending.discard(j)
    left = sorted(pending)
    out, base, i = [], 0, 0
    for sl in slices:
        lo, hi = base, base + sl.size
        base = hi
        record = (lambda o: sl.keep[o]) if sl.keep is not None else (lambda o: sl.start + o)
        buffered = []
        while i < len(left) and left[i] < hi:
            buffered.append(record(left[i] - lo))
            i += 1
        if buffered:
            out.append(replace(sl, start=buffered[0], stop=buffered[-1] + 1, keep=tuple(buffered)))
        if max(lo, entered) < hi:
            _, rest = take(sl, max(lo, entered) - lo) if entered > lo else (None, sl)
            out.append(rest)
    return out


def plan_resumed(shards: list[Shard], epoch: int, seed: int, shuffle: bool, bufsize: int, batch_pairs: int,
                 batches: int, segments: list[dict], world_size: int, workers: int, start: int) -> list[Slice]:
    """The plan for batches ``[start, batches)`` of an epoch begun under other layouts (elastic resume).

    ``segments``: the layouts the epoch ran under so far, oldest first, each ``{"world_size",
    "readers", "start", "raw"}`` with ``raw[rank][reader]`` its readers' positions when it ended.
    Each segment's plan is replayed and what its readers left unread (``unread``) is, in plan
    order, the stream the next one cuts; the last stream is cut for this layout's readers.
    """
    stream = epoch_stream(shards, epoch, seed, shuffle)
    for seg in segments:
        world, readers = int(seg["world_size"]), int(seg["readers"])
        plan = cut(stream, reader_quotas(world, readers, batch_pairs // world, batches, int(seg["start"])))
        stream = [rest for rank in range(world) for w in range(readers)
                  for rest in unread([sl for sl in plan if sl.rank == rank and sl.worker == w],
                                     int(seg["raw"][rank][w]), bufsize, seeded(seed, epoch, rank, w, "buffer"))]
    have, need = sum(sl.size for sl in stream), (batches - start) * batch_pairs
    if have < need and stream:
        # Only after records were lost to bad data in the part already read: top up from the start
        # of what is left (those records are then read twice this epoch).
        log.warning("epoch %d: %d records left unread for %d needed by the %d remaining batches (records were "
                    "lost to bad data before the resume); %d are read twice", epoch, have, need, batches - start,
                    need - have)
        stream = itertools.cycle(stream)
    return cut(stream, reader_quotas(world_size, workers, batch_pairs // world_size, batches, start))


# ---------------------------------------------------------------- pipeline stages


@dataclass
class Counters:
    """What one reader skipped so far; sent along with every batch it makes."""

    rank: int = 0
    worker: int = 0
    raw: int = 0  # records taken from the shuffle buffer (resume position), skipped ones included
    records_ok: int = 0  # records read whose members and side-car are valid
    progress: int = 0  # records skipped (resume) or decoded: what a pass must advance
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    missing_records: int = 0  # records sizes.json promised that a shard did not deliver
    reread_records: int = 0  # records delivered twice this epoch to top up a quota
    bad_shards: dict = field(default_factory=dict)  # url -> first reason
    rereading: bool = False  # in a top-up pass: its problems were counted in the first pass

    def problem(self, url: str, reason: str, detail: str, records: int = 1) -> None:
        if self.rereading:
            return
        if reason in ("unreadable_shard", "truncated_shard", "short_shard"):
            self.missing_records += records
        else:
            self.dropped[reason] += records
        if url not in self.bad_shards:
            self.bad_shards[url] = reason
            log.warning("rank %d reader %d: %s: %s (%s); skipped and counted, further problems in this "
                        "shard are counted without a message", self.rank, self.worker, url, reason, detail)

    def snapshot(self) -> dict[str, Any]:
        return {
            "dropped": dict(self.dropped),
            "missing_records": self.missing_records,
            "reread_records": self.reread_records,
            "bad_shards": dict(self.bad_shards),
        }


def epoch_source(slices: list[Slice], counters: Counters) -> Iterator[Slice | PassEnd]:
    """The reader's slices, then again (lazily: only if the quota is not met) after a PassEnd.

    The next pass starts only after every record of this one went through the shuffle, the resume
    skip and the decoder, so a pass that advanced nothing means nothing ever will.
    """
    for number in itertools.count():
        before = counters.progress
        if number > 0:
            counters.rereading = True
            log.warning("rank %d reader %d: records were lost to bad data; reading its %d shard slice(s) "
                        "again (pass %d) so that every rank still gets the same number of batches",
                        counters.rank, counters.worker, len(slices), number + 1)
        yield from slices
        yield PassEnd(number)
        if counters.progress == before:
            raise RuntimeError(f"rank {counters.rank} reader {counters.worker}: none of its shards "
                               f"{sorted({s.url for s in slices})} yields a usable record; problems: {counters.bad_shards}")


def resampled_source(shards: list[Shard], rng: random.Random, counters: Counters) -> Iterator[Slice]:
    """Shards drawn with replacement, weighted by record count, forever."""
    urls = [s.url for s in shards if s.records > 0]
    weights = [s.records for s in shards if s.records > 0]
    empty = 0
    while True:
        before = counters.records_ok
        index = rng.choices(range(len(urls)), weights=weights)[0]
        yield Slice(urls[index], 0, weights[index], counters.rank, counters.worker)
        empty = empty + 1 if counters.records_ok == before else 0
        if empty >= MAX_EMPTY_DRAWS:
            raise RuntimeError(f"rank {counters.rank} reader {counters.worker}: {empty} shard draws in a row "
                               f"gave no valid record; bad shards so far: {counters.bad_shards}")


def read_records(src: Iterable, counters: Counters, opener: Callable = open_shard) -> Iterator[dict | PassEnd]:
    """Slices → raw records ``{"__key__", "__url__", ext: bytes}`` (tar members grouped by key).

    ``opener(url)`` waits out transient storage errors itself and raises StorageUnavailable when
    the storage stays away: that ends the run (it is never counted as a bad shard)."""
    for item in src:
        if isinstance(item, PassEnd):
            yield item
            continue
        for record in _read_slice(item, counters, opener):
            if counters.rereading:
                record["__reread__"] = True
            yield record


def _read_slice(sl: Slice, counters: Counters, opener: Callable) -> Iterator[dict]:
    expected, got = sl.size, 0
    wanted = set(sl.keep) if sl.keep is not None else None
    try:
        stream = opener(sl.url)
    except storage.StorageUnavailable:
        raise  # an outage is not bad data: stop, and resume exactly once it is over
    except Exception as e:  # missing object, no permission
        counters.problem(sl.url, "unreadable_shard", f"{type(e).__name__}: {e}", expected)
        return
    try:
        with stream:
            # Records before the slice are stepped over unread; the one after it is never read.
            for index, record in enumerate(tars.records(stream, sl.url, skip=sl.start), sl.start):
                if wanted is not None and index not in wanted:
                    continue  # read before the resume; stepped over (its bytes are read)
                got += 1
                yield record
                if got == expected:
                    return
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # The record being read when the tar broke is dropped: it may lack members.
        counters.problem(sl.url, "truncated_shard", f"{type(e).__name__}: {e}, after {got} of the "
                         f"{expected} records wanted from it", expected - got)
        return
    if got < expected:
        counters.problem(sl.url, "short_shard", f"ended after {got} of the {expected} records wanted "
                         "from it (sizes.json counts more)", expected - got)


def check_records(src: Iterable, counters: Counters, context_length: int,
                  extensions: tuple[str, ...] = schema.EXTENSIONS,
                  vocab_size: int | None = None) -> Iterator[dict | PassEnd]:
    """Drop records with missing members or an invalid side-car (parsed here, before the shuffle):
    ``bad_json`` (does not parse), ``bad_sidecar`` (fails ``schema.validate_record``; token ids
    are checked against ``vocab_size`` when given, else against the tokenizer the header names)."""
    vouched: set[str] = set()  # shards of which this reader has seen a valid record
    for record in src:
        if isinstance(record, PassEnd):
            yield record
            continue
        missing = [ext for ext in extensions if ext not in record]
        if missing:
            counters.problem(record["__url__"], "incomplete_record", f"{record['__key__']} lacks {missing}")
            continue
        try:
            meta = jsonl.parse_record(record["json"])
        except jsonl.BadLine as e:  # not JSON, not UTF-8, absurd nesting or numbers: one record's loss
            counters.problem(record["__url__"], "bad_json", f"{record['__key__']}: {e}")
            continue
        try:
            _check_compatible(meta, record, context_length)
        except ValueError as e:
            # A shard written for another reader shows it in its first record: stop. After a valid
            # record of the same shard the mismatch is one damaged side-car (a flipped bit in
            # "schema" or "context_length"), skipped like any other.
            if record["__url__"] not in vouched:
                raise
            counters.problem(record["__url__"], "bad_sidecar", f"{record['__key__']}: {e}")
            continue
        try:
            # Token ids within the vocabulary, shapes, spans inside the tokens ...: what the model
            # would otherwise index with (an id past the embedding is a device-side assert on GPU).
            schema.validate_record(record["__key__"], meta, vocab_size)
        except schema.SchemaError as e:
            counters.problem(record["__url__"], "bad_sidecar", f"{record['__key__']}: {e}")
            continue
        record["json"] = meta
        counters.records_ok += 1
        vouched.add(record["__url__"])
        yield record


def _check_compatible(meta: dict, record: dict, context_length: int) -> None:
    """Data written for another reader is a configuration error, not a bad record."""
    where = f"{record['__url__']} ({record['__key__']})"
    version = meta.get("schema")
    if isinstance(version, int) and version != schema.SCHEMA_VERSION:
        raise ValueError(f"{where}: shard schema {version}, this loader reads schema {schema.SCHEMA_VERSION}; "
                         "rewrite the shards with tools/make_shards.py or use a matching sapretrain version")
    length = meta.get("context_length")
    if isinstance(length, int) and length > context_length:
        raise ValueError(f"{where}: captions were tokenized with context length {length}, the model's is "
                         f"{context_length}; rewrite the shards with context_length={context_length}")


def shuffle_records(src: Iterable, bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Seeded shuffle buffer over raw records; drains at the end of each pass."""
    buf: list = []
    for item in src:
        if isinstance(item, PassEnd):
            rng.shuffle(buf)
            yield from buf
            buf = []
        elif len(buf) < max(1, bufsize):
            buf.append(item)
        else:
            i = rng.randrange(len(buf))
            yield buf[i]
            buf[i] = item
    rng.shuffle(buf)
    yield from buf


def skip_records(src: Iterable, count: int, counters: Counters) -> Iterator[dict]:
    """Resume: drop the first ``count`` records leaving the shuffle buffer, undecoded."""
    src = iter(src)
    for _ in itertools.islice(src, count):
        counters.progress += 1
    yield from src


def decode_records(src: Iterable, counters: Counters, image_size: int | None, max_streak: int,
                   features: bool = False) -> Iterator[dict]:
    """Raw records → records with PIL images (feature shards: float16 arrays); undecodable ones
    are dropped and counted."""
    streak = 0
    reason = "bad_features" if features else "bad_image"
    for record in src:
        counters.raw += 1
        try:
            out = dict(record)
            if features:
                out[schema.FEATURE_EXT] = decode_features(record[schema.FEATURE_EXT])
            for ext in () if features else IMAGE_KEYS:
                out[ext] = decode_image(record[ext], image_size)
        except Exception as e:  # truncated or corrupt JPEG, decompression bomb, bad array ...
            counters.problem(record["__url__"], reason, f"{record['__key__']}: {type(e).__name__}: {e}")
            streak += 1
            if streak >= max_streak:
                raise RuntimeError(f"rank {counters.rank} reader {counters.worker}: {streak} records in a row "
                                   f"failed to decode; bad shards: {counters.bad_shards}") from e
            continue
        streak = 0
        counters.progress += 1
        counters.reread_records += out.pop("__reread__", False)  # decoded ones are all delivered
        yield out


def decode_image(data: bytes, size: int | None = None) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if size:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale that keeps >= size
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size and image.size != (size, size):
        # Squash, never crop: boxes are normalised to the whole frame.
        image = image.resize((size, size), Image.BICUBIC)
    return image


def collate_batches(src: Iterable, pairs: int, preprocess: Callable, context_length: int,
                    counters: Counters, worker: int, epoch: int = 0,
                    collate: Callable = collate_records) -> Iterator[tuple[dict, dict]]:
    """Groups of ``pairs`` records → (model batch, this reader's epoch, position and counters)."""
    src = iter(src)
    while True:
        records = list(itertools.islice(src, pairs))
        if not records:
            return
        if len(records) < pairs:
            raise RuntimeError(f"reader {worker}: partial batch of {len(records)} records (quota bug)")
        batch = collate(records, preprocess, context_length)
        yield batch, {"worker": worker, "epoch": epoch, "raw": counters.raw, "counts": counters.snapshot()}


# ---------------------------------------------------------------- one rank's readers


class _RankStream(IterableDataset):
    """One rank's readers from batch ``start_batch`` of ``epoch``: the rest of that epoch and, when
    ``persistent``, every later epoch after it, for ever (one DataLoader then serves the whole run).
    Each DataLoader worker runs one reader's pipeline per epoch."""

    def __init__(self, loader: "Loader", epoch: int, start_batch: int, raw: list[int],
                 plan: dict[int, list[Slice]], persistent: bool = False):
        super().__init__()
        self.cfg, self.shards = loader.cfg, loader.shards
        self.rank, self.world_size, self.readers = loader.rank, loader.world_size, loader.readers
        self.pairs, self.batches = loader.pairs_per_rank, loader.batches_per_epoch
        self.preprocess, self.context_length = loader.preprocess, loader.context_length
        self.vocab_size = loader.vocab_size
        self.epoch, self.start_batch, self.raw, self.plan = epoch, start_batch, raw, plan
        self.persistent = persistent

    def __iter__(self):
        info = get_worker_info()
        slot = info.id if info else 0
        return self._epochs(slot) if self.persistent else iter(self._first_epoch(slot))

    def _first_epoch(self, slot: int) -> wds.DataPipeline:
        # Rotate so the first batch of this run (global batch k) comes from reader k % W.
        worker = (slot + self.start_batch) % self.readers
        return self.pipeline(self.epoch, self.start_batch, self.raw[worker], self.plan.get(worker, []), worker)

    def _epochs(self, slot: int) -> Iterator[tuple[dict, dict]]:
        """DataLoader worker ``slot``'s batches of the first epoch, then of every later epoch. No
        worker ever runs out, so the DataLoader takes batches from its workers in strict turn: run
        batch j comes from slot j % W. Epoch ``epoch + n`` (n >= 1) begins at run batch
        ``B - k + (n - 1) B``, and its batch b comes from reader b % W, so this slot plays reader
        ``(slot + k - n B) % W`` then (k: ``start_batch``, B: batches per epoch). Later epochs start
        at their batch 0 with nothing consumed and the seeded plan of an uninterrupted run. (No
        pipeline is held once done: a finished epoch's open shard and shuffle buffer are freed.)"""
        yield from self._first_epoch(slot)
        for n in itertools.count(1):
            epoch, worker = self.epoch + n, (slot + self.start_batch - n * self.batches) % self.readers
            mine = [] if self.cfg.resampled else _reader_plan(
                self.cfg, self.shards, self.world_size, self.readers, self.batches, self.rank, epoch)[worker]
            yield from self.pipeline(epoch, 0, 0, mine, worker)

    def pipeline(self, epoch: int, start_batch: int, done: int, mine: list[Slice], worker: int) -> wds.DataPipeline:
        """Reader ``worker``'s batches of ``epoch`` from ``start_batch``, over its slices ``mine``
        (epoch mode), ``done`` raw records of them already consumed (resume)."""
        cfg = self.cfg
        counters = Counters(rank=self.rank, worker=worker, raw=done)
        # Good records this reader still owes: its batches of the epoch minus those already made.
        left = reader_batches(self.batches, self.readers, worker) - reader_batches(start_batch, self.readers, worker)
        key = (cfg.seed, epoch, self.rank, worker)
        if cfg.resampled:
            source = lambda: resampled_source(self.shards, seeded(*key, "shards"), counters)  # noqa: E731
        else:
            source = lambda: epoch_source(mine, counters)  # noqa: E731
        max_streak = BAD_STREAK_SHARDS * max(s.records for s in self.shards)
        features = bool(cfg.features)
        extensions = schema.FEATURE_EXTENSIONS if features else schema.EXTENSIONS
        collate = collate_features if features else collate_records
        return wds.DataPipeline(
            source,
            lambda src: read_records(src, counters, lambda url: open_shard(url, cfg.storage_retry_seconds)),
            lambda src: check_records(src, counters, self.context_length, extensions, self.vocab_size),
            lambda src: shuffle_records(src, cfg.shuffle_buffer, seeded(*key, "buffer")),
            lambda src: skip_records(src, done, counters),  # resume: raw records already consumed
            lambda src: decode_records(src, counters, cfg.image_size, max_streak, features),
            lambda src: itertools.islice(src, left * self.pairs),  # the quota: equal batches on every rank
            lambda src: collate_batches(src, self.pairs, self.preprocess, self.context_length, counters, worker,
                                        epoch, collate),
        )


def _reader_plan(cfg: LoaderConfig, shards: list[Shard], world_size: int, readers: int, batches: int,
                 rank: int, epoch: int) -> dict[int, list[Slice]]:
    """Rank ``rank``'s slices per reader for ``epoch`` of an uninterrupted run (epoch mode)."""
    plan = plan_epoch(shards, world_size, readers, cfg.batch_pairs // world_size, batches, epoch, cfg.seed,
                      cfg.shuffle_shards)
    return _by_reader(plan, rank, readers)


def _by_reader(plan: list[Slice], rank: int, readers: int) -> dict[int, list[Slice]]:
    """``rank``'s slices of an epoch's plan, per reader."""
    return {w: [sl for sl in plan if sl.rank == rank and sl.worker == w] for w in range(readers)}


# ---------------------------------------------------------------- the trainer's object


class Loader:
    """One rank's batches, epoch by epoch; see docs/loader.md. Build with :func:`build_loader`."""

    def __init__(self, cfg: LoaderConfig, preprocess: Callable, rank: int, world_size: int,
                 shards: list[Shard], context_length: int = 77, vocab_size: int | None = None):
        self.cfg, self.preprocess, self.context_length = cfg, preprocess, context_length
        self.vocab_size = vocab_size
        self.rank, self.world_size, self.shards = rank, world_size, shards
        self.readers = max(1, cfg.workers)
        self.pairs_per_rank = cfg.batch_pairs // world_size
        self.total_records = sum(s.records for s in shards)
        self.batches_per_epoch = self.total_records // cfg.batch_pairs
        self.layout = (f"shards={len(shards)}:{self.total_records} world={world_size} workers={self.readers} "
                       f"batch_pairs={cfg.batch_pairs} seed={cfg.seed} buffer={cfg.shuffle_buffer} "
                       f"shuffle_shards={cfg.shuffle_shards} resampled={cfg.resampled}"
                       + (" features" if cfg.features else ""))
        self.order = _order(self.layout)  # the layout without world size and workers: the epoch's record order
        # The epoch's plan segment: begun at batch `_start` after the layouts of `_segments` (elastic resumes).
        self._start, self._segments = 0, []
        self._epoch, self._batch, self._raw = 0, 0, self._raw_at(0)
        self._totals: dict[str, Any] = _empty_stats()
        self._live: dict[int, dict] = {}  # reader -> its latest counters in the running iteration
        self._delivered = 0
        # The persistent workers' batches (data.persistent_workers): a DataLoader iterator that is
        # never exhausted, positioned at (_epoch, _batch); None until the first iteration, after
        # close() and after the position was changed from outside.
        self._stream: Iterator | None = None

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch, "rank": self.rank, "raw": list(self._raw),
                "layout": self.layout, "world_size": self.world_size, "readers": self.readers,
                "start": self._start, "segments": [dict(seg) for seg in self._segments]}

    def needs_every_rank(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` is an epoch-mode position of the same record order under another world
        size or worker count: resuming it exactly (elastic) needs every rank's state of it."""
        return (not self.cfg.resampled and _order(state.get("layout", "")) == self.order
                and _geometry(state) != (self.world_size, self.readers))

    def load_state_dict(self, state: dict[str, Any], every_rank: list[dict[str, Any]] | None = None) -> None:
        """Continue from ``state`` at the next iteration (``raw`` is used only from this rank's state).

        Under another world size or worker count (``needs_every_rank``) pass ``every_rank``, the
        states of all ranks that wrote it (index = rank): the records they had not consumed are
        re-planned over this layout's ranks and readers (docs/loader.md, "Elastic resume")."""
        if self.needs_every_rank(state):
            if every_rank is None:
                raise ValueError(f"data position written by {_geometry(state)[0]} rank(s) x {_geometry(state)[1]} "
                                 f"reader(s), this loader has {self.world_size} x {self.readers}: pass every "
                                 "rank's state (every_rank=[...]) to resume it")
            self._resume_elastic(state, every_rank)
            return
        if state.get("layout", self.layout) != self.layout:
            log.warning("resuming data position %s written with layout [%s] under layout [%s]: the order "
                        "will differ from an uninterrupted run", state, state["layout"], self.layout)
            self._seek(int(state["epoch"]), int(state["batch"]))
            return
        raw = state.get("raw") if state.get("rank") == self.rank else None
        self._seek(int(state["epoch"]), int(state["batch"]), raw, int(state.get("start", 0)),
                   list(state.get("segments", [])))

    def _resume_elastic(self, state: dict[str, Any], every_rank: list[dict[str, Any]]) -> None:
        world, readers = _geometry(state)
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if len(every_rank) != world or any(
                (int(s.get("rank", r)), int(s["epoch"]), int(s["batch"]), len(s["raw"])) != (r, epoch, batch, readers)
                or _order(s.get("layout", "")) != self.order for r, s in enumerate(every_rank)):
            raise ValueError(f"every_rank must hold the {world} ranks' states of one checkpoint, in rank order "
                             f"(epoch {epoch}, batch {batch}, {readers} reader(s) each)")
        if batch >= self.batches_per_epoch:
            self._seek(epoch + 1, 0)
            return
        ended = {"world_size": world, "readers": readers, "start": int(state.get("start", 0)),
                 "raw": [[int(n) for n in s["raw"]] for s in every_rank]}
        self._seek(epoch, batch, None, batch, [dict(seg) for seg in state.get("segments", [])] + [ended])
        log.info("data: epoch %d resumed at batch %d under %d rank(s) x %d reader(s) from a position of %d x %d: "
                 "the records not yet consumed are re-planned", epoch, batch, self.world_size, self.readers,
                 world, readers)

    def _seek(self, epoch: int, batch: int, raw: list[int] | None = None, start: int = 0,
              segments: list[dict] | None = None) -> None:
        """Put the next iteration at batch ``batch`` of ``epoch`` (persistent workers are shut down)."""
        self.close()
        self._move(epoch, batch, raw, start, segments)

    def _move(self, epoch: int, batch: int, raw: list[int] | None = None, start: int = 0,
              segments: list[dict] | None = None) -> None:
        if batch < 0 or epoch < 0:
            raise ValueError(f"data position epoch={epoch} batch={batch} must not be negative")
        if batch >= self.batches_per_epoch:
            epoch, batch, raw, start, segments = epoch + 1, 0, None, 0, None
        self._epoch, self._batch = epoch, batch
        self._start, self._segments = start, list(segments or [])
        self._raw = list(raw) if raw is not None and len(raw) == self.readers else self._raw_at(batch)

    def _raw_at(self, batch: int) -> list[int]:
        """Raw records each reader consumed, in the current plan segment, up to ``batch`` batches of intact data."""
        return [(reader_batches(batch, self.readers, w) - reader_batches(self._start, self.readers, w))
                * self.pairs_per_rank for w in range(self.readers)]

    def _rank_plan(self, epoch: int) -> dict[int, list[Slice]]:
        """This rank's slices per reader for the epoch (epoch mode)."""
        if self.cfg.resampled:
            return {}
        cfg = self.cfg
        if not self._segments:
            return _reader_plan(cfg, self.shards, self.world_size, self.readers, self.batches_per_epoch, self.rank,
                                epoch)
        plan = plan_resumed(self.shards, epoch, cfg.seed, cfg.shuffle_shards, cfg.shuffle_buffer, cfg.batch_pairs,
                            self.batches_per_epoch, self._segments, self.world_size, self.readers, self._start)
        return _by_reader(plan, self.rank, self.readers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.cfg.persistent_workers and self.cfg.workers > 0:
            yield from self._persistent_batches()
            return
        while True:
            yield from self._rest_of_epoch()
            if not self.cfg.resampled:
                return

    def _rest_of_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the epoch from a DataLoader of its own (workers started for it)."""
        if self._batch >= self.batches_per_epoch:
            self._move(self._epoch + 1, 0)
        epoch = self._epoch
        dataset = _RankStream(self, epoch, self._batch, list(self._raw), self._rank_plan(epoch))
        try:
            for batch, info in _clean_storage_errors(self._data_loader(dataset)):
                self._delivered_one(info)
                yield batch
        finally:
            self._fold_live(epoch)
        self._move(epoch + 1, 0)

    def _persistent_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the epoch (resampled mode: for ever) from the persistent workers, started
        here at the current position if none are running. Leaving the iteration early keeps them
        and the batches they prefetched: the next iteration goes on from the same position."""
        if self._batch >= self.batches_per_epoch:  # the last iteration was left after the epoch's last batch
            self._fold_live(self._epoch)
            self._move(self._epoch + 1, 0)
        if self._stream is None:
            dataset = _RankStream(self, self._epoch, self._batch, list(self._raw), self._rank_plan(self._epoch),
                                  persistent=True)
            self._stream = iter(self._data_loader(dataset, persistent=True))
            _RUNNING.add(self)
        stream = self._stream
        while True:
            epoch = self._epoch
            while self._batch < self.batches_per_epoch:
                batch, info = self._next_persistent(stream)
                if info["epoch"] != epoch:
                    self.close()
                    raise RuntimeError(f"rank {self.rank}: reader {info['worker']} sent a batch of epoch "
                                       f"{info['epoch']} for batch {self._batch} of epoch {epoch} (loader bug)")
                self._delivered_one(info)
                yield batch
                if self._stream is not stream:
                    return  # the position was changed (load_state_dict, close) while this iteration waited
            self._fold_live(epoch)
            self._move(epoch + 1, 0)
            if not self.cfg.resampled:
                return

    def _next_persistent(self, stream: Iterator) -> tuple[dict, dict]:
        """The next (batch, info) of the persistent workers; on any error they are shut down (the
        position is still the one before the batch, so the next iteration restarts exactly)."""
        try:
            return next(stream)
        except BaseException as e:
            self.close()
            if isinstance(e, storage.StorageUnavailable):
                raise storage.StorageUnavailable.from_worker(e) from None
            if isinstance(e, StopIteration):
                raise RuntimeError(f"rank {self.rank}: the persistent workers' stream ended (loader bug)") from None
            raise

    def _delivered_one(self, info: dict) -> None:
        self._raw[info["worker"]] = info["raw"]
        self._live[info["worker"]] = info["counts"]
        self._batch += 1  # before handing it out: a checkpoint taken after it resumes after it
        self._delivered += 1

    def _data_loader(self, dataset: _RankStream, persistent: bool = False) -> DataLoader:
        # persistent: the stream never ends, so torch's flag changes one thing only: with pinned
        # memory, torch stops the workers at interpreter exit (before the pin thread reads from dead
        # workers); _close_at_exit does it in every case.
        return DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers, persistent_workers=persistent,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_signals)

    def close(self) -> None:
        """Shut the persistent workers down now (idempotent; garbage collection does it too). The
        position stays: a later iteration starts new workers there."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        _RUNNING.discard(self)
        self._fold_live(self._epoch)
        _shut_down(stream)  # now, not when the iterator is collected: a suspended iteration may hold it

    def __del__(self):
        stream = getattr(self, "_stream", None)
        if stream is not None:
            _shut_down(stream)

    def _fold_live(self, epoch: int) -> None:
        if not self._live:
            return
        folded = _empty_stats()
        for counts in self._live.values():
            _add_stats(folded, counts)
        self._live = {}
        _add_stats(self._totals, folded)
        lost = sum(folded["dropped"].values()) + folded["missing_records"]
        if lost:
            log.warning("rank %d epoch %d: %d records skipped (%s), %d missing from %d shard(s), %d re-read "
                        "to keep batches equal", self.rank, epoch, sum(folded["dropped"].values()),
                        folded["dropped"], folded["missing_records"], len(folded["bad_shards"]),
                        folded["reread_records"])

    def stats(self) -> dict[str, Any]:
        """Counts so far on this rank: batches and records yielded, and what bad data cost."""
        out = _empty_stats()
        _add_stats(out, self._totals)
        for counts in self._live.values():
            _add_stats(out, counts)
        out["batches"] = self._delivered
        out["records"] = self._delivered * self.pairs_per_rank
        return out


def _order(layout: str) -> str:
    """A layout without its world size and workers: what fixes the epoch's record order."""
    return " ".join(part for part in layout.split() if not part.startswith(("world=", "workers=")))


def _geometry(state: dict[str, Any]) -> tuple[int, int]:
    """(world size, readers per rank) of a state (states written before they were stored: from the layout)."""
    if "world_size" in state:
        return int(state["world_size"]), int(state["readers"])
    fields = dict(part.split("=", 1) for part in state.get("layout", "").split() if "=" in part)
    return int(fields.get("world", 0)), int(fields.get("workers", 0))


def _worker_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1, the trainer's stop signal that SLURM delivers to every
    process of a job step (a worker killed by it would fail the main process while it writes its
    preemption checkpoint). SIGTERM keeps its default action even when a forked worker inherited
    the trainer's handler: it is how a worker is ended (DataLoader shutdown, multiprocessing at exit)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_RUNNING: "weakref.WeakSet[Loader]" = weakref.WeakSet()  # loaders whose persistent workers run


@atexit.register  # after torch's and multiprocessing's own: so it runs before them
def _close_at_exit() -> None:
    """Stop the persistent workers of loaders still alive at interpreter exit (a loader held by a
    traceback, a global): torch stops them only with pin_memory, and multiprocessing's exit handler
    would terminate them, which torch's SIGCHLD check reports as a failure, and leave some unjoined."""
    for loader in list(_RUNNING):
        loader.close()


def _shut_down(stream: Iterator) -> None:
    """Stop a DataLoader iterator's workers and wait for them.

    torch's SIGCHLD check may report one of them as having "exited unexpectedly" while it is being
    stopped: workers forked from a ``ThreadPoolExecutor`` thread end with status 1 (CPython's exit
    handler in the child joins that pool thread, which is the child's own). It is being discarded,
    so that is logged, not raised; a worker that died earlier already failed its iteration."""
    try:
        stream._shutdown_workers()
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        log.debug("data: while stopping the loader's workers: %s", e)


def _clean_storage_errors(batches: Iterable) -> Iterator:
    """The batches; a StorageUnavailable from a DataLoader worker re-raised with its own message
    (the worker's copy carries the whole worker traceback as its text)."""
    try:
        yield from batches
    except storage.StorageUnavailable as e:
        raise storage.StorageUnavailable.from_worker(e) from None


def _empty_stats() -> dict[str, Any]:
    return {"dropped": {}, "missing_records": 0, "reread_records": 0, "bad_shards": {}}


def _add_stats(into: dict, counts: dict) -> None:
    for reason, n in counts["dropped"].items():
        into["dropped"][reason] = into["dropped"].get(reason, 0) + n
    into["missing_records"] += counts["missing_records"]
    into["reread_records"] += counts["reread_records"]
    for url, reason in counts["bad_shards"].items():
        into["bad_shards"].setdefault(url, reason)


def build_loader(cfg: LoaderConfig, preprocess: Callable, rank: int, world_size: int, epoch: int = 0,
                 start_batch: int = 0, context_length: int = 77, vocab_size: int | None = None) -> Loader:
    """This rank's loader, positioned at batch ``start_batch`` of ``epoch``. Checks the layout first.

    ``vocab_size``: the text tower's embedding rows; records with a token id at or past it are
    skipped (``bad_sidecar``). Without it ids are checked against the tokenizer the shards name."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    if cfg.batch_pairs < 1 or cfg.batch_pairs % world_size:
        raise ValueError(
            f"data.batch_pairs={cfg.batch_pairs} must be a positive multiple of the world size {world_size} "
            f"(it is the global batch; each rank takes batch_pairs / world_size pairs): use e.g. "
            f"data.batch_pairs={max(1, round(cfg.batch_pairs / world_size)) * world_size}"
        )
    if cfg.workers < 0:
        raise ValueError(f"data.workers={cfg.workers} must be >= 0")
    spec = cfg.features or cfg.shards  # feature shards stand in for the pixel shards
    shards = list_shards(spec)
    total = sum(s.records for s in shards)
    if total < cfg.batch_pairs:
        raise ValueError(f"{spec}: {total} records, fewer than one global batch of "
                         f"data.batch_pairs={cfg.batch_pairs}")
    readers = world_size * max(1, cfg.workers)
    nonempty = sum(1 for s in shards if s.records > 0)
    if not cfg.resampled and nonempty < readers:
        raise ValueError(
            f"{spec}: {nonempty} shards for {world_size} rank(s) x {max(1, cfg.workers)} worker(s) = "
            f"{readers} readers; every DataLoader worker needs at least one shard. Lower data.workers to "
            f"{max(1, nonempty // world_size)} or fewer, or re-shard with a smaller shard_size "
            f"(tools/make_shards.py shard_size=...) to get at least {readers} shards, or use data.resampled=true"
        )
    loader = Loader(cfg, preprocess, rank, world_size, shards, context_length, vocab_size)
    loader._seek(epoch, start_batch)
    log.info("data: %d %sshards, %d records, rank %d of %d, %d pairs per rank batch, %d batches per epoch, %s mode",
             len(shards), "feature " if cfg.features else "", total, rank, world_size, loader.pairs_per_rank,
             len(loader), "resampled" if cfg.resampled else "epoch")
    return loader
