"""Evaluation images kept out of training data: exclusion lists, and the stage that drops them.

    exclusion = load_exclusions(["builtin:vsr", "vsr/zeroshot_test.jsonl", "sugar-crepe/data/"])
    exclusion.match("/data/coco/train2017/000000397133.jpg")  # "vsr_images.txt: 397133" or None
    run_stage(ExcludingStage(SampleStage(cfg), exclusion), "triplets.jsonl", "samples.jsonl")

A sample whose image is on a list is dropped as ``excluded_eval_image`` (``drop_detail`` names
the list and the entry), so the stage runner counts it like any other drop and the curation
report shows it.

**Lists** (``load_list``), by what the path is:

- ``builtin:NAME``: a list shipped with the package (``sapretrain/curation/data/exclude/NAME_images.txt``,
  found with ``importlib.resources``): ``builtin:vsr`` holds the images of VSR's zero-shot
  train and dev files (see its header for the source and what it lacks).
- a folder: every ``*.json``, ``*.jsonl`` and ``*.txt`` in it (e.g. SugarCrepe's ``data/``).
- ``*.jsonl``: one JSON object per line with ``image`` (VSR), ``filename`` or ``file_name``.
- ``*.json``: SugarCrepe's ``{id: {"filename", ...}}``; DoTA's metadata ``{clip_id: {"anomaly_class",
  ...}}`` (the clip ids); COCO annotations (``images[].file_name``); or a list of strings.
- anything else: plain text, one entry per line; ``#`` starts a comment.

A list that cannot be read, has a malformed line or holds no entry is an error: a list read in
part would leak the rest.

**Matching** (``ExclusionList.match``). An entry is a **COCO image** when it is an integer id
(``397133``) or its file name (any folder, URL or tar member before it) is a COCO file name
(``000000397133.jpg``, ``COCO_val2014_000000397133.jpg``); such entries match any image reference
whose file name is a COCO file name of the same id, whatever folder, split or extension. COCO ids
are only read off 12-digit (or ``COCO_<split><year>_``) names, so the frame ``000052.jpg`` of a
DoTA clip or a 9-digit CC3M tar key never matches a COCO id. Every other entry is a **name** (a
DoTA clip id, a file name of another dataset): its path components must appear in a row among
the reference's (the last one also without its extension), so ``0qfbmt4G8Rw_000306`` matches every
frame under ``frames/0qfbmt4G8Rw_000306/`` and ``abc.jpg`` matches ``/data/x/abc.jpg``.

Not matched: the same photo under another dataset's name (Visual Genome holds COCO images under
VG ids; VG's ``image_data.json`` has their ``coco_id``, which the VG reader does not carry).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from typing import Any, Iterable, Iterator

from sapretrain import storage

DROP_REASON = "excluded_eval_image"
BUILTIN_PREFIX = "builtin:"
BUILTIN_PACKAGE = "sapretrain.curation"
BUILTIN_FOLDER = ("data", "exclude")
BUILTIN_SUFFIX = "_images.txt"
LIST_SUFFIXES = (".json", ".jsonl", ".txt")
JSONL_FIELDS = ("image", "filename", "file_name")

# COCO file names: 2014 "COCO_val2014_000000397133.jpg" and 2017 "000000397133.jpg" (12 digits).
_COCO_NAME = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Image references


def components(ref: str) -> list[str]:
    """The path components of an image reference: URL scheme and host dropped, tar members split."""
    text = str(ref).strip().replace("\\", "/")
    text = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*", "", text)  # s3://bucket, http://host
    return [c for c in re.split(r"[/#]", text) if c and c != "."]


def _stem(name: str) -> str:
    return PurePosixPath(name).stem if "." in name.lstrip(".") else name


def coco_id(ref: str | int) -> int | None:
    """The COCO image id of a file name or path (``.../000000397133.jpg`` → 397133), else None."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return ref
    parts = components(str(ref))
    match = _COCO_NAME.fullmatch(_stem(parts[-1])) if parts else None
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# The list


@dataclass
class ExclusionList:
    """Entries of one or more lists; ``match`` tells whether an image reference is on one."""

    coco: dict[int, str] = field(default_factory=dict)  # COCO image id -> "list: entry"
    names: dict[str, list[tuple[tuple[str, ...], str]]] = field(default_factory=dict)  # last stem -> (components, detail)
    sources: dict[str, int] = field(default_factory=dict)  # list -> entries read

    def add(self, entry: str | int, source: str) -> None:
        text = str(entry).strip()
        if not text:
            return
        detail = f"{source}: {text}"
        if re.fullmatch(r"\d+", text):
            self.coco.setdefault(int(text), detail)
            return
        parts = components(text)
        if not parts:
            return
        found = coco_id(text)
        if found is not None:
            self.coco.setdefault(found, detail)
            return
        self.names.setdefault(_stem(parts[-1]), []).append((tuple(parts[:-1]), detail))

    def __len__(self) -> int:
        return len(self.coco) + sum(len(v) for v in self.names.values())

    def match(self, ref: str | int | None) -> str | None:
        """``"list: entry"`` of the first entry ``ref`` (an image path, URL, tar member or COCO id) matches."""
        if ref is None or ref == "":
            return None
        found = coco_id(ref)
        if found is not None and found in self.coco:
            return self.coco[found]
        if isinstance(ref, int) or not self.names:
            return None
        parts = components(ref)
        for k, part in enumerate(parts):
            for before, detail in self.names.get(_stem(part), ()):
                if len(before) <= k and tuple(parts[k - len(before):k]) == before:
                    return detail
        return None

    def fingerprint(self) -> str:
        """A hash of the entries (stored with resumable stage outputs: another list is another run)."""
        keys = sorted(str(i) for i in self.coco) + sorted(
            "/".join((*before, stem)) for stem, entries in self.names.items() for before, _ in entries)
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {"lists": dict(self.sources), "coco_images": len(self.coco),
                "names": sum(len(v) for v in self.names.values())}


def builtin_lists() -> list[str]:
    """Names of the lists shipped with the package (``builtin:NAME``)."""
    folder = resources.files(BUILTIN_PACKAGE).joinpath(*BUILTIN_FOLDER)
    return sorted(p.name[:-len(BUILTIN_SUFFIX)] for p in folder.iterdir() if p.name.endswith(BUILTIN_SUFFIX))


def _builtin_text(name: str) -> str:
    resource = resources.files(BUILTIN_PACKAGE).joinpath(*BUILTIN_FOLDER, f"{name}{BUILTIN_SUFFIX}")
    if not resource.is_file():
        raise ValueError(f"no built-in exclusion list {BUILTIN_PREFIX}{name}; known: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in builtin_lists())}")
    return resource.read_text(encoding="utf-8")


def _text_entries(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            yield line


def _json_entries(doc: Any, where: str) -> list[str]:
    if isinstance(doc, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in doc):
        return [str(v) for v in doc]
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):  # COCO annotations
        names = [im.get("file_name") for im in doc["images"] if isinstance(im, dict)]
        if all(isinstance(n, str) for n in names) and len(names) == len(doc["images"]):
            return names
    elif isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        if all(isinstance(v.get("filename"), str) for v in doc.values()):  # SugarCrepe
            return [v["filename"] for v in doc.values()]
        if all("anomaly_class" in v for v in doc.values()):  # DoTA metadata: clip ids
            return list(doc)
    raise ValueError(f"{where}: not an exclusion list (expected SugarCrepe rows, DoTA metadata, "
                     "COCO annotations or a list of names)")


def _jsonl_entries(text: str, where: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {number}: not JSON ({e})") from None
        value = next((row.get(k) for k in JSONL_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if value is None:
            raise ValueError(f"{where} line {number}: no {'/'.join(JSONL_FIELDS)} field")
        yield value


def load_list(path: str) -> list[tuple[str, list[str]]]:
    """``[(list label, entries)]`` of one list argument (a folder gives one per file)."""
    path = str(path)
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        return [(f"{name}{BUILTIN_SUFFIX}", list(_text_entries(_builtin_text(name))))]
    fs, fpath = storage.url_to_fs(path)
    if not fs.exists(fpath):
        raise ValueError(f"exclusion list {path}: no such file or folder")
    if fs.isdir(fpath):
        files = sorted(f for f in fs.ls(fpath, detail=False) if f.endswith(LIST_SUFFIXES))
        if not files:
            raise ValueError(f"exclusion list folder {path}: no {', '.join(LIST_SUFFIXES)} files")
        return [item for f in files for item in load_list(f if storage.is_local(fs) else fs.unstrip_protocol(f))]
    with fs.open(fpath, "r", encoding="utf-8") as f:
        text = f.read()
    label = path.rstrip("/").rsplit("/", 1)[-1]
    if path.endswith(".jsonl"):
        return [(label, list(_jsonl_entries(text, path)))]
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        return [(label, _json_entries(doc, path))]
    return [(label, list(_text_entries(text)))]


def load_exclusions(paths: Iterable[str]) -> ExclusionList:
    """One ``ExclusionList`` from every list in ``paths``; a list without entries is an error."""
    exclusion = ExclusionList()
    for path in paths:
        for label, entries in load_list(path):
            if not entries:
                raise ValueError(f"exclusion list {label} ({path}) has no entries")
            for entry in entries:
                exclusion.add(entry, label)
            exclusion.sources[label] = exclusion.sources.get(label, 0) + len(entries)
    return exclusion


# --------------------------------------------------------------------------------------------
# The stage


class ExcludingStage:
    """``stage``, after dropping the records whose ``image`` is on ``exclusion`` (``excluded_eval_image``).

    Wraps the first per-record stage (samples), so excluded captions never become samples; the
    drop is counted in that stage's summary and ``OUT.dropped.jsonl``.
    """

    def __init__(self, stage, exclusion: ExclusionList):
        if not len(exclusion):
            raise ValueError("empty exclusion list")
        self.stage = stage
        self.exclusion = exclusion
        self.name = stage.name

    def setup(self) -> None:
        self.stage.setup()

    def fingerprint(self) -> dict:
        return {**self.stage.fingerprint(), "exclude": self.exclusion.fingerprint()}

    def process(self, records: list[dict]) -> list[dict]:
        dropped, rest = [], []
        for record in records:
            hit = self.exclusion.match(record.get("image"))
            if hit is None:
                rest.append(record)
            else:
                dropped.append({k: record[k] for k in ("id", "image", "caption") if k in record}
                               | {"drop_reason": DROP_REASON, "drop_detail": hit})
        return dropped + (self.stage.process(rest) if rest else [])
