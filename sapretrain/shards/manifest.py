"""Reading and checking curated manifests (the format is documented in docs/manifest.md).

A manifest is anything ``jobs.expand_inputs`` takes (``manifest_files``): one file or URL, a glob,
a brace pattern, a list of those, or a partitioned run's output ``curated.jsonl`` that exists only
as its part files ``curated-partIIIII-ofNNNNN.jsonl`` (a missing part is an error). Its files are
read in order as ONE manifest: line numbers run on from one file to the next, ids are unique
across all of them, and a relative image path is resolved against its own file's directory.

Two readers share one validation path (``iter_valid_lines``): ``read_manifest`` keeps the samples
in a list (small manifests, tests), ``ManifestIndex`` keeps them on local disk (``make_shards``:
memory does not grow with the manifest).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator

from sapretrain import jsonl, storage
from sapretrain.jobs import MAX_EXAMPLES, SkipLog, expand_inputs  # the one skip log; importable from here too
from sapretrain.shards.schema import MANIFEST_REQUIRED as REQUIRED
from sapretrain.shards.process import hashed_image_key
from sapretrain.shards.schema import BadSample, validate_manifest_sample

__all__ = ["MAX_EXAMPLES", "REQUIRED", "BadSample", "ManifestIndex", "SkipLog", "check_sample", "iter_valid_lines",
           "manifest_files", "read_manifest"]

INSERT_BATCH = 5000  # rows per executemany while indexing: bounds the memory of the pass
SQLITE_CACHE_KIB = 16 << 10  # SQLite's page cache per connection (its sorter spills past it to disk)


def manifest_files(manifest: str | Iterable[str]) -> list[str]:
    """The files of ``manifest`` (anything ``jobs.expand_inputs`` takes), in reading order. Raises
    ValueError when a pattern matches nothing or a partitioned output misses a part."""
    files = expand_inputs(manifest)
    if not files:
        raise ValueError(f"manifest {manifest!r} matches no files")
    return files


def iter_valid_lines(files: list[str], skips: SkipLog) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
    """``(file index, line number, line text, sample)`` of every line of ``files`` (as
    ``manifest_files`` returns them) that passes validation, in order; invalid lines are counted in
    ``skips``. Duplicate ids are not looked at here.

    The files are one manifest: line numbers run on across them (a file's lines are numbered after
    the last line of the files before it; trailing blank lines count for nothing), so the numbers
    and skip messages are those of the files' concatenation. Lines go through the one JSONL reader
    (``sapretrain.jsonl``: encoding, syntax, non-objects, nesting, number size) and then
    ``schema.validate_manifest_sample``.
    """
    offset = 0
    for file, url in enumerate(files):
        last = 0
        for last, line in jsonl.iter_lines(url):
            number = offset + last
            try:
                sample = jsonl.parse_record(line)
                check_sample(sample)
            except jsonl.BadLine as e:
                skips.add(e.reason, f"line {number}: {e.detail}")
                continue
            except BadSample as e:
                skips.add(e.reason, f"line {number} ({jsonl.excerpt(sample.get('id', '?'), 80)}): {e.detail}")
                continue
            yield file, number, line, sample
        offset += last


def resolve_sample(sample: dict[str, Any], base: str) -> dict[str, Any]:
    """Fill ``image_key`` and resolve a relative image reference against ``base`` (the directory of
    the manifest file the sample is read from), in place; returns the sample."""
    if sample.get("image_key") is None:  # from the reference as written: independent of where it is read
        sample["image_key"] = hashed_image_key(sample["image"])
    sample["image"] = storage.join(base, sample["image"])
    return sample


def read_manifest(manifest: str | Iterable[str], skips: SkipLog) -> list[dict[str, Any]]:
    """All valid samples of a manifest (see the module doc) in order, in memory; invalid lines are
    counted in ``skips``. Duplicate ids keep the first occurrence. ``ManifestIndex`` is the same
    on disk."""
    files = manifest_files(manifest)
    bases = [storage.parent(url) for url in files]
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for file, number, _, sample in iter_valid_lines(files, skips):
        if sample["id"] in seen:
            skips.add("duplicate_id", f"line {number}: id {sample['id']!r} already used")
            continue
        seen.add(sample["id"])
        samples.append(resolve_sample(sample, bases[file]))
    return samples


class ManifestIndex:
    """A manifest's valid samples in a local SQLite file, for manifests too large for memory.

    ``build`` streams the manifest's files once (``manifest_files``: any fsspec URL, compression
    inferred) through ``iter_valid_lines`` and keeps, per valid line, what pairing needs and the
    line's text (a local spooled copy: later reads are local seeks, whatever the manifest's
    storage or compression). Duplicate ids keep their first line, as ``read_manifest``. Tables::

        samples(line PK, id UNIQUE, positive, image, image_key)   first valid line of each id;
                                                                  image resolved, image_key as JSON
        lines(line PK, file, text)                                the text of every valid line and
                                                                  the file it is from
        files(file PK, url, base)                                 the manifest's files in reading
                                                                  order, each with its directory

    Memory stays flat: rows go in batches, SQLite's cache is ``SQLITE_CACHE_KIB`` and its sorter
    spills to disk; only the list of files is held. Disk: about the valid lines' bytes plus ~100
    bytes a sample.
    """

    def __init__(self, path: str, files: list[str], bases: list[str], con: sqlite3.Connection):
        self.path, self.files, self.bases, self.con = path, files, bases, con

    @classmethod
    def build(cls, manifest: str | Iterable[str], path: str, skips: SkipLog) -> "ManifestIndex":
        files = manifest_files(manifest)
        bases = [storage.parent(url) for url in files]
        con = connect(path, write=True)
        con.executescript("""
            CREATE TABLE valid (line INTEGER PRIMARY KEY, id TEXT NOT NULL, positive TEXT NOT NULL,
                                image TEXT NOT NULL, image_key TEXT NOT NULL);
            CREATE TABLE lines (line INTEGER PRIMARY KEY, file INTEGER NOT NULL, text TEXT NOT NULL);
            CREATE TABLE files (file INTEGER PRIMARY KEY, url TEXT NOT NULL, base TEXT NOT NULL);
        """)
        rows: list[tuple] = []
        texts: list[tuple] = []

        def flush() -> None:
            con.executemany("INSERT INTO valid VALUES (?, ?, ?, ?, ?)", rows)
            con.executemany("INSERT INTO lines VALUES (?, ?, ?)", texts)
            rows.clear()
            texts.clear()

        try:
            con.execute("BEGIN")
            for file, number, text, sample in iter_valid_lines(files, skips):
                resolve_sample(sample, bases[file])
                # image_key as JSON: the int 5 and the string "5" stay different keys, as in Python.
                rows.append((number, sample["id"], sample["positive"], sample["image"], json.dumps(sample["image_key"])))
                texts.append((number, file, text))
                if len(rows) >= INSERT_BATCH:
                    flush()
            flush()
            con.executemany("INSERT INTO files VALUES (?, ?, ?)", [(i, u, b) for i, (u, b) in enumerate(zip(files, bases))])
            con.execute("COMMIT")
            con.execute("CREATE INDEX valid_by_id ON valid (id, line)")
            con.execute("""CREATE TABLE samples (line INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, positive TEXT NOT NULL,
                                                 image TEXT NOT NULL, image_key TEXT NOT NULL)""")
            con.execute("INSERT INTO samples SELECT * FROM valid v WHERE v.line = (SELECT MIN(w.line) FROM valid w WHERE w.id = v.id)")
            duplicates = con.execute(
                "SELECT v.line, v.id FROM valid v LEFT JOIN samples s ON s.line = v.line WHERE s.line IS NULL ORDER BY v.line"
            )
            for number, sample_id in duplicates:
                skips.add("duplicate_id", f"line {number}: id {sample_id!r} already used")
            con.execute("DROP TABLE valid")  # a duplicate's text stays in lines, unused
        except BaseException:  # a manifest that breaks off (UnreadableInput), a full disk ...
            con.close()
            raise
        return cls(path, files, bases, con)

    @classmethod
    def open(cls, path: str) -> "ManifestIndex":
        """An index built earlier, read-only (safe in forked workers: each opens its own)."""
        con = connect(path, write=False)
        rows = con.execute("SELECT url, base FROM files ORDER BY file").fetchall()
        return cls(path, [url for url, _ in rows], [base for _, base in rows], con)

    def __len__(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def sample(self, text: str, file: int) -> dict[str, Any]:
        """The sample of one stored line text from file ``file`` (``lines.file``), exactly as
        ``read_manifest`` returns it."""
        return resolve_sample(jsonl.parse_record(text), self.bases[file])

    def close(self) -> None:
        self.con.close()


def connect(path: str, write: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with a bounded page cache."""
    if write:
        con = sqlite3.connect(path, isolation_level=None)
        # A scratch file rebuilt on every run: no journal, no fsync.
        con.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
    else:
        # immutable: nothing writes to it any more, so readers take no locks (fine on any disk).
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)
    con.executescript(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}; PRAGMA temp_store = FILE;")
    return con


# The manifest's schema lives with the shard schema (one validator for what goes in and what comes out).
check_sample = validate_manifest_sample
