"""Decode every member of every shard against the schema (the logic of ``tools/check_shards.py``)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sapretrain import jsonl, storage, tars
from sapretrain.shards import schema

MAX_PROBLEMS_SHOWN = 20


@dataclass
class CheckReport:
    shards: int = 0
    records: int = 0
    samples_by_source: Counter = field(default_factory=Counter)
    records_by_kind: Counter = field(default_factory=Counter)
    truncated_captions: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"shards: {self.shards}   records (pairs): {self.records}   samples: {2 * self.records}"
            f"   size: {self.bytes / 2**20:.1f} MiB",
            "samples by source: " + ", ".join(f"{k} {v}" for k, v in sorted(self.samples_by_source.items())),
            "anchors by relation kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.records_by_kind.items())),
            f"captions truncated at the context length: {self.truncated_captions}",
        ]
        if self.problems:
            lines.append(f"PROBLEMS: {len(self.problems)}")
            lines += [f"  - {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                lines.append(f"  ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more")
        else:
            lines.append("OK: every member of every shard decodes and follows schema v%d" % schema.SCHEMA_VERSION)
        return "\n".join(lines)


def list_shards(root: str) -> list[str]:
    fs, path = storage.url_to_fs(root)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/*.tar"))
    return [f"{str(root).rstrip('/')}/{name}" for name in names]


def check_shards(root: str, progress=None, vocab_size: int | None = None) -> CheckReport:
    """Check all shards under ``root`` against the schema, sizes.json and summary.json.

    Every problem is reported (``report.problems``), none raised: a record that fails the schema
    (``schema.validate_record``: token ids outside the vocabulary, a string where a list belongs,
    boxes of the wrong shape ...), a member that does not decode, a sizes.json or summary.json
    that is not what make_shards writes."""
    report = CheckReport()
    root = str(root).rstrip("/")
    urls = list_shards(root)
    if not urls:
        report.problems.append(f"no *.tar shards under {root}")
        return report
    expected_sizes = _load_json(f"{root}/sizes.json", report)
    if expected_sizes is not None:
        try:
            schema.validate_sizes(expected_sizes)
        except schema.SchemaError as e:
            report.problems.append(str(e))
            expected_sizes = None
    summary = _load_json(f"{root}/summary.json", report)
    expected_hash = _summary_hashes(summary, report)
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        try:
            data = storage.read_bytes(url)
        except OSError as e:
            report.problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
            continue
        report.shards += 1
        report.bytes += len(data)
        if name in expected_hash and hashlib.sha256(data).hexdigest() != expected_hash[name]:
            report.problems.append(f"{name}: sha256 differs from summary.json")
        count = check_shard_bytes(name, data, report, vocab_size)
        if expected_sizes is not None and expected_sizes.get(name) != count:
            report.problems.append(f"{name}: {count} records, sizes.json says {expected_sizes.get(name)}")
        if progress is not None:
            progress(count)
    if expected_sizes is not None:
        missing = sorted(set(expected_sizes) - {u.rsplit("/", 1)[-1] for u in urls})
        report.problems += [f"{name}: listed in sizes.json but missing" for name in missing]
    return report


def _summary_hashes(summary: Any, report: CheckReport) -> dict[str, str]:
    """``{shard: sha256}`` from summary.json; a malformed one is a problem, not a crash."""
    if summary is None:
        return {}
    shards = summary.get("shards") if isinstance(summary, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("shard"), str) and isinstance(s.get("sha256"), str) for s in shards
    ):
        report.problems.append("summary.json: no list of {shard, sha256} entries (not written by make_shards?)")
        return {}
    return {s["shard"]: s["sha256"] for s in shards}


def check_shard_bytes(name: str, data: bytes, report: CheckReport, vocab_size: int | None = None) -> int:
    """Check one shard's records; returns the number of good records."""
    count = 0
    if len(data) % tarfile.BLOCKSIZE:
        report.problems.append(f"{name}: {len(data)} bytes is not a whole number of tar blocks: truncated")

    def stray(member: str) -> None:
        report.problems.append(f"{name}: member {member!r} belongs to no record (not KEY.ext)")

    try:
        for record in tars.records(io.BytesIO(data), name, stray=stray):
            key = record.pop("__key__")
            del record["__url__"]
            problem = check_record(key, record, report, vocab_size)
            if problem:
                report.problems.append(f"{name}/{key}: {problem}")
            else:
                count += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        report.problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e}) after {count} records")
    report.records += count
    return count


def check_record(key: str, members: dict[str, bytes], report: CheckReport, vocab_size: int | None = None) -> str | None:
    """The first problem of one record, or None (and the record is counted in ``report``)."""
    missing = [ext for ext in schema.EXTENSIONS if ext not in members]
    if missing:
        return f"missing members {missing}"
    extra = sorted(set(members) - set(schema.EXTENSIONS))
    if extra:
        return f"unexpected members {extra}"
    try:
        meta = jsonl.parse_record(members["json"])
        schema.validate_record(key, meta, vocab_size)
    except (jsonl.BadLine, schema.SchemaError) as e:
        return f"json: {e}"
    for member in schema.MEMBERS:
        for part, ext in schema.image_members(member).items():
            problem = _check_jpeg(members[ext], meta, part)
            if problem:
                return f"{ext}: {problem}"
    report.records_by_kind[meta["a"]["kind"]] += 1
    for member in schema.MEMBERS:
        report.samples_by_source[meta[member]["source"]] += 1
        report.truncated_captions += bool(meta[member].get("truncated"))
    return None


def _check_jpeg(data: bytes, meta: dict[str, Any], part: str) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size, fmt = image.size, image.format
    except Exception as e:  # any decoder failure is a corrupt member, whatever PIL calls it
        return f"does not decode ({type(e).__name__}: {e})"
    if fmt != "JPEG":
        return f"format {fmt}, expected JPEG"
    if part == "image":
        if min(size) != meta["image_size"]:
            return f"size {size}: shorter side should be {meta['image_size']}"
    elif size != (meta["roi_size"], meta["roi_size"]):
        return f"size {size}, expected {meta['roi_size']}x{meta['roi_size']}"
    return None


def _load_json(url: str, report: CheckReport) -> dict | None:
    if not storage.exists(url):
        report.problems.append(f"{url.rsplit('/', 1)[-1]} is missing (the writer did not finish)")
        return None
    try:
        return jsonl.parse_record(storage.read_bytes(url))
    except jsonl.BadLine as e:
        report.problems.append(f"{url}: not a JSON object ({e})")
        return None
