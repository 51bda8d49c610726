"""Source readers: image–caption datasets → one stream of caption records (``captions.jsonl``).

    python tools/collect_captions.py --source coco --captions captions_train2017.json \
        --instances instances_train2017.json --image-root train2017 --output captions.jsonl

A caption record (one JSON object per line of the output)::

    {"id": "coco-139-371952", "image": "/data/coco/train2017/000000000139.jpg",
     "caption": "A woman stands in the dining area at the table.", "source": "coco",
     "width": 640, "height": 426,
     "objects": [{"name": "person", "box": [412.8, 157.61, 465.85, 295.62]}, ...]}

- ``id`` matches ``[A-Za-z0-9_-]+`` (it becomes a tar key downstream) and is derived from the
  source's own ids, so re-running gives the same ids: ``coco-<image_id>-<caption annotation id>``,
  ``vg-<image_id>-<region_id>``, ``<source>-<tar key>`` for tars, ``<source>-<file stem>-<row>``
  (or the sanitised ``id`` column/field) for CSV/TSV/JSONL, where ``<row>`` counts the file's
  lines from 0 after the header (a row's first line; blank lines count).
- ``image`` is a local path (made absolute), an fsspec URL, or for an image inside a tar a
  **tar-member reference** ``<tar path or URL>#<member name>[@<offset>:<size>]``, e.g.
  ``s3://bucket/cc3m/00012.tar#000120034.jpg@1536:48213`` (see ``tars.parse_ref``): ``offset`` is
  where the member's data starts in the (uncompressed) tar, ``size`` its length, so a later read
  is one ranged read. Tars read here give located references; references made from img2dataset's
  parquet (below) and from compressed tars have none (read through the tar's index or a scan).
- ``caption`` is the source text with runs of whitespace collapsed to one space.
- ``width``/``height`` (pixels of the referenced image) are present only when the source states
  them; ``objects`` only when the source has ground-truth boxes (COCO instances, VG objects); an
  empty list then means "the source has boxes, none for this image". Boxes are
  ``[x0, y0, x1, y1]`` pixels, clipped to the image when its size is known. COCO crowd boxes carry
  ``"crowd": true``. VG records also carry their region's ``region`` box, and only the objects at
  least ``min_object_overlap`` inside that region.

``wds`` (img2dataset output): for ``SHARD.tar``, the ``SHARD.parquet`` beside it gives the
captions without opening the tar (its ``success`` rows; ``KEY.<--image-ext>`` images, default jpg,
img2dataset's ``--encode_format``); without a parquet the tar is scanned and ``SHARD_stats.json``
gives the count of samples that never reached it.

Parts (``--part/--num-parts``, ``jobs.Parts``): part ``I`` of ``N`` reads the ``I``-th contiguous
share of the input and writes ``OUT`` with ``-partIIIII-ofNNNNN`` before its extension
(``Parts.output``). COCO and VG are split by image (all captions of an image in one part), tars by
input file; CSV/TSV/JSONL by input file when there are several, and a single plain file by byte
range (``jobs.plan_segments``: the rows that start in the part's bytes; a compressed file cannot be
entered in the middle and goes whole to part 0). Skips are counted by the part that owns the
input, so the parts' records and skip counts add up to those of one whole run, and read in part
order the parts' outputs are the whole run's output.

A byte range of a CSV is read one row per line, so a CSV whose quoted fields hold newlines cannot
be split by bytes: each piece of such a row is a line with an odd number of ``"`` and is counted
``bad_row`` (the message says so); run such a file as one part (or as several files). Rows are
numbered by the file's own lines in both cases: a part of a byte-split file scans the bytes before
its range for newlines (no parsing), so ids and messages are those of a whole run.

Skip reasons (``SkipLog``). A record is dropped for: ``missing_caption``, ``bad_caption`` (not
text), ``empty_caption``, ``bad_encoding``, ``missing_image``, ``unknown_image`` (caption of an
image id not in the file), ``bad_image_entry``, ``bad_annotation``, ``bad_row`` (CSV/TSV field
count or syntax), ``bad_json``, ``bad_encoding``, ``too_deep``, ``bad_number``, ``line_too_long``
(a JSONL line the shared reader ``sapretrain.jsonl`` refuses). Whole inputs: ``missing_input``, ``unreadable_tar``,
``truncated_tar`` (the records before the damage are kept, the incomplete last key is dropped),
``unreadable_parquet`` (the tar is scanned instead), ``unreadable_stats``. img2dataset samples that
are not in the tar: ``failed_to_download``, ``failed_to_resize`` (parquet rows or ``_stats.json``
counts), ``bad_status`` (a parquet status img2dataset does not write).
Only part of a record is dropped for: ``object_bad_box``, ``object_no_name``,
``object_unknown_category``, ``region_bad_box``, ``sidecar_bad_json`` (tar json side-car).
"""
from __future__ import annotations

import csv
import glob
import inspect
import io
import json
import math
import os
import re
import tarfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator

import fsspec
from fsspec.utils import infer_compression

from sapretrain import jsonl, storage, tars
from sapretrain.jobs import Parts, Segment, SkipLog, expand_inputs, iter_segment_lines, plan_segments

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("path", "image", "url")  # tried in this order when no image column is named
CSV_FIELD_LIMIT = 2**31 - 1
Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Small shared helpers


def clean_caption(value: Any, skips: SkipLog, where: str) -> str | None:
    """The caption with whitespace collapsed, or None (counted) when it cannot be used."""
    if value is None:
        skips.add("missing_caption", where)
        return None
    if not isinstance(value, str):
        skips.add("bad_caption", f"{where}: {type(value).__name__}, not text")
        return None
    text = " ".join(value.split())
    if not text:
        skips.add("empty_caption", where)
        return None
    if _has_surrogates(text):
        skips.add("bad_encoding", f"{where}: not valid UTF-8")
        return None
    return text


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def safe_id(value: Any) -> str:
    """``value`` as a tar-key-safe id part: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(value)).strip("_") or "_"


def positive_int(value: Any) -> int | None:
    """An int > 0 from an int, integral float or numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def _numbers(values) -> bool:
    """Every value a finite int or float (not a bool)."""
    for v in values:
        kind = type(v)
        if kind is float:
            if not math.isfinite(v):
                return False
        elif kind is not int and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            return False
    return True


def xywh_to_xyxy(x: Any, y: Any, w: Any, h: Any, width: int | None = None, height: int | None = None):
    """``[x0, y0, x1, y1]`` pixels from COCO/VG ``x, y, w, h``; see ``clip_box``."""
    if not _numbers((x, y, w, h)):
        return None
    return clip_box([x, y, x + w, y + h], width, height)


def clip_box(box: Any, width: int | None = None, height: int | None = None) -> list[float] | None:
    """``box`` clipped to the image when its size is given, or None if it is not 4 numbers with area."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not _numbers(box):
        return None
    x0, y0, x1, y1 = box
    if width is not None:
        x0, x1 = max(0, x0), min(width, x1)
    if height is not None:
        y0, y1 = max(0, y0), min(height, y1)
    if not (x0 < x1 and y0 < y1):
        return None
    return [round(float(v), 2) for v in (x0, y0, x1, y1)]


def inside_fraction(box: list[float], region: list[float]) -> float:
    """Fraction of ``box``'s area that lies inside ``region``."""
    iw = min(box[2], region[2]) - max(box[0], region[0])
    ih = min(box[3], region[3]) - max(box[1], region[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((box[2] - box[0]) * (box[3] - box[1]))


def absolute(ref: str) -> str:
    """Local paths absolute (output lines must not depend on the working directory); URLs as given."""
    return ref if storage.is_url(ref) else os.path.abspath(ref)


def resolve_image(value: str, base: str) -> str:
    return absolute(storage.join(base, value))


def make_record(id_: str, image: str, caption: str, source: str, width=None, height=None, objects=None, **extra):
    record: Record = {"id": id_, "image": image, "caption": caption, "source": source}
    if width is not None and height is not None:
        record["width"], record["height"] = width, height
    if objects is not None:
        record["objects"] = objects
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def load_json(url: str) -> Any:
    """A whole JSON document (COCO/VG annotation files are single documents)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # syntax, not UTF-8, absurd nesting: say which file
        raise ValueError(f"{url} is not a readable JSON document ({type(e).__name__}: {str(e)[:200]})") from None


def _stem(url: str) -> str:
    name = PurePosixPath(url.rstrip("/")).name
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".jsonl", ".json", ".csv", ".tsv", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return safe_id(name)


# ---------------------------------------------------------------------------------------------
# COCO


def read_coco(
    captions: str,
    image_root: str,
    instances: str | None = None,
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "coco",
) -> Iterator[Record]:
    """One record per caption of a COCO ``captions_*.json``; boxes from ``instances_*.json``."""
    doc = load_json(captions)
    images = doc.get("images") if isinstance(doc, dict) else None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"{captions}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    known = {img.get("id") for img in images if isinstance(img, dict)}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    my_annotations = parts.share(len(annotations))  # a caption of no known image: counted by one part
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann:
            if index in my_annotations:
                skips.add("bad_annotation", f"{captions}: caption annotation #{index} has no image_id")
        elif ann["image_id"] not in known:
            if index in my_annotations:
                skips.add("unknown_image", f"caption {ann.get('id')}: image {ann['image_id']!r} not in 'images'")
        else:
            by_image[ann["image_id"]].append(ann)
    categories, boxes = _coco_instances(instances) if instances else ({}, {})

    root = absolute(image_root)
    for index in parts.share(len(images)):
        img = images[index]
        image_id = img.get("id") if isinstance(img, dict) else None
        anns = by_image.pop(image_id, [])
        if not isinstance(img.get("file_name") if isinstance(img, dict) else None, str):
            for _ in anns or [None]:  # each caption of the image is lost
                skips.add("bad_image_entry", f"{captions}: images[{index}] has no file_name")
            continue
        width, height = positive_int(img.get("width")), positive_int(img.get("height"))
        objects = None
        if instances and anns:
            objects = _coco_objects(boxes.get(image_id, []), categories, width, height, skips, image_id)
        for number, ann in enumerate(anns):
            caption = clean_caption(ann.get("caption"), skips, f"coco caption {ann.get('id')} of image {image_id}")
            if caption is None:
                continue
            yield make_record(
                f"coco-{safe_id(image_id)}-{safe_id(ann.get('id', number))}",
                storage.join(root, img["file_name"]),
                caption,
                source_name,
                width,
                height,
                objects,
            )


def _coco_instances(url: str) -> tuple[dict[Any, str], dict[Any, list[dict]]]:
    doc = load_json(url)
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{url}: not a COCO instances file (needs an 'annotations' list)")
    categories = {c.get("id"): c.get("name") for c in doc.get("categories", []) if isinstance(c, dict)}
    boxes: dict[Any, list[dict]] = defaultdict(list)
    for ann in doc["annotations"]:
        if isinstance(ann, dict):
            # Only what a box needs: the segmentation polygons (most of the file) are freed.
            boxes[ann.get("image_id")].append({k: ann.get(k) for k in ("category_id", "bbox", "iscrowd")})
    return categories, boxes


def _coco_objects(anns: list[dict], categories: dict, width, height, skips: SkipLog, image_id) -> list[dict]:
    objects = []
    for ann in anns:
        name = categories.get(ann.get("category_id"))
        if not isinstance(name, str) or not name:
            skips.add("object_unknown_category", f"image {image_id}: category {ann.get('category_id')!r}")
            continue
        bbox = ann.get("bbox")
        box = xywh_to_xyxy(*bbox, width, height) if isinstance(bbox, list) and len(bbox) == 4 else None
        if box is None:
            skips.add("object_bad_box", f"coco image {image_id}: {name} bbox {bbox!r} has no area in the image")
            continue
        obj = {"name": name, "box": box}
        if ann.get("iscrowd"):
            obj["crowd"] = True
        objects.append(obj)
    return objects


# ---------------------------------------------------------------------------------------------
# Visual Genome


def read_vg(
    regions: str,
    image_root: str,
    objects: str | None = None,
    image_data: str | None = None,
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "vg",
    min_object_overlap: float = 0.5,
) -> Iterator[Record]:
    """One record per region phrase of ``region_descriptions.json``.

    Images are ``<image_root>/<dir>/<image_id>.jpg`` with ``<dir>`` (``VG_100K``/``VG_100K_2``)
    from ``image_data.json``'s url, as the official zips unpack; ``<image_root>/<image_id>.jpg``
    without it.
    """
    entries = load_json(regions)
    if not isinstance(entries, list):
        raise ValueError(f"{regions}: not a VG region_descriptions file (needs a list of images)")
    info: dict[Any, dict] = {}
    if image_data:
        for item in load_json(image_data):
            if isinstance(item, dict):
                info[item.get("image_id", item.get("id"))] = item
    raw_objects: dict[Any, list] = {}
    if objects:
        for item in load_json(objects):
            if isinstance(item, dict):
                raw_objects[item.get("image_id", item.get("id"))] = item.get("objects") or []

    root = absolute(image_root)
    for index in parts.share(len(entries)):
        entry = entries[index]
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None or not isinstance(entry.get("regions"), list):
            skips.add("bad_image_entry", f"{regions}: entry #{index} has no id or regions")
            continue
        meta = info.get(image_id, {})
        width, height = positive_int(meta.get("width")), positive_int(meta.get("height"))
        url = meta.get("url")
        rel = "/".join(url.rstrip("/").split("/")[-2:]) if isinstance(url, str) and "/" in url else f"{image_id}.jpg"
        image = storage.join(root, rel)
        image_objects = None
        if objects:
            image_objects = _vg_objects(raw_objects.get(image_id, []), width, height, skips, image_id)
        for number, region in enumerate(entry["regions"]):
            if not isinstance(region, dict):
                skips.add("bad_annotation", f"vg image {image_id}: region #{number} is not an object")
                continue
            region_id = region.get("region_id", region.get("id", number))
            caption = clean_caption(region.get("phrase"), skips, f"vg region {region_id} of image {image_id}")
            if caption is None:
                continue
            xywh = (region.get(k) for k in ("x", "y", "width", "height"))
            box = xywh_to_xyxy(*xywh, width, height)
            if box is None:
                skips.add("region_bad_box", f"vg region {region_id}: box has no area in the image")
            kept = image_objects
            if kept is not None and box is not None and min_object_overlap > 0:
                kept = [o for o in kept if inside_fraction(o["box"], box) >= min_object_overlap]
            id_ = f"vg-{safe_id(image_id)}-{safe_id(region_id)}"
            yield make_record(id_, image, caption, source_name, width, height, kept, region=box)


def _vg_objects(raw: list, width, height, skips: SkipLog, image_id) -> list[dict]:
    out = []
    for obj in raw:
        if not isinstance(obj, dict):
            continue
        names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
        name = names[0] if isinstance(names, list) and names else None
        if not isinstance(name, str) or not name.strip():
            skips.add("object_no_name", f"vg image {image_id}: object {obj.get('object_id')}")
            continue
        box = xywh_to_xyxy(obj.get("x"), obj.get("y"), obj.get("w"), obj.get("h"), width, height)
        if box is None:
            skips.add("object_bad_box", f"vg image {image_id}: object {obj.get('object_id')} has no area in the image")
            continue
        out.append({"name": " ".join(name.split()), "box": box})
    return out


# ---------------------------------------------------------------------------------------------
# img2dataset-style WebDataset tars


def read_wds(
    inputs: str | list[str],
    image_ext: str = "jpg",
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "wds",
) -> Iterator[Record]:
    """One record per sample of img2dataset tars (``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json``).

    Split by input file. For each tar, img2dataset's ``SHARD.parquet`` beside it is read when it
    exists (``read_shard_parquet``: captions without opening the tar; images named
    ``KEY.<image_ext>``, img2dataset's ``--encode_format``); else the tar is streamed
    (``read_tar``: no seeking, works the same on object storage; refs carry member locations) and
    ``SHARD_stats.json`` (when present) counts the downloads that never reached the tar.
    """
    if not re.fullmatch(r"[A-Za-z0-9]+", image_ext):
        raise ValueError(f"--image-ext {image_ext!r}: an extension such as jpg, png or webp")
    urls = expand_inputs(inputs)
    for index in parts.share(len(urls)):
        url = absolute(urls[index])
        parquet = shard_sidecar(url, ".parquet")
        if parquet is not None and storage.exists(parquet):
            if not storage.exists(url):
                skips.add("missing_input", f"{url}: no such tar (its parquet {parquet} lists it)")
                continue
            rows = _parquet_rows(parquet, skips)
            if rows is not None:
                yield from read_shard_parquet(url, rows, image_ext.lower(), skips, source_name, parquet)
                continue
        yield from read_tar(url, skips, source_name)
        stats = shard_sidecar(url, "_stats.json")
        if stats is not None and storage.exists(stats):
            _count_failed_downloads(stats, skips)


# img2dataset's per-shard parquet: every sample of the shard's input, downloaded or not. ``status``
# is "success" (the sample is in the tar as KEY.<encode_format>), "failed_to_download" or
# "failed_to_resize" (not in the tar); ``error_message`` says why.
PARQUET_COLUMNS = ("key", "caption", "status", "error_message", "url", "width", "height")
FAILED_STATUSES = ("failed_to_download", "failed_to_resize")  # also the keys of SHARD_stats.json


def shard_sidecar(tar_url: str, suffix: str) -> str | None:
    """``00000.parquet`` / ``00000_stats.json`` beside ``00000.tar`` (img2dataset's names)."""
    for tar_suffix in tars.TAR_SUFFIXES:
        if tar_url.lower().endswith(tar_suffix):
            return tar_url[: -len(tar_suffix)] + suffix
    return None


def _parquet_rows(url: str, skips: SkipLog) -> list[dict] | None:
    """The rows of a shard's parquet (the columns a record needs), or None (counted
    ``unreadable_parquet``: the tar is scanned instead). A shard's parquet is small (~1 MB for
    10,000 samples), so it is read whole: nothing is yielded from a file that fails half-way."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{url}: reading img2dataset parquet needs pyarrow "
                          "(pip install 'sapretrain[curation]')") from None
    try:
        with storage.retry_transient(lambda: fsspec.open(url, "rb").open(), url) as f:
            table = pq.ParquetFile(f)
            columns = [c for c in PARQUET_COLUMNS if c in table.schema_arrow.names]
            if "key" not in columns or "status" not in columns:
                raise ValueError(f"no 'key'/'status' column (columns: {table.schema_arrow.names})")
            return table.read(columns=columns).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        skips.add("unreadable_parquet", f"{url}: {type(e).__name__}: {e}; the tar is scanned instead")
        return None


def read_shard_parquet(tar_url: str, rows: list[dict], image_ext: str, skips: SkipLog, source_name: str,
                       where: str = "") -> Iterator[Record]:
    """The caption records of one img2dataset shard from its parquet ``rows``; the tar is not opened.

    Only ``status == "success"`` rows are in the tar; the others are counted by status
    (``failed_to_download``, ``failed_to_resize``; ``bad_status`` for any other value) with their
    ``error_message``. Image references have no location (``tar#KEY.jpg``): finding the members'
    offsets would mean reading the tar's headers, and on object storage a header-only pass costs
    one request per member, about what the whole-tar scan this path avoids costs. The first later
    read of a member builds the tar's index instead (once per tar per process), for the tars whose
    images are read at all."""
    where = where or tar_url
    for number, row in enumerate(rows):
        key, status = row.get("key"), row.get("status")
        if status != "success":
            reason = status if status in FAILED_STATUSES else "bad_status"
            skips.add(reason, f"{where} row {number} (key {key!r}): {row.get('error_message') or status!r}")
            continue
        if not isinstance(key, str) or not key.strip():
            skips.add("missing_image", f"{where} row {number}: no key")
            continue
        caption = clean_caption(row.get("caption"), skips, f"{where} row {number} (key {key})")
        if caption is None:
            continue
        url = row.get("url")
        yield make_record(
            f"{safe_id(source_name)}-{safe_id(key)}",
            tars.make_ref(tar_url, f"{key}.{image_ext}"),
            caption,
            source_name,
            positive_int(row.get("width")),
            positive_int(row.get("height")),
            url=url if isinstance(url, str) else None,
        )


def _count_failed_downloads(url: str, skips: SkipLog) -> None:
    """The samples img2dataset could not download or resize (not in the tar), from ``_stats.json``."""
    try:
        stats = json.loads(storage.read_bytes(url))
    except (OSError, ValueError) as e:
        skips.add("unreadable_stats", f"{url}: {type(e).__name__}: {e}")
        return
    if not isinstance(stats, dict):
        skips.add("unreadable_stats", f"{url}: not a JSON object")
        return
    for reason in FAILED_STATUSES:
        count = stats.get(reason)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            skips.add(reason, f"{url}: {reason} {count} of {stats.get('count')} samples")
            skips.counts[reason] += count - 1  # one count per sample, one example per shard


def read_tar(url: str, skips: SkipLog, source_name: str) -> Iterator[Record]:
    """The caption records of one tar (``tars.records``: webdataset's key rule); image references
    carry the member's location (``tar#member@offset:size``, uncompressed tars)."""
    kept, seen, key = 0, 0, None

    def value(member: tars.Member) -> bytes | str | None:
        nonlocal seen, key
        seen, key = seen + 1, member.key
        if member.ext in ("txt", "json"):
            return member.read()
        if member.ext in IMAGE_EXTS:
            member.read()  # reading the data (not skipping it) is what detects an image cut short
            return tars.make_ref(url, member.name, member.offset, member.size)
        return None

    try:
        with fsspec.open(url, "rb") as f:
            for group in tars.records(f, url, read=value):
                record = _tar_record(url, group, skips, source_name)
                if record is not None:
                    kept += 1
                    yield record
    except FileNotFoundError as e:
        skips.add("missing_input", f"{url}: {e}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if (e.members if isinstance(e, tars.BadTar) else seen) == 0:
            skips.add("unreadable_tar", f"{url}: {e}")
        else:
            skips.add("truncated_tar", f"{url}: {e} ({kept} records kept, key {key!r} dropped)")


def _tar_record(url: str, group: dict, skips: SkipLog, source_name: str) -> Record | None:
    """One caption record from a tar record (``txt``/``json`` bytes, image extensions -> reference)."""
    key = group["__key__"]
    where = f"{url}#{key}"
    image = next((group[ext] for ext in group if ext in IMAGE_EXTS), None)
    meta: dict = {}
    if "json" in group:
        try:
            meta = jsonl.parse_record(group["json"])
        except jsonl.BadLine as e:
            skips.add("sidecar_bad_json", f"{where}.json: {e}")
            meta = {}
    if image is None:
        skips.add("missing_image", f"{where}: no image member")
        return None
    if "txt" in group:
        try:
            text: Any = group["txt"].decode("utf-8")
        except UnicodeDecodeError:
            skips.add("bad_encoding", f"{where}.txt: not valid UTF-8")
            return None
    else:
        text = meta.get("caption")
    caption = clean_caption(text, skips, where)
    if caption is None:
        return None
    url_meta = meta.get("url")
    return make_record(
        f"{safe_id(source_name)}-{safe_id(key)}",
        image,
        caption,
        source_name,
        positive_int(meta.get("width")),
        positive_int(meta.get("height")),
        url=url_meta if isinstance(url_meta, str) else None,
    )


# ---------------------------------------------------------------------------------------------
# CSV / TSV / JSONL


def read_csv(
    inputs: str | list[str],
    image_root: str | None = None,
    caption_column: str = "caption",
    image_column: str | None = None,
    id_column: str | None = None,
    columns: str | list[str] | None = None,
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "csv",
    delimiter: str = ",",
) -> Iterator[Record]:
    """One record per row. The first row names the columns unless ``columns`` does (headerless
    files such as CC3M's ``caption<TAB>url`` TSV). Relative paths resolve against ``image_root``,
    else the file's directory. CSV follows RFC 4180 quoting; TSV has none (a field holds no tab).

    Streams row by row; parts take a share of the files, or of a single file's bytes (module doc).
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    for segment in table_segments(inputs, parts):
        url = segment.url
        base = image_root if image_root is not None else storage.parent(url)
        whole = segment.start == 0 and segment.end is None
        rows = _csv_file_rows(url, delimiter, quoting) if whole else _csv_segment_rows(segment, delimiter, quoting)
        if columns:
            header_line, header = 0, list(columns)
        else:  # the file's first row, whichever part reads it
            first = rows if segment.start == 0 else _csv_file_rows(url, delimiter, quoting)
            header_line, header = next(first, (0, None))
            if first is not rows:
                first.close()
            if header is None:
                continue
            if isinstance(header, csv.Error):
                raise ValueError(f"{url}: unreadable header row ({header})")
        header = [h.strip().lstrip("\ufeff") for h in header]
        image_col = image_column or next((c for c in IMAGE_COLUMNS if c in header), None)
        for needed, what in ((caption_column, "caption"), (image_col, "image")):
            if needed not in header:
                name = needed or "/".join(IMAGE_COLUMNS)
                raise ValueError(f"{url}: no {what} column {name!r} (columns: {header})")
        if id_column is not None and id_column not in header:
            raise ValueError(f"{url}: no id column {id_column!r} (columns: {header})")
        stem = _stem(url)
        for line, row in rows:
            where = f"{url} line {line}"
            if isinstance(row, csv.Error):
                skips.add("bad_row", f"{where}: {row}")
                continue
            if len(row) != len(header):
                skips.add("bad_row", f"{where}: {len(row)} fields, header has {len(header)}")
                continue
            values = dict(zip(header, row))
            names = (caption_column, image_col, id_column)
            default_id = f"{source_name}-{stem}-{line - header_line - 1}"
            record = _table_record(values, names, base, default_id, source_name, skips, where)
            if record is not None:
                yield record


def table_segments(inputs: str | list[str], parts: Parts) -> list[Segment]:
    """This part's share of CSV/TSV/JSONL inputs: whole files when there are several, a byte range
    when there is one (a compressed one whole, to part 0)."""
    urls = expand_inputs(inputs)
    if len(urls) == 1:
        return plan_segments(urls, parts)
    return [Segment(urls[i]) for i in parts.share(len(urls))]


def lines_before(segment: Segment) -> int:
    """How many lines of its file come before the first line that starts in ``segment``: a scan of
    the bytes before it for newlines (no parsing), so a byte range numbers lines as a whole run."""
    if segment.start == 0:
        return 0
    count, left, last = 0, segment.start, b"\n"
    with fsspec.open(segment.url, "rb") as f:
        while left > 0:
            piece = f.read(min(left, 1 << 24))
            if not piece:
                break
            count, left, last = count + piece.count(b"\n"), left - len(piece), piece[-1:]
    return count + (last != b"\n")  # started mid-line: that line is the previous part's


def _nonblank(row: list[str]) -> bool:
    return bool(row) and (len(row) > 1 or bool(row[0].strip()))


def _csv_file_rows(url: str, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """``(the row's first line number, fields or csv.Error)`` of a whole CSV/TSV file (RFC 4180: a
    quoted field may hold newlines); blank rows left out."""
    with fsspec.open(url, "rb", compression="infer") as raw:
        # surrogateescape: a row with bad bytes is skipped (bad_encoding), not the whole file.
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter, quoting=quoting)
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield first, e
                continue
            if _nonblank(row):
                yield first, row


def _csv_segment_rows(segment: Segment, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """``_csv_file_rows`` of a byte range: one row per line, so a line with an odd number of quotes
    (a piece of a row whose quoted field holds a newline) is a csv.Error."""
    before = lines_before(segment)
    for number, line in iter_segment_lines(segment):
        if isinstance(line, jsonl.BadLine):
            yield before + number, csv.Error(line.detail)
            continue
        if quoting != csv.QUOTE_NONE and line.count('"') % 2:
            yield before + number, csv.Error("a quoted field holds a newline: a CSV split by bytes is read one row "
                                             "per line; run this file as one part")
            continue
        try:
            row = next(csv.reader([line], delimiter=delimiter, quoting=quoting), [])
        except csv.Error as e:
            yield before + number, e
            continue
        if _nonblank(row):
            yield before + number, row


def read_tsv(
    inputs: str | list[str],
    image_root: str | None = None,
    caption_column: str = "caption",
    image_column: str | None = None,
    id_column: str | None = None,
    columns: str | list[str] | None = None,
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "tsv",
) -> Iterator[Record]:
    """``read_csv`` with tab-separated, unquoted columns."""
    return read_csv(
        inputs, image_root, caption_column, image_column, id_column, columns,
        skips=skips, parts=parts, source_name=source_name, delimiter="\t",
    )  # fmt: skip


def _table_record(values: dict, names: tuple, base: str, default_id: str, source_name: str, skips: SkipLog, where: str):
    """The record of one CSV row or JSONL line; ``names`` = (caption, image, id or None) columns."""
    caption_column, image_column, id_column = names
    caption = clean_caption(values.get(caption_column), skips, where)
    if caption is None:
        return None
    image = values.get(image_column)
    if not isinstance(image, str) or not image.strip():
        skips.add("missing_image", f"{where}: empty {image_column!r}")
        return None
    if _has_surrogates(image):
        skips.add("bad_encoding", f"{where}: image reference is not valid UTF-8")
        return None
    own_id = values.get(id_column) if id_column else None
    if own_id is not None and not (isinstance(own_id, (str, int)) and str(own_id).strip()):
        own_id = None
    return make_record(
        f"{safe_id(source_name)}-{safe_id(own_id)}" if own_id is not None else safe_id(default_id),
        resolve_image(image.strip(), base),
        caption,
        source_name,
        positive_int(values.get("width")),
        positive_int(values.get("height")),
    )


def read_jsonl(
    inputs: str | list[str],
    image_root: str | None = None,
    caption_column: str = "caption",
    image_column: str | None = None,
    id_column: str | None = None,
    *,
    skips: SkipLog,
    parts: Parts = Parts(),
    source_name: str = "jsonl",
) -> Iterator[Record]:
    """One record per line: ``caption`` and the first of ``path``/``image``/``url`` (or the named
    fields); ``width``/``height`` and ``objects`` are kept when valid. Parts as ``read_csv``."""
    for segment in table_segments(inputs, parts):
        url = segment.url
        base = image_root if image_root is not None else storage.parent(url)
        stem, before = _stem(url), lines_before(segment)
        for number, raw in iter_segment_lines(segment):
            number += before
            where = f"{url} line {number}"
            try:
                line = jsonl.parse_record(raw)
            except jsonl.BadLine as e:  # the shared reader's reasons: bad_json, bad_encoding, too_deep ...
                skips.add(e.reason, f"{where}: {e.detail}")
                continue
            image_col = image_column or next((c for c in IMAGE_COLUMNS if c in line), IMAGE_COLUMNS[0])
            names = (caption_column, image_col, id_column or "id")
            default_id = f"{source_name}-{stem}-{number - 1}"
            record = _table_record(line, names, base, default_id, source_name, skips, where)
            if record is None:
                continue
            if isinstance(line.get("objects"), list):
                size = record.get("width"), record.get("height")
                record["objects"] = _clean_objects(line["objects"], *size, skips, where)
            yield record


def _clean_objects(objects: list, width, height, skips: SkipLog, where: str) -> list[dict]:
    out = []
    for obj in objects:
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or not name.strip():
            skips.add("object_no_name", f"{where}: {obj!r}")
            continue
        box = clip_box(obj.get("box"), width, height)
        if box is None:
            skips.add("object_bad_box", f"{where}: {name} box {obj.get('box')!r} has no area in the image")
            continue
        out.append({**obj, "name": " ".join(name.split()), "box": box})
    return out


# ---------------------------------------------------------------------------------------------
# Registry and the collect stage

READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "coco": read_coco,
    "vg": read_vg,
    "wds": read_wds,
    "csv": read_csv,
    "tsv": read_tsv,
    "jsonl": read_jsonl,
}


@dataclass
class CollectReport:
    output: str
    records: int = 0
    skips: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0
    already_done: bool = False


def reader_options(source: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``source``'s reader takes, from ``options`` (None = not given).

    Raises ValueError naming the flag when one does not apply to the source or a required one is
    missing, so a typo'd flag cannot be silently ignored.
    """
    if source not in READERS:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(READERS)}")
    params = inspect.signature(READERS[source]).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = [k for k in given if k not in params or k in ("skips", "parts")]
    if wrong:
        raise ValueError(f"{', '.join(_flag(k) for k in wrong)} does not apply to --source {source}")
    required = [k for k, p in params.items() if p.default is inspect.Parameter.empty and p.kind != p.KEYWORD_ONLY]
    missing = [k for k in required if k not in given]
    if missing:
        raise ValueError(f"--source {source} needs {', '.join(_flag(k) for k in missing)}")
    return given


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def collect(
    source: str,
    output: str,
    options: dict[str, Any],
    parts: Parts = Parts(),
    limit: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> CollectReport:
    """Run ``source``'s reader over this part and write its records to ``parts.output(output)``
    (JSONL, ``.gz`` etc. by suffix).

    The output appears only when complete (temporary file, then commit), so a killed run leaves
    nothing half-written. ``OUT.done.json`` records what it was made from (source, options, part,
    limit, and the size and end hashes of each named input file) and the output's own fingerprint;
    a re-run finds it "already done" only when both still match, and refuses an ``OUT`` without
    that record or made otherwise (``ValueError``) unless ``overwrite``. Writing no record at all
    (an empty input, every row skipped) raises ``ValueError`` with the skip counts, after writing.
    """
    from tqdm import tqdm

    from sapretrain.curation.stage import finished_summary, input_fingerprint

    kwargs = reader_options(source, options)
    output = parts.output(str(output))
    report = CollectReport(output)
    files = {k: input_fingerprint(v) for k, v in sorted(kwargs.items())
             if k in ("captions", "instances", "regions", "objects", "image_data") and isinstance(v, str)}
    if kwargs.get("inputs"):  # shard lists can be long and remote: their sizes only (one HEAD each)
        files["inputs"] = {url: _size_or_none(url) for url in expand_inputs(kwargs["inputs"])}
    made_from = {"source": source, "options": {k: v for k, v in sorted(kwargs.items())}, "files": files,
                 "part": parts.to_list(), "limit": limit}
    marker = f"{output}.done.json"
    if not overwrite and storage.exists(output):
        if not storage.exists(marker):
            raise ValueError(f"{output} exists, but no finished collect run recorded what it was made from "
                             f"(no {marker}): it is not taken as done; delete it or pass --overwrite")
        done = finished_summary(output, made_from, marker)
        report.already_done, report.records = True, done.get("records", 0)
        _check_collected(done.get("records", 0), done.get("skips", {}), output)
        return report
    start = time.time()
    _remove_stale_temps(output)
    tmp = storage.local_temp_for(output)
    try:
        with fsspec.open(tmp, "wt", encoding="utf-8", compression=infer_compression(output)) as f, tqdm(
            desc=f"{source}{parts.label()}", unit=" rec", disable=not progress, total=limit
        ) as bar:
            for record in READERS[source](**kwargs, skips=report.skips, parts=parts):
                if limit is not None and report.records >= limit:
                    break
                try:
                    f.write(jsonl.dumps(record) + "\n")
                except UnicodeEncodeError:
                    report.skips.add("bad_encoding", f"{record.get('id')}: not valid UTF-8")
                    continue
                report.records += 1
                bar.update()
                if limit is not None and report.records >= limit:
                    break
        if not report.records:  # no output and no marker: a rerun with other options is not refused
            os.unlink(tmp)
            _check_collected(0, dict(sorted(report.skips.counts.items())), output)
        storage.commit(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    report.seconds = time.time() - start
    counts = dict(sorted(report.skips.counts.items()))
    storage.write_bytes_atomic(marker, json.dumps({
        "records": report.records, "skips": counts, "made_from": json.loads(json.dumps(made_from, sort_keys=True)),
        "output_fingerprint": input_fingerprint(output)}, indent=1).encode())
    _check_collected(report.records, counts, output)
    return report


def _size_or_none(url: str) -> int | None:
    fs, path = storage.url_to_fs(url)
    try:
        return int(fs.size(path))
    except (OSError, TypeError):  # missing: the reader counts it as missing_input
        return None


def _check_collected(records: int, skips: dict, output: str) -> None:
    if not records:
        why = ", ".join(f"{k} {v}" for k, v in skips.items()) or "the input has no rows"
        raise ValueError(f"no records written to {output}: nothing to do ({why})")


def _remove_stale_temps(output: str) -> None:
    """Temporary files a killed run of this same output left next to it (local outputs only)."""
    fs, path = storage.url_to_fs(output)
    if storage.is_local(fs):
        for stale in glob.glob(glob.escape(path) + ".tmp.*"):
            os.unlink(stale)


def format_report(report: CollectReport) -> str:
    if report.already_done:
        return (f"already done: {report.output} already exists ({report.records} records), made from these inputs "
                "with these options; nothing to do (--overwrite to redo)")
    counts = report.skips.counts
    lines = [
        f"output: {report.output}",
        f"records written: {report.records} in {report.seconds:.1f} s",
        f"skipped: {sum(counts.values())}" if counts else "skipped: 0",
    ]
    for reason, n in sorted(counts.items()):
        lines.append(f"  {reason}: {n}   e.g. {report.skips.examples[reason][0]}")
    return "\n".join(lines)
