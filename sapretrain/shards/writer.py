"""Curated manifest + images → WebDataset tar shards (the logic behind ``tools/make_shards.py``).

Work is cut into shards of ``shard_size`` consecutive records before any image is opened, so
shard ``i`` always holds the same records: ``--part I --num-parts N`` writes the ``I``-th
contiguous share of the shards (``jobs.Parts.share``), and a re-run skips every shard already
committed. A shard is written to a
temporary file and committed whole (rename locally, a single upload on object stores), then its
``_progress/<shard>.json`` is written; only a shard with that file counts as done. When every
shard is done, ``sizes.json`` and ``summary.json`` are written. Nothing in the output depends on
time, worker count or interruption, so a resumed run is byte-identical to an uninterrupted one.

The manifest is anything ``jobs.expand_inputs`` takes, read in order as one manifest
(``shards.manifest``): e.g. the part files of a partitioned curation run give the same shards as
their concatenation.

Memory does not grow with the manifest: ``plan_shards`` streams it once into a local SQLite file
(``ManifestIndex``: valid samples by id and each valid line's text) and numbers the records there
with SQL; each shard then loads only its own records from that file. Every part makes the same
plan from the same streamed pass (the manifest is read once per call, sequentially), so parts
agree on shard boundaries without talking to each other.

Output layout (``OUT`` a local dir or fsspec URL)::

    OUT/shard-000000.tar ...   the shards (schema: sapretrain/shards/schema.py)
    OUT/sizes.json             {"shard-000000.tar": n_records, ...} (open_clip/webdataset convention)
    OUT/summary.json           counts, skipped inputs by reason with examples, per-shard sha256
    OUT/config.yaml            the resolved ShardConfig
    OUT/_progress/*.json       per-shard completion records
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable

from tqdm import tqdm

from sapretrain import storage
from sapretrain.config import dump_config
from sapretrain.jobs import Parts
from sapretrain.shards.manifest import ManifestIndex, SkipLog
from sapretrain.shards import schema
from sapretrain.shards.schema import BadSample
from sapretrain.shards.process import ImageSpec, process_sample
from sapretrain.shards.tokens import SpanTokenizer

SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class ShardConfig:
    """How curated samples become shards.

    Run: ``python tools/make_shards.py --manifest M.jsonl|GLOB|URL --output DIR|URL [--config configs/shards.yaml] [key=value ...]``
    """

    image_size: int = 224  # shorter side of the stored image (CLIP's input size)
    roi_size: int = 224  # side of the square subject/object crops
    roi_context: float = 1.1  # crop side = this x the box's longer side
    jpeg_quality: int = 90
    shard_size: int = 1000  # records per shard (records, not samples: each holds a pair)
    tokenizer: str = "ViT-B-32"  # open_clip model whose tokenizer maps SVO spans to token positions
    context_length: int = 77
    max_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    draft: bool = True  # reduced-scale JPEG decoding when no output needs the full resolution

    def image_spec(self) -> ImageSpec:
        return ImageSpec(
            self.image_size, self.roi_size, self.roi_context, self.jpeg_quality, self.max_pixels, self.draft
        )


@dataclass
class ShardReport:
    output: str
    shards_total: int
    shards_written: int  # by this call
    shards_skipped: int  # already done before this call
    records_written: int  # by this call
    finalized: bool
    summary: dict[str, Any] | None
    seconds: float


@dataclass(frozen=True)
class ShardPlan:
    """The records of a manifest, numbered in manifest order, in a local SQLite file.

    The file is a ``ManifestIndex`` plus ``records(k PK, anchor, partner)``: record ``k`` pairs
    the lines ``anchor`` and ``partner``; shard ``i`` holds records ``i * shard_size`` onwards.
    """

    path: str
    manifest_files: tuple[str, ...]  # the manifest's files, in reading order
    samples_read: int  # valid samples (first line of each id)
    records: int
    merged: int  # mutual pairs that became one record
    shard_size: int

    @property
    def shard_count(self) -> int:
        return -(-self.records // self.shard_size)

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, self.records - index * self.shard_size)

    def shard_records(self, index: int) -> list[tuple[dict, dict]]:
        """Shard ``index``'s (anchor, partner) samples, read from the local file (one shard's worth
        of memory)."""
        manifest = ManifestIndex.open(self.path)
        try:
            rows = manifest.con.execute(
                "SELECT a.text, a.file, p.text, p.file FROM records r JOIN lines a ON a.line = r.anchor"
                " JOIN lines p ON p.line = r.partner WHERE r.k >= ? AND r.k < ? ORDER BY r.k",
                (index * self.shard_size, (index + 1) * self.shard_size),
            )
            return [(manifest.sample(a, a_file), manifest.sample(p, p_file)) for a, a_file, p, p_file in rows]
        finally:
            manifest.close()


def plan_shards(manifest: str | Iterable[str], path: str, shard_size: int, skips: SkipLog) -> ShardPlan:
    """Index ``manifest`` (one or more files, ``shards.manifest``) into the SQLite file ``path``
    and number its records there.

    Each valid sample, in manifest order, is the anchor of one record with its ``positive`` as
    partner, except: a partner that is no valid sample (``missing_partner``), one that is the
    sample itself or shows the same image (``partner_same_image``: same ``image`` or same
    ``image_key``), and the second member of a mutual pair (A→B, B→A): the pair becomes the one
    record (A, B), since both directions are the same pair to the symmetric contrastive loss and
    two copies could land in one batch as false negatives (counted in ``merged``).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    index = ManifestIndex.build(manifest, path, skips)
    con = index.con
    try:
        con.execute("CREATE TABLE records (k INTEGER PRIMARY KEY, anchor INTEGER NOT NULL, partner INTEGER NOT NULL)")
        # Anchors in line order (the rowid), partners through the unique id index: no sort, no map in memory.
        pairs = con.execute(
            "SELECT a.line, a.id, a.positive, p.line, p.positive, a.image = p.image, a.image_key = p.image_key"
            " FROM samples a LEFT JOIN samples p ON p.id = a.positive ORDER BY a.line"
        )
        records, merged, batch = 0, 0, []
        con.execute("BEGIN")
        for a_line, a_id, a_positive, p_line, p_positive, same_image, same_key in pairs:
            if p_line is None:
                skips.add("missing_partner", f"{a_id}: positive {a_positive!r} is not a valid sample")
            elif p_line == a_line or same_image or same_key:
                skips.add("partner_same_image", f"{a_id}: positive {a_positive!r} is the same image")
            elif p_positive == a_id and p_line < a_line:
                merged += 1
            else:
                batch.append((records, a_line, p_line))
                records += 1
                if len(batch) >= 5000:
                    con.executemany("INSERT INTO records VALUES (?, ?, ?)", batch)
                    batch.clear()
        con.executemany("INSERT INTO records VALUES (?, ?, ?)", batch)
        con.execute("COMMIT")
        samples_read = len(index)
    finally:
        index.close()
    return ShardPlan(path, tuple(index.files), samples_read, records, merged, shard_size)


def make_shards(
    manifest: str | Iterable[str],
    output: str,
    cfg: ShardConfig,
    part: int = 0,
    num_parts: int = 1,
    workers: int = 1,
    progress: bool = True,
    work_dir: str | None = None,
) -> ShardReport:
    """Write this part's missing shards; finalize when all parts are done. See module docs.

    ``manifest``: anything ``jobs.expand_inputs`` takes (a file or URL, a glob, a brace pattern, a
    list, a partitioned output standing for its part files), read in order as one manifest.

    The plan's SQLite file lives in a temporary directory under ``work_dir`` (default: the
    system's, ``$TMPDIR``), removed on return; it needs about the manifest's size on disk.
    """
    parts = Parts(part, num_parts)
    start = time.time()
    manifest = str(manifest) if isinstance(manifest, (str, os.PathLike)) else [str(m) for m in manifest]
    output = str(output).rstrip("/")
    SpanTokenizer(cfg.tokenizer, cfg.context_length)  # fail fast on an unsupported tokenizer
    claim_output(output, cfg)

    skips = SkipLog()
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="make_shards-", dir=work_dir) as scratch:
        plan = plan_shards(manifest, os.path.join(scratch, "plan.sqlite"), cfg.shard_size, skips)
        mine = list(parts.share(plan.shard_count))
        remove_stale_temps(output, set(mine), sole_writer=parts.whole)
        todo = [i for i in mine if not storage.exists(progress_url(output, i))]
        written = run_shards(output, cfg, plan, todo, workers, progress)
    summary = finalize(output, manifest, plan.manifest_files, plan.samples_read, plan.shard_count, plan.merged, skips)
    return ShardReport(
        output=output,
        shards_total=plan.shard_count,
        shards_written=len(todo),
        shards_skipped=len(mine) - len(todo),
        records_written=written,
        finalized=summary is not None,
        summary=summary,
        seconds=time.time() - start,
    )


def claim_output(output: str, cfg: ShardConfig) -> None:
    """Save the resolved config, or refuse to mix configs in one output."""
    url = f"{output}/config.yaml"
    text = dump_config(cfg)
    if storage.exists(url):
        existing = storage.read_bytes(url).decode("utf-8")
        if existing != text:
            raise SystemExit(
                f"{output} holds shards written with a different config (see {url}); "
                "use a new --output or delete the old one"
            )
        return
    storage.write_bytes_atomic(url, text.encode("utf-8"))


def remove_stale_temps(output: str, mine: set[int], sole_writer: bool) -> None:
    """Delete temporary files a killed run of this part left behind (local outputs only).

    Object-store outputs never hold temporaries: files are staged locally and uploaded whole.
    """
    fs, path = storage.url_to_fs(output)
    if not storage.is_local(fs):
        return
    for tmp in fs.glob(f"{path}/*.tmp.*") + fs.glob(f"{path}/_progress/*.tmp.*"):
        match = re.search(r"shard-(\d+)\.tar", tmp.rsplit("/", 1)[-1])
        if (match and int(match.group(1)) in mine) or (not match and sole_writer):
            fs.rm(tmp)


def progress_url(output: str, index: int) -> str:
    return f"{output}/_progress/{SHARD_PATTERN.format(index)}.json"


def run_shards(output: str, cfg: ShardConfig, plan: ShardPlan, todo: list[int], workers: int, progress: bool) -> int:
    total = sum(plan.shard_length(index) for index in todo)
    tasks = [(output, cfg, plan, index) for index in sorted(todo)]
    done = 0
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(None)
        with tqdm(total=total, unit="rec", desc="make_shards", disable=not progress) as bar:
            for task in tasks:
                done += write_planned_shard(*task, on_record=bar.update)["records"]
        return done
    # fork: workers inherit the imported modules instead of re-importing torch; the parent has
    # started no bar yet, and fsspec resets its event loop in forked children.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    # Workers add to a shared counter per record so the bar moves smoothly, not per shard.
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
        bar = tqdm(total=total, unit="rec", desc="make_shards", disable=not progress)
        pending = pool.starmap_async(write_planned_shard, tasks, chunksize=1)
        while not pending.ready():
            pending.wait(0.5)
            bar.update(counter.value - bar.n)
        for stats in pending.get():
            done += stats["records"]
        bar.update(counter.value - bar.n)
        bar.close()
    return done


_counter = None
_tokenizers: dict[tuple[str, int], SpanTokenizer] = {}


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _tokenizer(cfg: ShardConfig) -> SpanTokenizer:
    key = (cfg.tokenizer, cfg.context_length)
    if key not in _tokenizers:
        _tokenizers[key] = SpanTokenizer(cfg.tokenizer, cfg.context_length)
    return _tokenizers[key]


def write_planned_shard(output: str, cfg: ShardConfig, plan: ShardPlan, index: int, on_record=None) -> dict[str, Any]:
    """Write shard ``index`` of ``plan`` (its records are read from the plan's file here, in the
    worker: the parent never holds them)."""
    return write_shard(output, cfg, index, plan.shard_records(index), on_record)


def write_shard(output: str, cfg: ShardConfig, index: int, records: list, on_record=None) -> dict[str, Any]:
    """Write one shard and its progress record; returns the progress record."""
    tokenizer = _tokenizer(cfg)
    spec = cfg.image_spec()
    head = schema.header(tokenizer.name, tokenizer.context_length, cfg.image_size, cfg.roi_size)
    skips = SkipLog()
    cache: dict[str, tuple[dict, dict] | BadSample] = {}  # a partner may serve several anchors
    name = SHARD_PATTERN.format(index)
    url = f"{output}/{name}"
    tmp = storage.local_temp_for(url)
    count = 0
    try:
        with open(tmp, "wb") as raw:
            sink = HashingWriter(raw)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for anchor, partner in records:
                    try:
                        members = {m: _processed(s, spec, tokenizer, cache) for m, s in zip(schema.MEMBERS, (anchor, partner))}
                        files = _record_files(anchor["id"], head, members, tokenizer.vocab_size)
                    except BadSample as e:
                        skips.add(e.reason, e.detail)
                    else:
                        for member_name, data in files:
                            add_file(tar, member_name, data)
                        count += 1
                    if on_record is not None:
                        on_record(1)
                    elif _counter is not None:
                        with _counter.get_lock():
                            _counter.value += 1
        storage.commit(tmp, url)
    except BaseException:
        # A disk-full or killed write leaves no temporary behind (commit removed it on success).
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    stats = {"shard": name, "records": count, "bytes": sink.size, "sha256": sink.sha256.hexdigest(), "skipped": skips.to_dict()}
    storage.write_bytes_atomic(progress_url(output, index), schema.encode_json(stats))
    return stats


def _processed(sample: dict, spec: ImageSpec, tokenizer: SpanTokenizer, cache: dict) -> tuple[dict, dict]:
    if sample["id"] not in cache:
        try:
            cache[sample["id"]] = process_sample(sample, spec, tokenizer)
        except BadSample as e:
            cache[sample["id"]] = BadSample(e.reason, f"{sample['id']}: {e.detail}")
    result = cache[sample["id"]]
    if isinstance(result, BadSample):
        raise result
    return result


def _record_files(key: str, head: dict, members: dict[str, tuple[dict, dict]], vocab_size: int) -> list[tuple[str, bytes]]:
    """The tar members of one record, in order; BadSample when its side-car would not pass the
    reader's own schema check (the record is then skipped before anything reaches the tar)."""
    meta = dict(head)
    files: dict[str, bytes] = {}
    for member, (sample_meta, jpegs) in members.items():
        meta[member] = sample_meta
        for part, ext in schema.image_members(member).items():
            files[ext] = jpegs[part]
    try:
        schema.validate_record(key, meta, vocab_size)
        side_car = schema.encode_json(meta)
    except schema.SchemaError as e:
        raise BadSample("bad_record", f"{key}: {e}") from None
    except UnicodeEncodeError as e:  # a lone surrogate that reached a text field
        raise BadSample("bad_encoding", f"{key}: {e}") from None
    return [(f"{key}.json", side_car)] + [(f"{key}.{ext}", data) for ext, data in files.items()]


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime, owner or host): the same records give the same bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        chunk = self._view[self._pos : end].tobytes()
        self._pos += len(chunk)
        return chunk


class HashingWriter:
    """File wrapper that hashes and counts what is written through it."""

    def __init__(self, raw):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        return self.size


def finalize(output: str, manifest: str | list[str], manifest_files: Iterable[str], samples_read: int, shard_count: int,
             merged: int, skips: SkipLog):
    """Write sizes.json and summary.json once every shard is done; None while some are missing.
    The summary names the manifest as given and every file it was read from."""
    stats = []
    for index in range(shard_count):
        url = progress_url(output, index)
        if not storage.exists(url):
            return None
        stats.append(json.loads(storage.read_bytes(url)))
    for s in stats:
        skips.merge(SkipLog.from_dict(s["skipped"]))
    sizes = {s["shard"]: s["records"] for s in stats}
    summary = {
        "schema": schema.SCHEMA_VERSION,
        "manifest": manifest,
        "manifest_files": list(manifest_files),
        "samples_read": samples_read,
        "records": sum(sizes.values()),
        "mutual_pairs_merged": merged,
        "skipped": skips.to_dict(),
        "shards": [{k: s[k] for k in ("shard", "records", "bytes", "sha256")} for s in stats],
    }
    storage.write_bytes_atomic(f"{output}/sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())
    storage.write_bytes_atomic(f"{output}/summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary
