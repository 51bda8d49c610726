"""Regions of interest: subject and object boxes for triplet samples (SA-CLIP §2.1, App. A).

    cfg = load_roi_config("configs/curation/rois.yaml", ["detector.weights=yolov8x.pt"])
    run_stage(RoiStage(cfg), "samples.jsonl", "with_boxes.jsonl", StageConfig(chunk_size=5000))

Input: one triplet-level sample per line, ``{"id", "image", "width"?, "height"?, "caption",
"triplet": {"subj", "rel", "obj"}, "objects"?, ...}`` (parts ``{"text", "start", "end", "head"?}``,
``objects`` ``[{"name", "box": [x0, y0, x1, y1], "crowd"?}]`` as written by ``sources.py``).
Output: the same plus ``"boxes": {"subj": [x0, y0, x1, y1], "obj": [...]}`` (pixels, the
curated-manifest field) and ``"box_source": "gt" | "detector"``; ``width``/``height`` are added
when the image had to be opened and the record lacked them.

**Nouns** (``sapretrain.boxes.NounMatcher``). A part's noun is its head lemma (``head``, else the last word of
``text``), singular and lowercase; when the words before it form a known multi-word name
("hot dog", "teddy bear", "cell phone") that phrase is the noun instead. Object and detector
class names get the same normalisation. A part matches a box's name at level

- 0: same noun ("shirt" / VG "white shirt"; "man" / "men"),
- 1: same COCO category through ``synonyms`` ("man" / "person", "puppy" / "dog", VG "guy" / "man"),
- 2: through ``hypernyms`` ("animal" / "dog", "vehicle" / "bus"),

and not at all otherwise. Crowd boxes and boxes under ``min_box_size`` after clipping to the image
are never candidates.

**Choice** (``sapretrain.boxes.choose_boxes``, rule ``nouns``). Among all (subject box, object box) pairs of candidates that are not one instance
(not the same box, IoU < ``same_instance_iou``), the first by (sum of levels, modifier fit,
subject level, larger subject box, larger object box) wins: the best-matching names, then the
names whose other words the parts say (a detector's "red cube" for "the red block", not "blue
cube"; COCO's names have no such words), then the largest subject box, then the largest object
box left. So when both parts name one category ("a man next to a
woman") the subject gets the largest instance and the object the next largest; the caption does
not say which is which, and using the relation's direction to decide would leak the label into
the boxes. ``same_category: false`` drops such samples instead.

**Sources.** Records with ``objects`` (COCO, VG) use them; when a part has no ground-truth box the
sample is dropped, or, with ``detector.fallback_for_gt_sources``, both boxes come from the
detector (one source per sample, so ``box_source`` is one value). Records without ``objects`` use
the detector (``detector.enabled``). Detections are made once per image per chunk, in batches of
``detector.batch`` images; for YOLO-World weights (name contains "world") the classes of each
batch are set to the nouns of its samples. Class names are the model's own (``names``); images
go in at the size the weights were trained at unless ``detector.imgsz`` says otherwise; NMS is
class-agnostic (``detector.agnostic``), so an object the model is unsure of is not reported
under two names that a caption's two parts would then both take.

**Drops** (``drop_reason``; ``drop_detail`` says which part and what was there): ``no_box`` (a
part has no candidate), ``same_box`` (both parts only match one instance), ``unreadable_image``,
``bad_triplet`` (no usable ``triplet``). A drop record is the sample without ``objects``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sapretrain import storage
from sapretrain.boxes import Choice, Detection, NounMatcher, as_detection, choose_boxes, clip_box, clip_detections
from sapretrain.boxes import iou  # noqa: F401 (re-exported for eval/run.py)
from sapretrain.config import load_config, to_dict
from sapretrain.detector import DetectorError, YoloDetector  # noqa: F401 (YoloDetector re-exported)

DEFAULT_CONFIG = "configs/curation/rois.yaml"  # shipped with the package (sapretrain.resources)
PARTS = ("subj", "obj")

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class DetectorConfig:
    enabled: bool = True  # detect boxes for records without ground-truth objects
    fallback_for_gt_sources: bool = False  # also detect when a record's ground truth lacks a part
    weights: str = "yolov8n.pt"  # ultralytics .pt (YOLOv8/YOLO11; "world" in the name: YOLO-World); a bare
    # name is looked up in sapretrain.detector.weights_dir(), never the working directory
    conf: float = 0.25
    imgsz: int | None = None  # None: the size the weights were trained at (a 128 px model finds 7 % of objects at 640)
    batch: int = 16  # images per predict call
    device: str | None = None
    agnostic: bool = True  # one class per object (class-agnostic NMS): no object under two names


@dataclass
class RoiConfig:
    min_box_size: float = 2.0  # px; narrower or lower boxes (after clipping) are no box
    same_instance_iou: float = 0.9  # boxes overlapping this much are one instance
    same_category: bool = True  # subject and object of one category may take two instances
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    synonyms: dict[str, list[str]] = field(default_factory=dict)  # category -> words for it
    hypernyms: dict[str, list[str]] = field(default_factory=dict)  # word -> categories it covers


def load_roi_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RoiConfig:
    """``RoiConfig`` from ``path`` (default ``configs/curation/rois.yaml``) and ``key=value`` overrides."""
    return load_config(RoiConfig, str(path or DEFAULT_CONFIG), overrides)


# ---------------------------------------------------------------------------------------------
# Boxes (nouns and the choice rule: sapretrain.boxes, rule "nouns")


def choose(matcher: NounMatcher, nouns: dict[str, str], instances: list, cfg: RoiConfig,
           texts: dict[str, str] | None = None) -> Choice:
    """Subject and object boxes among ``instances`` (clipped, crowd-free) by ``cfg``'s rule;
    ``texts``: the parts' whole texts, whose words pick among names with modifiers ("red cube")."""
    return choose_boxes(instances, nouns["subj"], nouns["obj"], matcher=matcher, texts=texts,
                        same_instance_iou=cfg.same_instance_iou, same_category=cfg.same_category)


def part_texts(record: dict) -> dict[str, str]:
    """The subject's and object's texts of a record ``RoiStage.nouns`` accepted."""
    return {part: record["triplet"][part]["text"] for part in PARTS}


def gt_instances(objects: list, width, height, min_size: float) -> list[dict]:
    """Usable ground-truth boxes: named, not crowd, clipped and large enough."""
    found = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("crowd") or obj.get("iscrowd"):
            continue
        box = clip_box(obj.get("box"), width, height, min_size)
        if box is not None and isinstance(obj.get("name"), str):
            found.append({"name": obj["name"], "box": box})
    return found


# ---------------------------------------------------------------------------------------------
# Detector


class Detector(Protocol):
    open_vocab: bool

    def __call__(self, images: list, classes: list[str] | None = None) -> list[list]:
        """Per image ``[Detection]`` (or ``{"name", "box", "score"}``); ``classes`` for open vocabularies."""


def load_image(ref: str):
    """The decoded RGB image, or None when it cannot be read."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(storage.read_bytes(ref)))
        return image.convert("RGB")
    except Exception:  # missing file, truncated or not an image: counted by the caller
        return None


def image_size(ref: str) -> tuple[int, int] | None:
    """``(width, height)`` from the image header only, or None."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(storage.read_bytes(ref))).size
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# The stage


def _drop(record: dict, reason: str, detail: str | None = None) -> dict:
    """The drop record: the sample without its image's ``objects`` (the input line has them, and
    ``detail`` names the boxes that were there), so most of the drop file is not the boxes."""
    out = {k: v for k, v in record.items() if k != "objects"}
    out["drop_reason"] = reason
    if detail:
        out["drop_detail"] = detail
    return out


def _size(record: dict) -> tuple[Any, Any]:
    w, h = record.get("width"), record.get("height")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (w, h) if ok else (None, None)


class RoiStage:
    """``run_stage`` stage adding ``boxes`` and ``box_source`` (see the module doc)."""

    name = "rois"

    def __init__(self, cfg: RoiConfig, detector: Detector | None = None):
        self.cfg = cfg
        self.matcher = NounMatcher(cfg.synonyms, cfg.hypernyms)
        self._detector = detector  # built on first need: GT-only runs never load weights

    def setup(self) -> None:
        pass

    def fingerprint(self) -> dict:
        return {"config": to_dict(self.cfg)}

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            d = self.cfg.detector
            try:
                self._detector = YoloDetector(d.weights, d.conf, d.imgsz, d.batch, d.device, d.agnostic)
            except DetectorError as e:
                raise type(e)(f"{e} (or detector.enabled=false)") from None
        return self._detector

    def nouns(self, record: dict) -> dict[str, str] | None:
        triplet = record.get("triplet")
        if not isinstance(triplet, dict):
            return None
        nouns = {}
        for part in PARTS:
            p = triplet.get(part)
            if not isinstance(p, dict) or not isinstance(p.get("text"), str):
                return None
            head = p.get("head") if isinstance(p.get("head"), str) and p.get("head") else None
            nouns[part] = self.matcher.noun(p["text"], head)
            if not nouns[part]:
                return None
        return nouns

    def process(self, records: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(records)
        pending: list[tuple[int, dict[str, str], Choice | None]] = []  # for the detector
        sizes: dict[str, tuple[int, int] | None] = {}
        gt_seen: dict[str, tuple] = {}
        for k, record in enumerate(records):
            nouns = self.nouns(record)
            if nouns is None:
                out[k] = _drop(record, "bad_triplet", "no triplet with subj/obj text")
                continue
            objects = record.get("objects")
            if not isinstance(objects, list):
                if self.cfg.detector.enabled:
                    pending.append((k, nouns, None))
                else:
                    out[k] = _drop(record, "no_box", "no ground-truth objects and detector disabled")
                continue
            w, h = _size(record)
            if w is None:  # clip to the real image: its header gives the size
                ref = record.get("image")
                if ref not in sizes:
                    sizes[ref] = image_size(ref) if isinstance(ref, str) else None
                if sizes[ref] is None:
                    out[k] = _drop(record, "unreadable_image", str(ref))
                    continue
                w, h = sizes[ref]
                record = {**record, "width": w, "height": h}
                records[k] = record
            choice = choose(self.matcher, nouns, self._gt(gt_seen, record.get("image"), objects, w, h), self.cfg,
                            part_texts(record))
            if choice.boxes is not None:
                out[k] = {**record, "boxes": choice.boxes, "box_source": "gt"}
            elif self.cfg.detector.enabled and self.cfg.detector.fallback_for_gt_sources:
                pending.append((k, nouns, choice))
            else:
                out[k] = _drop(record, choice.reason, f"gt {choice.detail}")
        if pending:
            self._detect(records, pending, out)
        return out  # type: ignore[return-value]

    def _gt(self, seen: dict[str, tuple], ref, objects: list, w, h) -> list[Detection]:
        """``gt_instances`` as detections. The samples of one caption (and the captions of one
        image) carry the same objects, so within a chunk each image's are converted once."""
        hit = seen.get(ref) if isinstance(ref, str) else None
        if hit is not None and hit[0] == (w, h) and hit[1] == objects:
            return hit[2]
        found = [as_detection(d) for d in gt_instances(objects, w, h, self.cfg.min_box_size)]
        if isinstance(ref, str):
            seen[ref] = ((w, h), objects, found)
        return found

    def _detect(self, records: list[dict], pending: list, out: list) -> None:
        """Boxes for ``pending`` records from detections made once per image, in batches."""
        by_image: dict[str, list] = {}
        for item in pending:
            ref = records[item[0]].get("image")
            by_image.setdefault(ref if isinstance(ref, str) else "", []).append(item)
        refs = list(by_image)
        step = max(1, self.cfg.detector.batch)
        for b in range(0, len(refs), step):
            batch_refs = refs[b:b + step]
            images = {ref: load_image(ref) if ref else None for ref in batch_refs}
            readable = [ref for ref in batch_refs if images[ref] is not None]
            classes = sorted({n[p] for ref in readable for _, n, _ in by_image[ref] for p in PARTS})
            found = self.detector([images[r] for r in readable], classes) if readable else []
            detections = dict(zip(readable, found))
            for ref in batch_refs:
                for k, nouns, gt_choice in by_image[ref]:
                    out[k] = self._from_detections(records[k], nouns, gt_choice, images[ref], detections.get(ref))

    def _from_detections(self, record: dict, nouns: dict, gt_choice: Choice | None, image, dets) -> dict:
        if image is None:
            return _drop(record, "unreadable_image", str(record.get("image")))
        w, h = image.size
        if _size(record)[0] is None:
            record = {**record, "width": w, "height": h}
        choice = choose(self.matcher, nouns, clip_detections(dets or [], w, h, self.cfg.min_box_size), self.cfg,
                        part_texts(record))
        if choice.boxes is None:
            prefix = f"gt {gt_choice.detail}; " if gt_choice is not None else ""
            return _drop(record, choice.reason, f"{prefix}detector {choice.detail}")
        return {**record, "boxes": choice.boxes, "box_source": "detector"}


def count_box_sources(url: str) -> dict[str, int]:
    """Kept samples of a stage output by ``box_source`` (for the tool's summary)."""
    import json

    import fsspec

    counts: dict[str, int] = {}
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                source = json.loads(line).get("box_source", "?")
                counts[source] = counts.get(source, 0) + 1
    return dict(sorted(counts.items()))
