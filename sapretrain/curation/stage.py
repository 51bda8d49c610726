"""The machinery every per-record curation tool shares: chunks, resume, parts, drops counted.

    summary = run_stage(MyStage(cfg), "in.jsonl", "out.jsonl", StageConfig(chunk_size=5000),
                        part=0, num_parts=1)

A stage turns a list of input records (JSON objects, one per line) into output records. An
output record with a ``drop_reason`` key is *dropped*: it goes to ``OUT.dropped.jsonl`` (with the
reason), never to ``OUT``, and is counted by reason. Everything else is kept, in input order.

**Chunks and resume** (as ``extract_svo``): input line ``i`` belongs to chunk ``i // chunk_size``;
each chunk is processed and committed atomically under ``OUT.chunks/`` (kept lines, dropped lines,
counts; the kept file last, as the commit marker). A re-run skips committed chunks, so a killed
run continues where it stopped; when all chunks of the part are there they are concatenated in
order into ``OUT`` and ``OUT.dropped.jsonl`` (each published atomically), ``OUT.summary.json`` is
written and the chunk folder removed. The result is byte-identical to an uninterrupted run. The
stage's ``fingerprint()`` (its settings) and the chunk size are stored with the chunks; a re-run
with different ones is refused rather than mixing outputs.

**Done, and whose.** ``OUT.summary.json`` records what ``OUT`` was made from (``made_from``: the
stage, its ``fingerprint()`` and the input's ``input_fingerprint``: size and a hash of its first
and last MiB). A re-run whose ``OUT`` was made from this input with these settings (and is still the
file written then: ``output_fingerprint``) does nothing and says so (``"already_done"`` in the returned summary, one line from ``format_stage_summary``).
An ``OUT`` that exists without such a record (an empty file, another tool's output) or that was
made from another input or with other settings is refused (``ValueError``), never taken as
finished nor overwritten; so is a resume whose input changed under its chunks.

**Nothing to do** is an error, not a success: an input (or part) without records raises
``ValueError``, and a run that keeps no record at all raises ``NothingKeptError`` after writing
``OUT``, the dropped lines and the summary, so the reasons can be read (a re-run says the same).

**Parts**: with ``num_parts = N`` chunk ``c`` belongs to part ``c % N`` and part ``I`` writes
``OUT`` with ``-partIIIII-ofNNNNN`` before its extension (``part_output``).

**Bad input**: a line the shared JSONL reader (``sapretrain.jsonl``) refuses is dropped before
the stage sees it, with the reader's reason (``bad_json``: not JSON or not an object;
``bad_encoding``, ``too_deep``, ``bad_number``, ``line_too_long``) and its first 200 characters
kept in ``raw``.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from sapretrain import jsonl, storage

EXAMPLES_PER_REASON = 3
FINGERPRINT_BYTES = 1 << 20  # hashed from each end of the input


class NothingKeptError(ValueError):
    """A stage ran over records and kept none of them: surely a mistake (the reasons say which)."""


class Stage(Protocol):
    name: str

    def setup(self) -> None:
        """Load models etc.; called once per process before the first chunk."""

    def process(self, records: list[dict]) -> list[dict]:
        """Output records for ``records`` (dropped ones carry ``drop_reason``)."""

    def fingerprint(self) -> dict:
        """The settings that determine the output (stored; a resume with others is refused)."""


@dataclass
class StageConfig:
    chunk_size: int = 5000  # input lines per committed chunk (the unit of resume)


def part_output(output: str, part: int, num_parts: int) -> str:
    """The file one part writes: ``OUT`` itself, or ``OUT`` with ``-partIIIII-ofNNNNN``."""
    if num_parts == 1:
        return output
    head, sep, tail = output.rpartition("/")
    stem, dot, ext = tail.partition(".")
    name = f"{stem}-part{part:05d}-of{num_parts:05d}{dot}{ext}"
    return f"{head}{sep}{name}"


def iter_chunks(input_url: str, chunk_size: int, part: int, num_parts: int):
    """``(chunk index, lines)`` of this part, reading the input once."""
    # The shared JSONL reader: lines are split on bytes and bounded in size; one that is not
    # UTF-8 keeps its bad bytes (surrogateescape) so parsing it later counts it as bad_encoding.
    buf, chunk = [], 0
    for _, line in jsonl.iter_lines(input_url):
        buf.append(line)
        if len(buf) == chunk_size:
            if chunk % num_parts == part:
                yield chunk, buf
            buf, chunk = [], chunk + 1
    if buf and chunk % num_parts == part:
        yield chunk, buf


def committed_chunks(workdir: str, suffix: str = ".jsonl") -> set[int]:
    """Indices of the chunks committed in ``workdir`` (``NNNNNNNN<suffix>`` files; none if absent)."""
    fs, path = storage.url_to_fs(workdir)
    if not fs.exists(path):
        return set()
    done = set()
    for name in fs.ls(path, detail=False):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(suffix) and base[:-len(suffix)].isdigit():
            done.add(int(base[:-len(suffix)]))
    return done


def ensure_settings(url: str, settings: dict) -> None:
    """Store ``settings`` at ``url`` or check them against the stored ones (no mixed outputs)."""
    settings = json.loads(json.dumps(settings, sort_keys=True))
    if storage.exists(url):
        stored = json.loads(storage.read_bytes(url))
        if stored != settings:
            raise ValueError(f"{url} was made with other settings {stored}, now {settings}: "
                             "re-run with the same ones or delete the folder")
    else:
        storage.write_bytes_atomic(url, json.dumps(settings, sort_keys=True).encode())


def input_fingerprint(url: str) -> dict:
    """What identifies an input file: its size and the sha256 of its first and last MiB (two ranged
    reads, cheap on object stores). Raises ValueError when it does not exist."""
    fs, path = storage.url_to_fs(url)
    try:
        size = fs.size(path)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
                digest.update(f.read())
    except FileNotFoundError:
        raise ValueError(f"input {url} does not exist") from None
    if size is None:
        raise ValueError(f"input {url} is not a file")
    return {"size": int(size), "sha256_ends": digest.hexdigest()[:32]}


def _normal(value: dict) -> dict:
    return json.loads(json.dumps(value, sort_keys=True))


def finished_summary(out: str, made_from: dict, summary_url: str | None = None) -> dict | None:
    """The stored summary when ``out`` was finished from ``made_from`` (input and settings) and is
    still the file that run wrote (``output_fingerprint``), with ``"already_done": True``; None when
    ``out`` does not exist. Raises ValueError when ``out`` exists but nothing shows it was made
    from that input with those settings, or it was changed since."""
    if not storage.exists(out):
        return None
    summary_url = summary_url or f"{out}.summary.json"
    try:
        stored = json.loads(storage.read_bytes(summary_url)) if storage.exists(summary_url) else None
    except ValueError:
        stored = None
    recorded = stored.get("made_from") if isinstance(stored, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"{out} exists, but no finished run recorded what it was made from (no valid "
                         f"{summary_url}): it is not taken as done; delete it or choose another output")
    made_from = _normal(made_from)
    if recorded != made_from:
        differ = sorted(k for k in set(recorded) | set(made_from) if recorded.get(k) != made_from.get(k))
        raise ValueError(f"{out} was made from another input or with other settings (differ: "
                         f"{', '.join(differ)}): delete it and {summary_url}, or choose another output")
    if stored.get("output_fingerprint") != input_fingerprint(out):
        raise ValueError(f"{out} is not the file its run wrote (size or content changed since, per "
                         f"{summary_url}): delete both, or choose another output")
    return {**stored, "already_done": True, "output": out}


def check_kept(summary: dict, out: str) -> None:
    """Raise ``NothingKeptError`` when a stage had records and kept none."""
    if summary.get("records") and not summary.get("kept"):
        reasons = ", ".join(f"{k} {v}" for k, v in summary.get("dropped", {}).items()) or "none"
        raise NothingKeptError(f"{summary.get('stage')}: all {summary['records']} records of {summary.get('input')} "
                               f"were dropped ({reasons}); see {dropped_output(out)}")


def parse_lines(lines: list) -> tuple[list[dict], list[dict]]:
    """JSON objects of ``lines``, and drop records for the rest (``jsonl.parse_record``'s reasons:
    bad_json, bad_encoding, too_deep, bad_number, line_too_long)."""
    records, bad = [], []
    for line in lines:
        try:
            records.append(jsonl.parse_record(line))
        except jsonl.BadLine as e:
            bad.append({"raw": jsonl.excerpt(line), "drop_reason": e.reason, "drop_detail": e.detail[:200]})
    return records, bad


def _dumps(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _run_chunk(stage: Stage, workdir: str, chunk: int, lines: list[str]) -> int:
    records, bad = parse_lines(lines)
    out = stage.process(records) if records else []
    kept = [r for r in out if "drop_reason" not in r]
    dropped = bad + [r for r in out if "drop_reason" in r]
    counts = {"input": len(lines), "kept": len(kept), "dropped": dict(Counter(r["drop_reason"] for r in dropped)),
              "examples": _examples(dropped)}
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.stats.json", json.dumps(counts).encode())
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.dropped.jsonl", _dumps(dropped))
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.jsonl", _dumps(kept))  # the commit marker
    return len(lines)


def _examples(dropped: list[dict]) -> dict[str, list]:
    examples: dict[str, list] = {}
    for r in dropped:
        shown = examples.setdefault(r["drop_reason"], [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({k: r[k] for k in ("id", "caption", "raw", "drop_detail") if k in r})
    return examples


def dropped_output(out: str) -> str:
    head, dot, ext = out.rpartition(".")
    return f"{head}.dropped.{ext}" if dot and "/" not in ext else f"{out}.dropped"


def run_stage(stage: Stage, input_url: str, output: str, cfg: StageConfig | None = None, part: int = 0,
              num_parts: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run ``stage`` over this part of ``input_url``; returns the summary (also ``OUT.summary.json``)."""
    cfg = cfg or StageConfig()
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}), got {part}")
    if cfg.chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    out = part_output(output, part, num_parts)
    workdir, summary_url = f"{out}.chunks", f"{out}.summary.json"
    made_from = {"stage": stage.name, **stage.fingerprint(), "input": input_fingerprint(input_url)}
    if not storage.exists(workdir):  # with a chunk folder the run is resumed (and OUT rewritten)
        earlier = finished_summary(out, made_from)
        if earlier is not None:
            check_kept(earlier, out)
            return earlier

    ensure_settings(f"{workdir}/config.json", {"chunk_size": cfg.chunk_size, **made_from})
    done = committed_chunks(workdir)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=stage.name, unit="records", dynamic_ncols=True)
    chunks, ready = [], False
    try:
        for chunk, lines in iter_chunks(input_url, cfg.chunk_size, part, num_parts):
            chunks.append(chunk)
            if chunk not in done:
                if not ready:
                    stage.setup()
                    ready = True
                _run_chunk(stage, workdir, chunk, lines)
            if bar is not None:
                bar.update(len(lines))
    finally:
        if bar is not None:
            bar.close()
    if not chunks:
        fs, path = storage.url_to_fs(workdir)
        fs.rm(path, recursive=True)
        scope = f" for part {part} of {num_parts} (fewer chunks than parts?)" if num_parts > 1 else ""
        raise ValueError(f"{input_url} has no records{scope}: nothing to do")

    counts = [json.loads(storage.read_bytes(f"{workdir}/{c:08d}.stats.json")) for c in chunks]
    for suffix, url in ((".jsonl", out), (".dropped.jsonl", dropped_output(out))):
        tmp = storage.local_temp_for(url)
        with open(tmp, "wb") as dst:
            for c in chunks:
                dst.write(storage.read_bytes(f"{workdir}/{c:08d}{suffix}"))
        storage.commit(tmp, url)
    summary = {**_summary(stage.name, input_url, counts), "made_from": _normal(made_from),
               "output_fingerprint": input_fingerprint(out)}
    storage.write_bytes_atomic(summary_url, json.dumps(summary, indent=1).encode())
    fs, path = storage.url_to_fs(workdir)
    fs.rm(path, recursive=True)
    check_kept(summary, out)
    return summary


def _summary(name: str, input_url: str, counts: list[dict]) -> dict[str, Any]:
    dropped: Counter = Counter()
    examples: dict[str, list] = {}
    for c in counts:
        dropped.update(c["dropped"])
        for reason, shown in c["examples"].items():
            room = EXAMPLES_PER_REASON - len(examples.setdefault(reason, []))
            examples[reason] += shown[:max(room, 0)]
    return {"stage": name, "input": input_url, "records": sum(c["input"] for c in counts),
            "kept": sum(c["kept"] for c in counts), "dropped": dict(sorted(dropped.items())),
            "examples": examples}


def add_stage_arguments(parser, chunk_size: int = 5000) -> None:
    """The command-line options every stage tool shares: chunks, parts, progress."""
    parser.add_argument("--chunk-size", type=int, default=chunk_size, help="lines per committed chunk (resume unit)")
    parser.add_argument("--part", type=int, default=0, help="which part of the input this process does")
    parser.add_argument("--num-parts", type=int, default=1, help="into how many parts the input is split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_stage_from_args(stage: Stage, args) -> dict[str, Any]:
    """``run_stage`` with a tool's ``--input``/``--output`` and ``add_stage_arguments`` options."""
    return run_stage(stage, args.input, args.output, StageConfig(args.chunk_size), args.part, args.num_parts,
                     not args.no_progress)


def format_stage_summary(summary: dict[str, Any]) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    done = (f"already done ({summary.get('output', 'the output')} was made from this input with these settings; "
            "nothing recomputed): ") if summary.get("already_done") else ""
    return f"{summary['stage']}: {done}{summary['records']} records, kept {summary['kept']}, dropped: {drops}"
