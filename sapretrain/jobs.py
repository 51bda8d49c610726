"""What every partitioned, resumable job shares: parts, inputs, byte-range reading, one skip log.

    parts = Parts(3, 16)                                   # --part 3 --num-parts 16
    urls = expand_inputs("data/c/triplets-part*-of00016.jsonl")
    for number, line in iter_lines(plan_segments(urls, parts)):
        ...
    out = parts.output("data/c/samples.jsonl")            # data/c/samples-part00003-of00016.jsonl

**One part convention.** Part ``I`` of ``N`` takes the ``I``-th of ``N`` contiguous, near-equal
shares of the job's units: ``Parts.share(n)`` for ``n`` countable units (input files, images,
output shards, feature sources) and ``plan_segments`` for line inputs, whose units are bytes.
Every process reads only its share of a line input: with at least as many files as parts, a
contiguous share of the files, whole (so part ``I`` of ``N`` reading the ``N`` part files of the step
before reads exactly file ``I``, and parts of consecutive steps line up one to one: a pipeline can
stream part ``I`` through every step, SLURM can chain array tasks one to one); with fewer files,
a share of their bytes, split inside a plain (uncompressed) file by byte range; a compressed file
cannot be entered in the middle, so it belongs whole to the part its first byte falls in. Shares
are contiguous, so the parts' outputs
read in part order are the whole input in order: a one-part run and the concatenation of an
``N``-part run hold the same lines in the same order.

**Byte ranges and lines.** A segment ``[start, end)`` holds every line that *starts* in it: the
line it starts in the middle of belongs to the segment before, and its last line runs past
``end`` to its newline. Lines are read through ``jsonl.iter_raw_lines`` (bounded, blank lines left
out, over-long lines reported as ``line_too_long``).

**Inputs** (``expand_inputs``): a URL, a glob (``*?[``), a brace pattern (``{00000..00099}``,
``{a,b}``), a comma-free list of those, or the output of an earlier partitioned run: when ``OUT``
itself does not exist but its part files ``OUT-partIIIII-ofNNNNN`` do, they are the input, in
part order, and a missing part is an error. So a stage reads the parts of the one before it with
no merge step in between (SLURM arrays, the Ray engine).

**One skip log** (``SkipLog``): skipped or dropped inputs counted by reason with the first few
examples of each, mergeable across chunks, parts and workers; every tool reports its skips
through it.
"""
from __future__ import annotations

import contextlib
import gc
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from sapretrain import jsonl, storage

MAX_EXAMPLES = 5
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip")
PART_NAME = re.compile(r"-part(\d{5})-of(\d{5})(?=\.|$)")
_READ_PIECE = 1 << 20


@dataclass
class SkipLog:
    """Skipped inputs counted by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list] = field(default_factory=dict)

    def add(self, reason: str, detail: Any) -> None:
        self.counts[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(detail)

    def merge(self, other: "SkipLog") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            bucket = self.examples.setdefault(reason, [])
            bucket.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(bucket)])

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipLog":
        return cls(Counter(data.get("counts", {})), {k: list(v) for k, v in data.get("examples", {}).items()})


@dataclass(frozen=True)
class Parts:
    """This process's part of a job: ``part`` in ``[0, num_parts)`` (``--part``/``--num-parts``)."""

    part: int = 0
    num_parts: int = 1

    def __post_init__(self):
        if not isinstance(self.num_parts, int) or not isinstance(self.part, int) or self.num_parts < 1 \
                or not 0 <= self.part < self.num_parts:
            raise ValueError(f"--part {self.part} must be in [0, --num-parts {self.num_parts})")

    @property
    def whole(self) -> bool:
        return self.num_parts == 1

    def share(self, n: int) -> range:
        """This part's contiguous share of ``n`` units (parts differ in size by at most one)."""
        return range(n * self.part // self.num_parts, n * (self.part + 1) // self.num_parts)

    def output(self, url: str) -> str:
        """The file this part writes: ``url`` itself, or ``url`` with ``-partIIIII-ofNNNNN`` before
        its extension (``triplets-part00003-of00016.jsonl``)."""
        if self.whole:
            return url
        head, sep, tail = url.rpartition("/")
        stem, dot, ext = tail.partition(".")
        return f"{head}{sep}{stem}-part{self.part:05d}-of{self.num_parts:05d}{dot}{ext}"

    def label(self) -> str:
        return "" if self.whole else f" part {self.part}/{self.num_parts}"

    def to_list(self) -> list[int]:
        return [self.part, self.num_parts]


def add_part_arguments(parser) -> None:
    """``--part`` / ``--num-parts``, the same in every tool."""
    parser.add_argument("--part", type=int, default=0, help="which part of the job this process does (0-based)")
    parser.add_argument("--num-parts", type=int, default=1, help="into how many parts the job is split")


def parts_from_args(args) -> Parts:
    return Parts(args.part, args.num_parts)


# --------------------------------------------------------------------------------------------
# Inputs


def part_files(output: str) -> list[str] | None:
    """The part files of a partitioned run's ``output`` (in part order), or None when there are
    none. Raises ValueError when they are from runs with different ``N`` or some are missing."""
    head, sep, tail = output.rpartition("/")
    stem, dot, ext = tail.partition(".")
    found = expand_inputs(f"{head}{sep}{stem}-part[0-9][0-9][0-9][0-9][0-9]-of[0-9][0-9][0-9][0-9][0-9]{dot}{ext}",
                          parts_of_outputs=False)
    if not found:
        return None
    by_n: dict[int, dict[int, str]] = {}
    for url in found:
        m = PART_NAME.search(url.rsplit("/", 1)[-1])
        by_n.setdefault(int(m.group(2)), {})[int(m.group(1))] = url
    if len(by_n) > 1:
        raise ValueError(f"{output}: part files of runs with different --num-parts ({sorted(by_n)}) lie side by "
                         "side; delete the ones of the run you do not want")
    (n, got), = by_n.items()
    missing = [i for i in range(n) if i not in got]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{output}: {len(missing)} of its {n} part files are missing (parts {shown}): "
                         "run those parts first")
    return [got[i] for i in range(n)]


def expand_inputs(inputs: str | Iterable[str], parts_of_outputs: bool = True) -> list[str]:
    """Input URLs after brace expansion and globbing, in order (each glob's matches sorted). A
    plain URL that does not exist stands for its part files when they are there (``part_files``)."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for pattern in [inputs] if isinstance(inputs, str) else inputs:
        for url in braceexpand(str(pattern)):
            if any(c in url for c in "*?["):
                fs, path = storage.url_to_fs(url)
                matches = sorted(fs.glob(path))
                urls.extend(m if storage.is_local(fs) else fs.unstrip_protocol(m) for m in matches)
            elif parts_of_outputs and not storage.exists(url) and (parts := part_files(url)):
                urls.extend(parts)
            else:
                urls.append(url)
    return urls


# --------------------------------------------------------------------------------------------
# Byte ranges


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of ``url`` (``end`` None: the whole file, e.g. a compressed one)."""

    url: str
    start: int = 0
    end: int | None = None

    def to_list(self) -> list:
        return [self.url, self.start, self.end]


def is_compressed(url: str) -> bool:
    return url.lower().endswith(COMPRESSED)


def _size(url: str) -> int:
    fs, path = storage.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise ValueError(f"input {url} does not exist") from None
    if size is None:
        raise ValueError(f"input {url} is not a file")
    return int(size)


def plan_segments(urls: list[str], parts: Parts = Parts(), sizes: list[int] | None = None) -> list[Segment]:
    """This part's share of ``urls`` read one after the other (see the module doc): whole files
    when there are at least as many files as parts, else a share of their bytes."""
    if not urls:
        raise ValueError("no input files")
    if len(urls) >= parts.num_parts:  # part I of N reading the N part files of a step: file I
        return [Segment(urls[i]) for i in parts.share(len(urls))]
    sizes = [_size(u) for u in urls] if sizes is None else sizes
    total = sum(sizes)
    lo, hi = total * parts.part // parts.num_parts, total * (parts.part + 1) // parts.num_parts
    segments, offset = [], 0
    for url, size in zip(urls, sizes):
        first, last = offset, offset + size
        offset = last
        if is_compressed(url):
            if size and lo <= first < hi:  # whole, to the part its first byte falls in
                segments.append(Segment(url))
            continue
        start, end = max(lo, first), min(hi, last)
        if start < end:
            segments.append(Segment(url, start - first, None if end == last and start == first else end - first))
    return segments


def part_segments(inputs: str | list[str], parts: Parts = Parts()) -> list[Segment]:
    """This part's segments of ``inputs`` (``plan_segments(expand_inputs(inputs), parts)``), except
    that part ``I`` of ``N`` reading the output of an earlier run in ``N`` parts takes its file
    ``OUT-partIIIII-ofNNNNN`` as soon as that exists, whether or not the other parts are written
    yet: so a pipeline streams part ``I`` from step to step (the same file ``plan_segments`` would
    give it once every part is there)."""
    if isinstance(inputs, str) and not parts.whole and not storage.exists(inputs):
        own = parts.output(inputs)
        if storage.exists(own):
            return [Segment(own)]
    return plan_segments(expand_inputs(inputs), parts)


class _Window:
    """A binary file object over the lines that start in ``[start, end)`` (see the module doc)."""

    def __init__(self, f, start: int, end: int | None):
        self.f, self.end, self.pos, self.tail = f, end, start, False
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the segment before
                self._skip_line()
        else:
            f.seek(0)

    def _skip_line(self) -> None:
        while True:
            piece = self.f.read(_READ_PIECE)
            if not piece:
                self.pos = self.end if self.end is not None else self.pos
                return
            cut = piece.find(b"\n")
            if cut >= 0:
                self.pos += cut + 1
                self.f.seek(self.pos)
                return
            self.pos += len(piece)

    def read(self, n: int = -1) -> bytes:
        n = _READ_PIECE if n is None or n < 0 else n
        if self.end is None:
            return self.f.read(n)
        if self.pos < self.end:  # inside the range
            piece = self.f.read(min(n, self.end - self.pos))
            self.pos += len(piece)
            if piece and self.pos == self.end:
                self.tail = not piece.endswith(b"\n")  # the last line runs on to its newline
            return piece
        if not self.tail:
            return b""
        piece = self.f.read(n)
        cut = piece.find(b"\n")
        if cut >= 0 or not piece:
            self.tail = False
            piece = piece[:cut + 1] if cut >= 0 else piece
        self.pos += len(piece)
        return piece


def iter_segment_lines(segment: Segment, max_line_bytes: int = jsonl.MAX_LINE_BYTES
                       ) -> Iterator[tuple[int, str | jsonl.BadLine]]:
    """``(line number within the segment, text)`` of the lines starting in ``segment``; text keeps
    bad bytes as lone surrogates, as ``jsonl.iter_lines``."""
    if segment.start == 0 and segment.end is None:
        yield from jsonl.iter_lines(segment.url, max_line_bytes)
        return
    import fsspec

    with fsspec.open(segment.url, "rb") as f:
        for number, line in jsonl.iter_raw_lines(_Window(f, segment.start, segment.end), max_line_bytes):
            yield number, line if isinstance(line, jsonl.BadLine) else \
                line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


def iter_lines(segments: list[Segment], max_line_bytes: int = jsonl.MAX_LINE_BYTES) -> Iterator[str | jsonl.BadLine]:
    """The lines of ``segments`` in order."""
    for segment in segments:
        for _, line in iter_segment_lines(segment, max_line_bytes):
            yield line


def iter_chunks(segments: list[Segment], chunk_size: int) -> Iterator[tuple[int, list]]:
    """``(chunk index, lines)``: the lines of ``segments`` in chunks of ``chunk_size`` (the last
    may be shorter); chunk indices count from 0 in each part."""
    buf, chunk = [], 0
    for line in iter_lines(segments):
        buf.append(line)
        if len(buf) == chunk_size:
            yield chunk, buf
            buf, chunk = [], chunk + 1
    if buf:
        yield chunk, buf


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and back as it was after.

    A chunk's records are acyclic trees, freed by reference counting; but the collector counts
    every container they allocate, and its full collections walk every tracked object of the
    process, the loaded models included. With spaCy and torch loaded (600K tracked objects) that
    doubled the time of the rule stages. Cyclic garbage made inside the block waits for the next
    collection after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
