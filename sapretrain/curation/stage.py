"""The machinery every per-record curation tool shares: chunks, workers, resume, parts, drops counted.

    summary = run_stage(MyStage(cfg), "in.jsonl", "out.jsonl", StageConfig(chunk_size=5000),
                        parts=Parts(0, 1))

A stage turns a list of input records (JSON objects, one per line) into output records. An
output record with a ``drop_reason`` key is *dropped*: it goes to ``OUT.dropped.jsonl`` (with the
reason), never to ``OUT``, and is counted by reason (``jobs.SkipLog``). Everything else is kept,
in input order. A stage may also count what it keeps (``counts``, merged by adding) and turn the
totals into summary fields (``summarize``), and may keep a line that is not JSON as a record of
its own (``takes_lines``: it is given the raw lines) instead of having it dropped.

**Inputs and parts** (``sapretrain.jobs``): the input is a URL, a glob, a brace pattern, a list,
or the part files of an earlier partitioned stage. Part ``I`` of ``N`` reads only its contiguous
byte share of the input (``jobs.plan_segments``) and writes ``OUT`` with ``-partIIIII-ofNNNNN``
before the extension; read in part order the parts' outputs are the one-part output.

**Chunks and resume**: line ``i`` of the part belongs to chunk ``i // chunk_size``; each chunk is
processed and committed atomically under ``OUT.chunks/`` (kept lines, dropped lines, counts; the
kept file last, as the commit marker). ``workers > 1`` processes chunks in that many processes
(each runs ``setup`` once), at most two chunks per worker in flight. A re-run skips committed
chunks, so a killed run continues where it stopped; when all chunks of the part are there they are
concatenated in order into ``OUT`` and ``OUT.dropped.jsonl`` (each published atomically),
``OUT.summary.json`` is written and the chunk folder removed. The result is byte-identical to an
uninterrupted run. The stage's ``fingerprint()`` (its settings) and the chunk size are stored with
the chunks; a re-run with different ones is refused rather than mixing outputs.

**Done, and whose.** ``OUT.summary.json`` records what ``OUT`` was made from (``made_from``: the
stage, its ``fingerprint()`` and, per input segment, the file's ``input_fingerprint``: size and a
hash of its first and last MiB, with the byte range). A re-run whose ``OUT`` was made from this
input with these settings (and is still the file written then: ``output_fingerprint``) does
nothing and says so (``"already_done"`` in the returned summary, one line from
``format_stage_summary``). An ``OUT`` that exists without such a record (an empty file, another
tool's output) or that was made from another input or with other settings is refused
(``ValueError``), never taken as finished nor overwritten; so is a resume whose input changed
under its chunks.

**Nothing to do** is an error, not a success: an input without records raises ``ValueError``,
and a run that keeps no record at all raises ``NothingKeptError`` after writing ``OUT``, the
dropped lines and the summary, so the reasons can be read (a re-run says the same). A part whose
share of a non-empty input holds no line (more parts than lines) writes an empty ``OUT`` and says
so; that is not an error, since the other parts hold the records.

**Bad input**: a line the shared JSONL reader (``sapretrain.jsonl``) refuses is dropped before
the stage sees it, with the reader's reason (``bad_json``: not JSON or not an object;
``bad_encoding``, ``too_deep``, ``bad_number``, ``line_too_long``) and its first 200 characters
kept in ``raw``.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from sapretrain import jsonl, storage
from sapretrain.jobs import Parts, SkipLog, add_part_arguments, gc_paused, iter_chunks, part_segments

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

    # Optional: ``takes_lines = True`` (``process`` gets the raw lines and parses them itself),
    # ``counts(kept) -> dict`` (additive counts of a chunk's kept
    # records), ``summarize(totals) -> dict`` (summary fields from the summed counts),
    # ``warnings(summary) -> list[str]`` (what a finished run's user should look at although it is
    # not an error: the summary's ``warnings``, printed by ``format_stage_summary``) and
    # ``check(summary, out)`` (raise when the finished run is surely a mistake).


@dataclass
class StageConfig:
    chunk_size: int = 5000  # input lines per committed chunk (the unit of resume)
    workers: int = 1  # processes; 1 runs the stage in this process


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
            differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"{url.rsplit('/', 1)[0]} was started from another input or with other settings "
                             f"(differ: {', '.join(differ)}): re-run with the same ones or delete the folder")
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


def segments_fingerprint(segments) -> list[dict]:
    """``input_fingerprint`` of each segment's file with its byte range (paths left out, so a
    moved work folder is still recognised)."""
    return [{**input_fingerprint(s.url), "start": s.start, "end": s.end} for s in segments]


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
                               f"were dropped ({reasons}); see {dropped_output(out)}"
                               + "".join(f"\nwarning: {note}" for note in summary.get("warnings", [])))


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
    return jsonl.dump_lines(records)


def add_counts(total: dict, counts: dict) -> dict:
    """``total`` plus ``counts``: numbers add, nested dicts add key by key."""
    for key, value in counts.items():
        if isinstance(value, dict):
            total[key] = add_counts(dict(total.get(key, {})), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def _process_chunk(stage: Stage, lines: list) -> tuple[list[dict], list[dict]]:
    """Kept and dropped output records of one chunk's lines (lines that are not records first)."""
    if getattr(stage, "takes_lines", False):
        out, bad = stage.process(lines), []
    else:
        records, bad = parse_lines(lines)
        out = stage.process(records) if records else []
    return [r for r in out if "drop_reason" not in r], bad + [r for r in out if "drop_reason" in r]


def _run_chunk(stage: Stage, workdir: str, chunk: int, lines: list) -> int:
    with gc_paused():  # records are acyclic: no full collections over the models per chunk
        kept, dropped = _process_chunk(stage, lines)
        kept_bytes, dropped_bytes = _dumps(kept), _dumps(dropped)
    skips = SkipLog()
    for r in dropped:
        skips.add(r["drop_reason"], {k: r[k] for k in ("id", "caption", "raw", "drop_detail") if k in r})
    counts = {"input": len(lines), "kept": len(kept), "skips": skips.to_dict(),
              "stage": stage.counts(kept) if hasattr(stage, "counts") else {}}
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.stats.json", json.dumps(counts).encode())
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.dropped.jsonl", dropped_bytes)
    storage.write_bytes_atomic(f"{workdir}/{chunk:08d}.jsonl", kept_bytes)  # the commit marker
    return len(lines)


_WORKER: dict = {}


def _init_worker(stage: Stage) -> None:
    stage.setup()
    _WORKER["stage"] = stage


def _worker_chunk(workdir: str, chunk: int, lines: list) -> int:
    return _run_chunk(_WORKER["stage"], workdir, chunk, lines)


def _pool(stage: Stage, workers: int):
    # fork shares what the parent imported (fast start); each worker still runs setup() itself.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(stage,))


def dropped_output(out: str) -> str:
    head, dot, ext = out.rpartition(".")
    return f"{head}.dropped.{ext}" if dot and "/" not in ext else f"{out}.dropped"


def run_stage(stage: Stage, inputs, output: str, cfg: StageConfig | None = None, parts: Parts = Parts(),
              progress: bool = True) -> dict[str, Any]:
    """Run ``stage`` over this part of ``inputs``; returns the summary (also ``OUT.summary.json``)."""
    cfg = cfg or StageConfig()
    if cfg.chunk_size < 1 or cfg.workers < 1:
        raise ValueError("chunk_size and workers must be >= 1")
    segments = part_segments(inputs, parts)
    out = parts.output(output)
    workdir, summary_url = f"{out}.chunks", f"{out}.summary.json"
    made_from = {"stage": stage.name, **stage.fingerprint(), "input": segments_fingerprint(segments)}
    if not storage.exists(workdir):  # with a chunk folder the run is resumed (and OUT rewritten)
        earlier = finished_summary(out, made_from)
        if earlier is not None:
            _check(stage, earlier, out)
            return earlier

    ensure_settings(f"{workdir}/config.json", {"chunk_size": cfg.chunk_size, **made_from})
    done = committed_chunks(workdir)
    pool = _pool(stage, cfg.workers) if cfg.workers > 1 else None  # before tqdm starts its thread
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"{stage.name}{parts.label()}", unit="records", dynamic_ncols=True)
    chunks, ready, pending = [], False, deque()
    try:
        for chunk, lines in iter_chunks(segments, cfg.chunk_size):
            chunks.append(chunk)
            if chunk in done:
                n = len(lines)
            elif pool is not None:
                pending.append(pool.apply_async(_worker_chunk, (workdir, chunk, lines)))
                n = pending.popleft().get() if len(pending) >= 2 * cfg.workers else 0
            else:
                if not ready:
                    stage.setup()
                    ready = True
                n = _run_chunk(stage, workdir, chunk, lines)
            if bar is not None:
                bar.update(n)
        while pending:
            n = pending.popleft().get()
            if bar is not None:
                bar.update(n)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    if not chunks and parts.whole:
        fs, path = storage.url_to_fs(workdir)
        fs.rm(path, recursive=True)
        raise ValueError(f"{inputs} has no records: nothing to do")

    counts = [json.loads(storage.read_bytes(f"{workdir}/{c:08d}.stats.json")) for c in chunks]
    for suffix, url in ((".jsonl", out), (".dropped.jsonl", dropped_output(out))):
        tmp = storage.local_temp_for(url)
        with open(tmp, "wb") as dst:
            for c in chunks:
                dst.write(storage.read_bytes(f"{workdir}/{c:08d}{suffix}"))
        storage.commit(tmp, url)
    summary = {**_summary(stage, inputs, counts), "part": parts.to_list(), "made_from": _normal(made_from),
               "output_fingerprint": input_fingerprint(out)}
    storage.write_bytes_atomic(summary_url, json.dumps(summary, indent=1).encode())
    fs, path = storage.url_to_fs(workdir)
    fs.rm(path, recursive=True)
    _check(stage, summary, out)
    return summary


def _check(stage: Stage, summary: dict, out: str) -> None:
    check_kept(summary, out)
    if hasattr(stage, "check"):
        stage.check(summary, out)


def _summary(stage: Stage, inputs, counts: list[dict]) -> dict[str, Any]:
    skips, totals = SkipLog(), {}
    for c in counts:
        skips.merge(SkipLog.from_dict(c["skips"]))
        add_counts(totals, c["stage"])
    summary = {"stage": stage.name, "input": inputs if isinstance(inputs, str) else list(inputs),
               "records": sum(c["input"] for c in counts), "kept": sum(c["kept"] for c in counts),
               "dropped": dict(sorted(skips.counts.items())), "examples": skips.to_dict()["examples"]}
    if hasattr(stage, "summarize"):
        summary.update(stage.summarize(totals))
    notes = stage.warnings(summary) if hasattr(stage, "warnings") else []
    if notes:
        summary["warnings"] = notes
    return summary


def merge_summaries(summaries: list[dict]) -> dict[str, Any]:
    """One summary for the parts of a partitioned stage: records, kept, drops and examples summed,
    and the number of parts (stage-specific fields are left out)."""
    skips, merged = SkipLog(), {"records": 0, "kept": 0}
    for s in summaries:
        merged["records"] += s.get("records", 0)
        merged["kept"] += s.get("kept", 0)
        skips.merge(SkipLog(Counter(s.get("dropped", {})), {k: list(v) for k, v in s.get("examples", {}).items()}))
    if summaries:
        merged["stage"] = summaries[0].get("stage")
    merged["dropped"] = dict(sorted(skips.counts.items()))
    merged["examples"] = skips.to_dict()["examples"]
    merged["parts"] = len(summaries)
    return merged


def add_stage_arguments(parser, chunk_size: int = 5000, workers: bool = True) -> None:
    """The command-line options every stage tool shares: chunks, workers, parts, progress."""
    parser.add_argument("--chunk-size", type=int, default=chunk_size, help="lines per committed chunk (resume unit)")
    if workers:
        parser.add_argument("--workers", type=int, default=1, help="processes working on chunks")
    add_part_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_stage_from_args(stage: Stage, args) -> dict[str, Any]:
    """``run_stage`` with a tool's ``--input``/``--output`` and ``add_stage_arguments`` options."""
    return run_stage(stage, args.input, args.output, StageConfig(args.chunk_size, getattr(args, "workers", 1)),
                     Parts(args.part, args.num_parts), not args.no_progress)


def format_stage_summary(summary: dict[str, Any]) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    done = (f"already done ({summary.get('output', 'the output')} was made from this input with these settings; "
            "nothing recomputed): ") if summary.get("already_done") else ""
    empty = " (this part's share of the input holds no line)" if not summary["records"] else ""
    return (f"{summary['stage']}: {done}{summary['records']} records, kept {summary['kept']}, dropped: {drops}{empty}"
            + "".join(f"\nwarning: {note}" for note in summary.get("warnings", [])))
