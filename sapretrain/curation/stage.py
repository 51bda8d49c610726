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

**Parts**: with ``num_parts = N`` chunk ``c`` belongs to part ``c % N`` and part ``I`` writes
``OUT`` with ``-partIIIII-ofNNNNN`` before its extension (``part_output``).

**Bad input**: a line that is not a JSON object is dropped as ``bad_json`` (its first 200
characters kept in ``raw``) before the stage sees it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec

from sapretrain import storage

EXAMPLES_PER_REASON = 3


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
    buf, chunk = [], 0
    with fsspec.open(input_url, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
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


def parse_lines(lines: list[str]) -> tuple[list[dict], list[dict]]:
    """JSON objects of ``lines``, and ``bad_json`` drop records for the rest."""
    records, bad = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append({"raw": line[:200], "drop_reason": "bad_json"})
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
    if storage.exists(out) and storage.exists(summary_url) and not storage.exists(workdir):
        return json.loads(storage.read_bytes(summary_url))  # finished earlier

    ensure_settings(f"{workdir}/config.json", {"stage": stage.name, "chunk_size": cfg.chunk_size, **stage.fingerprint()})
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

    counts = [json.loads(storage.read_bytes(f"{workdir}/{c:08d}.stats.json")) for c in chunks]
    for suffix, url in ((".jsonl", out), (".dropped.jsonl", dropped_output(out))):
        tmp = storage.local_temp_for(url)
        with open(tmp, "wb") as dst:
            for c in chunks:
                dst.write(storage.read_bytes(f"{workdir}/{c:08d}{suffix}"))
        storage.commit(tmp, url)
    summary = _summary(stage.name, input_url, counts)
    storage.write_bytes_atomic(summary_url, json.dumps(summary, indent=1).encode())
    fs, path = storage.url_to_fs(workdir)
    fs.rm(path, recursive=True)
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
    return f"{summary['stage']}: {summary['records']} records, kept {summary['kept']}, dropped: {drops}"
