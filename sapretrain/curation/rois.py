"""Regions of interest: subject and object boxes for triplet samples (SA-CLIP §2.1, App. A).

    cfg = load_roi_config("configs/curation/rois.yaml", ["detector.weights=yolov8x.pt"])
    run_stage(RoiStage(cfg), "samples.jsonl", "with_boxes.jsonl", StageConfig(chunk_size=5000))

Input: one triplet-level sample per line, ``{"id", "image", "width"?, "height"?, "caption",
"triplet": {"subj", "rel", "obj"}, "objects"?, ...}`` (parts ``{"text", "start", "end", "head"?}``,
``objects`` ``[{"name", "box": [x0, y0, x1, y1], "crowd"?}]`` as written by ``sources.py``).
Output: the same plus ``"boxes": {"subj": [x0, y0, x1, y1], "obj": [...]}`` (pixels, the
curated-manifest field) and ``"box_source": "gt" | "detector"``; ``width``/``height`` are added
when the image had to be opened and the record lacked them.

**Nouns** (``NounMatcher``). A part's noun is its head lemma (``head``, else the last word of
``text``), singular and lowercase; when the words before it form a known multi-word name
("hot dog", "teddy bear", "cell phone") that phrase is the noun instead. Object and detector
class names get the same normalisation. A part matches a box's name at level

- 0: same noun ("shirt" / VG "white shirt"; "man" / "men"),
- 1: same COCO category through ``synonyms`` ("man" / "person", "puppy" / "dog", VG "guy" / "man"),
- 2: through ``hypernyms`` ("animal" / "dog", "vehicle" / "bus"),

and not at all otherwise. Crowd boxes and boxes under ``min_box_size`` after clipping to the image
are never candidates.

**Choice.** Among all (subject box, object box) pairs of candidates that are not one instance
(not the same box, IoU < ``same_instance_iou``), the first by (sum of levels, subject level,
larger subject box, larger object box) wins: the best-matching names, then the largest subject
box, then the largest object box left. So when both parts name one category ("a man next to a
woman") the subject gets the largest instance and the object the next largest; the caption does
not say which is which, and using the relation's direction to decide would leak the label into
the boxes. ``same_category: false`` drops such samples instead.

**Sources.** Records with ``objects`` (COCO, VG) use them; when a part has no ground-truth box the
sample is dropped, or, with ``detector.fallback_for_gt_sources``, both boxes come from the
detector (one source per sample, so ``box_source`` is one value). Records without ``objects`` use
the detector (``detector.enabled``). Detections are made once per image per chunk, in batches of
``detector.batch`` images; for YOLO-World weights (name contains "world") the classes of each
batch are set to the nouns of its samples.

**Drops** (``drop_reason``; ``drop_detail`` says which part and what was there): ``no_box`` (a
part has no candidate), ``same_box`` (both parts only match one instance), ``unreadable_image``,
``bad_triplet`` (no usable ``triplet``).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sapretrain import storage
from sapretrain.config import ConfigError, load_config, to_dict

DEFAULT_CONFIG = "configs/curation/rois.yaml"  # shipped with the package (sapretrain.resources)
PARTS = ("subj", "obj")

# Plurals the suffix rules get wrong; words that only look plural stay as they are.
IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "oxen": "ox", "knives": "knife", "wives": "wife",
    "leaves": "leaf", "shelves": "shelf", "loaves": "loaf", "halves": "half", "calves": "calf",
    "wolves": "wolf", "scarves": "scarf", "buses": "bus", "busses": "bus", "tomatoes": "tomato",
    "potatoes": "potato", "cookies": "cookie", "movies": "movie", "pies": "pie", "ties": "tie",
    "dice": "die", "pant": "pants", "short": "shorts", "bookshelves": "bookshelf",
}
INVARIANT = frozenset(
    "glasses sunglasses eyeglasses goggles pants jeans shorts trousers scissors clothes news "
    "species series sheep deer fish aircraft people police cattle skis tennis".split()
)
WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class DetectorConfig:
    enabled: bool = True  # detect boxes for records without ground-truth objects
    fallback_for_gt_sources: bool = False  # also detect when a record's ground truth lacks a part
    weights: str = "yolov8n.pt"  # ultralytics .pt (YOLOv8/YOLO11; "world" in the name: YOLO-World); a bare
    # name is looked up in sapretrain.detector.weights_dir(), never the working directory
    conf: float = 0.25
    imgsz: int = 640
    batch: int = 16  # images per predict call
    device: str | None = None


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
# Nouns


class NounMatcher:
    """Normalised nouns and how well a part's noun matches a box's name (see the module doc)."""

    def __init__(self, synonyms: dict[str, list[str]], hypernyms: dict[str, list[str]]):
        self.category: dict[str, str] = {}  # normalised word -> its category
        for cat, words in synonyms.items():
            for word in [cat, *words]:
                key = " ".join(WORD.findall(word.lower()))
                if self.category.get(key, cat) != cat:
                    raise ConfigError(f"synonyms: '{word}' is listed under both '{self.category[key]}' and '{cat}'")
                self.category[key] = cat
        self.hypernyms = {" ".join(WORD.findall(w.lower())): frozenset(cats) for w, cats in hypernyms.items()}
        self.vocab = frozenset(self.category) | frozenset(self.hypernyms)
        self.phrases = frozenset(v for v in self.vocab if " " in v)

    def singular(self, word: str) -> str:
        word = word.lower()
        if word in IRREGULAR:
            return IRREGULAR[word]
        if word in self.vocab or word in INVARIANT:
            return word
        if len(word) < 4 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
            return word
        stem = word[:-1]
        candidates = [stem, word[:-2]]
        if word.endswith("ies"):
            candidates.insert(0, word[:-3] + "y")
        if word.endswith("ves"):
            candidates[:0] = [word[:-3] + "f", word[:-3] + "fe"]
        for cand in candidates:  # a known noun wins ("ponies" -> "pony", "boxes" -> "box")
            if cand in self.vocab:
                return cand
        if word.endswith("ies") and len(word) > 4:
            return word[:-3] + "y"
        if word.endswith(("sses", "ches", "shes", "xes", "zes")):
            return word[:-2]
        return stem

    def noun(self, text: str, head: str | None = None) -> str:
        """The noun of a part (``text`` with its ``head`` lemma) or of an object/class name."""
        words = WORD.findall(str(text).lower())
        head = self.singular(head.lower()) if head else None
        if head is None:
            if not words:
                return ""
            head, at = self.singular(words[-1]), len(words) - 1
        else:
            at = max((i for i, w in enumerate(words) if w == head or self.singular(w) == head), default=len(words))
        for n in (3, 2):  # the longest known name ending at the head
            if at - n + 1 >= 0:
                phrase = " ".join([*words[at - n + 1:at], head])
                if phrase in self.phrases:
                    return phrase
        return head

    def level(self, noun: str, name: str) -> int | None:
        """0 same noun, 1 same category, 2 hypernym; None: no match."""
        if not noun or not name:
            return None
        if noun == name:
            return 0
        a, b = self.category.get(noun, noun), self.category.get(name, name)
        if a == b:
            return 1
        if a in self.hypernyms.get(name, ()) or b in self.hypernyms.get(noun, ()):
            return 2
        return None

    def describe(self, noun: str) -> str:
        cat = self.category.get(noun)
        return f"'{noun}' ({cat})" if cat and cat != noun else f"'{noun}'"


# ---------------------------------------------------------------------------------------------
# Boxes


def clip_box(box: Any, width: float | None, height: float | None, min_size: float) -> list[float] | None:
    """``box`` clipped to the image, or None when it is malformed or under ``min_size`` px."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    x0, y0 = max(x0, 0.0), max(y0, 0.0)
    if width is not None:
        x1 = min(x1, float(width))
    if height is not None:
        y1 = min(y1, float(height))
    if not (x1 - x0 >= min_size and y1 - y0 >= min_size):  # also rejects NaN
        return None
    return [round(v, 2) for v in (x0, y0, x1, y1)]


def iou(a: list[float], b: list[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


@dataclass
class Choice:
    boxes: dict[str, list[float]] | None  # {"subj", "obj"} when found
    reason: str | None = None  # else no_box / same_box
    detail: str | None = None


def choose_boxes(matcher: NounMatcher, nouns: dict[str, str], instances: list[dict], cfg: RoiConfig) -> Choice:
    """Subject and object boxes among ``instances`` (``{"name", "box"}``, clipped, crowd-free)."""
    names = [matcher.noun(inst["name"]) for inst in instances]
    cands = {}
    for part in PARTS:
        # (level, -area, index): best match first, then the larger box
        found = [(lvl, -area(inst["box"]), i) for i, inst in enumerate(instances)
                 if (lvl := matcher.level(nouns[part], names[i])) is not None]
        cands[part] = sorted(found)
    missing = [p for p in PARTS if not cands[p]]
    if missing:
        seen = ", ".join(sorted(set(names))[:12]) or "nothing"
        detail = "; ".join(f"{p}: no {matcher.describe(nouns[p])}" for p in missing)
        return Choice(None, "no_box", f"{detail} among [{seen}]")
    cats = [matcher.category.get(n, n) for n in names]
    best = None
    for ls, neg_s, i in cands["subj"]:
        for lo, neg_o, j in cands["obj"]:
            if i == j or iou(instances[i]["box"], instances[j]["box"]) >= cfg.same_instance_iou:
                continue
            if not cfg.same_category and cats[i] == cats[j]:
                continue
            rank = (ls + lo, ls, neg_s, neg_o, i, j)
            if best is None or rank < best:
                best = rank
    if best is None:
        return Choice(None, "same_box", f"subj {matcher.describe(nouns['subj'])} and obj "
                      f"{matcher.describe(nouns['obj'])} only match one instance")
    i, j = best[-2:]
    return Choice({"subj": list(instances[i]["box"]), "obj": list(instances[j]["box"])})


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

    def __call__(self, images: list, classes: list[str] | None = None) -> list[list[dict]]:
        """Per image ``[{"name", "box": [x0, y0, x1, y1], "score"}]``; ``classes`` for open vocabularies."""


class YoloDetector:
    """An ultralytics YOLO (v8/11, or YOLO-World when "world" is in the weights' name)."""

    def __init__(self, weights: str, conf: float = 0.25, imgsz: int = 640, batch: int = 16, device: str | None = None):
        from sapretrain.detector import DetectorError, load_yolo

        try:
            self.model = load_yolo(weights)  # checked, restricted unpickling; bare names never from the cwd
        except DetectorError as e:
            raise type(e)(f"{e} (or detector.enabled=false)") from None
        self.open_vocab = "world" in Path(weights).name.lower()
        self.conf, self.imgsz, self.batch, self.device = conf, imgsz, batch, device
        self._classes: list[str] | None = None

    def __call__(self, images: list, classes: list[str] | None = None) -> list[list[dict]]:
        if self.open_vocab and classes and classes != self._classes:
            self.model.set_classes(classes)
            self._classes = list(classes)
        results = self.model.predict(images, batch=self.batch, conf=self.conf, imgsz=self.imgsz,
                                     device=self.device, verbose=False)
        out = []
        for result in results:
            names = result.names
            boxes = result.boxes
            out.append([{"name": names[int(c)], "box": [float(v) for v in xyxy], "score": float(s)}
                        for xyxy, c, s in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist())])
        return out


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
    out = {**record, "drop_reason": reason}
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
            self._detector = YoloDetector(d.weights, d.conf, d.imgsz, d.batch, d.device)
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
            choice = choose_boxes(self.matcher, nouns, gt_instances(objects, w, h, self.cfg.min_box_size), self.cfg)
            if choice.boxes is not None:
                out[k] = {**record, "boxes": choice.boxes, "box_source": "gt"}
            elif self.cfg.detector.enabled and self.cfg.detector.fallback_for_gt_sources:
                pending.append((k, nouns, choice))
            else:
                out[k] = _drop(record, choice.reason, f"gt {choice.detail}")
        if pending:
            self._detect(records, pending, out)
        return out  # type: ignore[return-value]

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
        instances = []
        for det in dets or []:
            box = clip_box(det["box"], w, h, self.cfg.min_box_size)
            if box is not None:
                instances.append({"name": det["name"], "box": box})
        choice = choose_boxes(self.matcher, nouns, instances, self.cfg)
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
