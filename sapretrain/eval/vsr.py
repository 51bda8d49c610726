"""VSR zero-shot evaluation (paper Table 1): is a templated spatial caption true of its image?

    rows, bad = read_vsr("zeroshot_test.jsonl")              # bad: {"not_json": 2, ...}
    annotations = load_coco_annotations("instances_train2017.json")   # or the fixtures' JSONL
    result = evaluate_vsr(Encoder(model), rows, "coco/train2017", annotations)
    print(format_vsr_table(result))

Each VSR row is a COCO image, a caption "The cat is under the table.", its relation, subject and
object (COCO category names) and a 0/1 label. Per row:

- **boxes**: the subject's and object's pixel boxes from the COCO instance annotations
  (``boxes_from_coco``: the largest non-crowd instance of each category; if both are the same
  category, the larger of the two largest is the subject). Without annotations a detector
  (``YoloBoxes``) supplies the instances, chosen by the same rule. No instance: skipped ``no_box``.
- **spans**: the caption's subject/relation/object character spans, from the training extractor
  (``caption_triplet``), else by string search (VSR captions are templated). None: ``no_svo``.
  If the extractor reads the caption with subject and object exchanged (passives: "X is enclosed
  by Y" gives Y | enclosed by | X, as in training), the boxes are exchanged with them.
- **score**, by ``rule`` (neither looks at the evaluated file's labels):

  - ``"contrast"`` (default): true iff ``sim(v, u(caption)) > sim(v, u(contrast caption))``, the
    contrast caption having the relation replaced by its opposite (``INVERSE``: left of -> right
    of, on -> under, contains -> inside, near -> far from, ...) or, for an asymmetric relation
    with no opposite (``against``, ``around``, ...), subject and object exchanged. ``v`` is the
    same for both captions (the boxes of the original caption). Symmetric relations with no
    opposite (``SYMMETRIC``: touching, with, opposite to, across from) cannot be contrasted:
    they use the threshold rule, with the threshold tuned on ``dev_rows``; without dev rows they
    are skipped ``no_contrast``.
  - ``"threshold"``: true iff ``sim(v, u(caption)) > t``, one cosine threshold ``t`` tuned on
    ``dev_rows`` (the midpoint that maximises dev accuracy) and applied unchanged.

``sim`` is the cosine of the model's ``v`` and ``u`` (both unit-norm; plain CLIP: its own cosine).
Rows that cannot be scored are skipped and counted by reason, never silently dropped; the
reasons depend on the data, boxes and rule, never on the model (a plain CLIP needs the spans too),
so every model is scored on the same rows.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Sequence

from PIL import Image
from tqdm import tqdm

from sapretrain import storage
from sapretrain.eval.encode import EvalSample

REQUIRED_FIELDS = ("image", "caption", "label", "relation", "subj", "obj")
RULES = ("contrast", "threshold")

# The relations of the VSR paper's Table 1 by its categories: the 60 that occur in the released
# zero-shot splits plus "down", "at", "among" and "between" (listed by the paper, rare or absent
# in the data). Relations the paper marks as dropped ("deep down", "up", "from", "to", "through",
# "after") are not VSR relations.
RELATION_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(("adjacent to", "alongside", "at the side of", "at the right side of",
                     "at the left side of", "attached to", "at the back of", "ahead of", "against",
                     "at the edge of"), "adjacency"),
    **dict.fromkeys(("off", "past", "toward", "down", "away from", "along", "around", "into",
                     "across", "across from", "down from"), "directional"),
    **dict.fromkeys(("facing", "facing away from", "parallel to", "perpendicular to"), "orientation"),
    **dict.fromkeys(("on top of", "beneath", "beside", "behind", "left of", "right of", "under",
                     "in front of", "below", "above", "over", "in the middle of"), "projective"),
    **dict.fromkeys(("by", "close to", "near", "far from", "far away from"), "proximity"),
    **dict.fromkeys(("connected to", "detached from", "has as a part", "part of", "contains",
                     "within", "at", "on", "in", "with", "surrounding", "among", "consists of",
                     "out of", "between", "inside", "outside", "touching"), "topological"),
    **dict.fromkeys(("beyond", "next to", "opposite to", "enclosed by"), "unallocated"),
}
RELATIONS = frozenset(RELATION_CATEGORIES)

# Contrast phrases: a relation that would (mostly) be false where the original is true. Not a
# bijection and not restricted to VSR's own phrases; only the caption's relation words change.
INVERSE: dict[str, str] = {
    "left of": "right of", "right of": "left of",
    "at the left side of": "at the right side of", "at the right side of": "at the left side of",
    "above": "below", "below": "above", "over": "under", "under": "on",
    "on": "under", "on top of": "beneath", "beneath": "on top of", "off": "on",
    "in front of": "behind", "behind": "in front of", "ahead of": "behind",
    "at the back of": "in front of", "beyond": "in front of",
    "inside": "outside", "outside": "inside", "within": "outside", "in": "outside",
    "into": "out of", "out of": "into", "contains": "inside",
    "surrounding": "enclosed by", "enclosed by": "surrounding",
    "has as a part": "part of", "part of": "has as a part", "consists of": "part of",
    "near": "far from", "close to": "far from", "by": "far from", "next to": "far from",
    "beside": "far from", "adjacent to": "far from", "alongside": "far from",
    "at the side of": "far from",
    "far from": "close to", "far away from": "close to",
    "toward": "away from", "away from": "toward",
    "facing": "facing away from", "facing away from": "facing",
    "parallel to": "perpendicular to", "perpendicular to": "parallel to",
    "attached to": "detached from", "connected to": "detached from", "detached from": "attached to",
    "at the edge of": "in the middle of", "in the middle of": "at the edge of",
}
# Symmetric and without an opposite: exchanging subject and object says the same thing.
SYMMETRIC = frozenset(("touching", "with", "opposite to", "across from"))
# Every other relation (against, past, down, along, around, across, down from, at, among,
# between) is contrasted by exchanging subject and object.

# Relations written as a verb ("The bowl contains the apple."), all others follow a copula.
VERB_RELATIONS = frozenset(("contains", "has as a part", "consists of"))


# --------------------------------------------------------------------------------------------
# Reading


def read_vsr(path: str) -> tuple[list[dict], Counter]:
    """The usable rows of a VSR JSONL file and the count of skipped lines by reason.

    Reasons: ``not_json``, ``missing_field``, ``bad_label`` (not 0/1), ``unknown_relation``.
    Each row keeps its fields; ``id`` is the row's own ``id`` or ``<file name>:<line number>``.
    """
    fs, fpath = storage.url_to_fs(path)
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    rows, skipped = [], Counter()
    with fs.open(fpath, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["not_json"] += 1
                continue
            problem = row_problem(row)
            if problem:
                skipped[problem] += 1
                continue
            rows.append({**row, "id": str(row.get("id", f"{name}:{number}"))})
    return rows, skipped


def row_problem(row: Any) -> str | None:
    """Why a parsed VSR row cannot be evaluated, or None."""
    if not isinstance(row, dict) or any(row.get(k) in (None, "") for k in REQUIRED_FIELDS):
        return "missing_field"
    if type(row["label"]) is not int or row["label"] not in (0, 1):  # not "1", 1.0 or True
        return "bad_label"
    if not all(isinstance(row[k], str) for k in ("image", "caption", "relation", "subj", "obj")):
        return "missing_field"
    if row["relation"] not in RELATIONS:
        return "unknown_relation"
    return None


# --------------------------------------------------------------------------------------------
# Boxes


def load_coco_annotations(path: str) -> dict[str, list[dict]]:
    """``file_name -> [{"category", "bbox_xywh", "iscrowd"}]`` from COCO instance annotations.

    Accepts the official ``instances_*.json`` (images, annotations, categories) and the per-image
    JSONL of tests/fixtures/coco/annotations.jsonl (``file_name``, ``objects``).
    """
    fs, fpath = storage.url_to_fs(path)
    with fs.open(fpath, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:  # several JSON documents: the per-image JSONL
        whole = None
    if isinstance(whole, dict) and "annotations" in whole:
        names = {c["id"]: c["name"] for c in whole["categories"]}
        files = {im["id"]: im["file_name"] for im in whole["images"]}
        index: dict[str, list[dict]] = {name: [] for name in files.values()}
        for a in whole["annotations"]:
            index[files[a["image_id"]]].append({"category": names[a["category_id"]],
                                                "bbox_xywh": a["bbox"], "iscrowd": a.get("iscrowd", 0)})
        return index
    records = [whole] if isinstance(whole, dict) else [json.loads(l) for l in text.splitlines() if l.strip()]
    return {r["file_name"]: [{"category": o["category"], "bbox_xywh": o["bbox_xywh"],
                              "iscrowd": o.get("iscrowd", 0)} for o in r.get("objects", [])]
            for r in records}


def boxes_from_coco(annotations: dict[str, list[dict]], file_name: str, subj: str, obj: str
                    ) -> dict[str, list[float]] | None:
    """Pixel ``[x0, y0, x1, y1]`` of the subject and object, or None if one has no instance.

    Each is the largest (by box area) non-crowd instance of its category: VSR names categories,
    not instances, and the largest one is the most likely referent. If subject and object share a
    category, its two largest instances are used and the larger is the subject (VSR does not say
    which one is meant; this rule is at least fixed). ``annotations`` is ``load_coco_annotations``'
    index, or a detector's instances under the image's file name.
    """
    return select_boxes(annotations.get(file_name, []), subj, obj)


def select_boxes(objects: Iterable[dict], subj: str, obj: str) -> dict[str, list[float]] | None:
    """The ``boxes_from_coco`` rule over one image's instances."""
    by_category: dict[str, list[list[float]]] = defaultdict(list)
    for o in objects:
        if not o.get("iscrowd"):
            x, y, w, h = (float(v) for v in o["bbox_xywh"])
            if w > 0 and h > 0:
                by_category[o["category"].lower()].append([x, y, x + w, y + h])
    for boxes in by_category.values():
        boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    subj_boxes, obj_boxes = by_category.get(subj.lower(), []), by_category.get(obj.lower(), [])
    if subj.lower() == obj.lower():
        return {"subj": subj_boxes[0], "obj": subj_boxes[1]} if len(subj_boxes) >= 2 else None
    if not subj_boxes or not obj_boxes:
        return None
    return {"subj": subj_boxes[0], "obj": obj_boxes[0]}


class YoloBoxes:
    """Instances found by an ultralytics YOLO detector, for images without COCO annotations.

    A COCO-trained YOLO's class names are COCO's category names, which VSR's subj/obj use.
    ``YoloBoxes("yolov8n.pt")(image)`` -> ``[{"category", "bbox_xywh", "iscrowd": 0}]``.
    """

    def __init__(self, weights: str = "yolov8n.pt", conf: float = 0.25, device: str | None = None):
        from sapretrain.detector import load_yolo

        self.model = load_yolo(weights)  # checked, restricted unpickling; bare names never from the cwd
        self.conf = conf
        self.device = device

    def __call__(self, image: Image.Image) -> list[dict]:
        result = self.model.predict(image, conf=self.conf, device=self.device, verbose=False)[0]
        names = result.names
        found = []
        for (x0, y0, x1, y1), cls in zip(result.boxes.xyxy.tolist(), result.boxes.cls.tolist()):
            found.append({"category": names[int(cls)], "bbox_xywh": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        return found


# --------------------------------------------------------------------------------------------
# Caption spans and contrast captions


def _find(caption: str, text: str, start: int = 0) -> int:
    match = re.compile(rf"\b{re.escape(text)}\b", re.IGNORECASE).search(caption, start)
    return match.start() if match else -1


def locate_svo(caption: str, subj: str, relation: str, obj: str) -> dict | None:
    """The triplet of a templated caption by case-insensitive search: subject, then relation, then object."""
    s = _find(caption, subj)
    r = _find(caption, relation, s + len(subj)) if s >= 0 else -1
    o = _find(caption, obj, r + len(relation)) if r >= 0 else -1
    if o < 0:
        return None

    def part(start: int, length: int) -> dict:
        return {"text": caption[start:start + length], "start": start, "end": start + length}

    return {"subj": part(s, len(subj)), "rel": {**part(r, len(relation)), "kind": "spatial"},
            "obj": part(o, len(obj))}


def _match(span: str, name: str) -> int:
    """2: the span is the category name; 1: one contains the other word-wise ("glass" / "wine glass")."""
    span, name = span.lower().strip(), name.lower().strip()
    if span == name:
        return 2
    return 1 if span and (_find(span, name) >= 0 or _find(name, span) >= 0) else 0


def caption_triplet(caption: str, subj: str, relation: str, obj: str, nlp=None) -> tuple[dict, bool] | None:
    """The caption's SVO spans and whether they name the subject and object the other way round.

    The extractor's triplet whose subject and object texts best match ``subj`` and ``obj`` (in
    either order, the same order preferred on a tie); else ``locate_svo``; else None.
    """
    if nlp is not None:
        from sapretrain.curation.svo import extract_triplets

        best, best_score = None, 0
        for t in extract_triplets(nlp(caption)):
            for flipped, (a, b) in ((False, (subj, obj)), (True, (obj, subj))):
                s, o = _match(t["subj"]["text"], a), _match(t["obj"]["text"], b)
                if s and o and s + o > best_score:
                    best, best_score = (t, flipped), s + o
        if best is not None:
            return best
    located = locate_svo(caption, subj, relation, obj)
    return (located, False) if located else None


def contrast_mode(relation: str) -> str:
    """How a relation is contrasted: ``inverse``, ``swap`` (subject and object) or ``threshold``."""
    if relation in INVERSE:
        return "inverse"
    return "threshold" if relation in SYMMETRIC else "swap"


def contrast_caption(caption: str, subj: str, relation: str, obj: str) -> tuple[str, str, str, str] | None:
    """The contrast caption and its (subj, relation, obj), or None (no contrast, or not located).

    "The cat is left of the dog." -> "The cat is right of the dog."; "The bowl contains the
    apple." -> "The bowl is inside the apple." (the copula follows the relation's form);
    asymmetric without an opposite: "The cat is against the dog." -> "The dog is against the cat.".
    """
    mode = contrast_mode(relation)
    spans = locate_svo(caption, subj, relation, obj)
    if mode == "threshold" or spans is None:
        return None
    s, r, o = spans["subj"], spans["rel"], spans["obj"]
    if mode == "swap":
        text = (caption[:s["start"]] + o["text"] + caption[s["end"]:o["start"]] + s["text"]
                + caption[o["end"]:])
        return text, obj, relation, subj
    inverse = INVERSE[relation]
    start = r["start"]
    copula = re.search(r"\b(is|are)\s+$", caption[s["end"]:start], re.IGNORECASE)
    if copula:
        start = s["end"] + copula.start()
    verb = copula.group(1) if copula else "is"
    phrase = inverse if inverse in VERB_RELATIONS else f"{verb} {inverse}"
    return caption[:start] + phrase + caption[r["end"]:], subj, inverse, obj


# --------------------------------------------------------------------------------------------
# Evaluation


def tune_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The cosine threshold t maximising the accuracy of ``score > t`` (the lowest on a tie).

    Candidates are the midpoints between consecutive distinct scores and one below/above all.
    """
    if not scores:
        raise ValueError("cannot tune a threshold on no rows")
    values = sorted(set(float(s) for s in scores))
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1.0]

    def accuracy(t: float) -> int:
        return sum((s > t) == bool(y) for s, y in zip(scores, labels))

    return max(candidates, key=lambda t: (accuracy(t), -t))


def _load_image(images_root: str, file_name: str) -> Image.Image | None:
    url = storage.join(images_root, file_name)
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _inside(box: Sequence[float], image: Image.Image) -> bool:
    """Whether a box keeps at least a pixel inside the image (what the encoder's ROI crop needs)."""
    x0, y0, x1, y1 = box
    return min(x1, image.width) - max(x0, 0) >= 1 and min(y1, image.height) - max(y0, 0) >= 1


def _similarities(encoder, rows: Sequence[dict], images_root: str, annotations, detector, nlp,
                  contrast: bool, progress: bool, desc: str) -> tuple[list[dict], Counter]:
    """Per scorable row: the row, ``mode``, ``sim`` and (contrasted rows) ``sim_contrast``; skips by reason.

    ``contrast``: build contrast captions; rows whose relation has none get mode ``threshold``.
    """
    skipped: Counter = Counter()
    done: list[dict] = []
    detected: dict[str, list[dict]] = {}
    chunk_size = getattr(encoder, "batch_size", 64)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="row")
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        items, image_samples, text_samples = [], [], []
        for row in chunk:
            item = _prepare(row, images_root, annotations, detector, detected, nlp, contrast)
            if isinstance(item, str):
                skipped[item] += 1
                continue
            items.append(item)
            image_samples.append(item.pop("image_sample"))
            text_samples.extend(item.pop("text_samples"))
        if items:
            v = encoder.images(image_samples)  # (B, 2D), unit-norm
            u = encoder.texts(text_samples)  # (sum of 1 or 2 captions per row, 2D)
            cursor = 0
            for item, v_row in zip(items, v):
                item["sim"] = float(v_row @ u[cursor])
                cursor += 1
                if item["mode"] in ("inverse", "swap"):
                    item["sim_contrast"] = float(v_row @ u[cursor])
                    cursor += 1
                done.append(item)
        bar.update(len(chunk))
    bar.close()
    return done, skipped


def _prepare(row: dict, images_root: str, annotations, detector, detected: dict, nlp, contrast: bool
             ) -> dict | str:
    """The samples that score one row, or the reason it is skipped."""
    problem = row_problem(row)
    if problem:
        return problem
    caption, subj, rel, obj = row["caption"], row["subj"], row["relation"], row["obj"]
    found = caption_triplet(caption, subj, rel, obj, nlp)
    if found is None:
        return "no_svo"
    triplet, flipped = found
    mode = contrast_mode(rel) if contrast else "threshold"
    texts = [EvalSample(caption=caption, triplet=triplet)]
    if mode != "threshold":
        edited = contrast_caption(caption, subj, rel, obj)
        other = caption_triplet(*edited, nlp) if edited else None
        if other is None:
            return "no_contrast"
        texts.append(EvalSample(caption=edited[0], triplet=other[0]))
    image = _load_image(images_root, row["image"])
    if image is None:
        return "missing_image"
    if annotations is not None:
        boxes = boxes_from_coco(annotations, row["image"], subj, obj)
    elif detector is not None:
        if row["image"] not in detected:
            detected[row["image"]] = detector(image)
        boxes = select_boxes(detected[row["image"]], subj, obj)
    else:
        raise ValueError("VSR evaluation needs COCO annotations or a detector for the boxes")
    if boxes is None or not all(_inside(b, image) for b in boxes.values()):
        return "no_box"
    if flipped:  # the caption's grammatical subject is VSR's object (passive): boxes follow the spans
        boxes = {"subj": boxes["obj"], "obj": boxes["subj"]}
    return {"row": row, "mode": mode, "image_sample": EvalSample(image=image, boxes=boxes),
            "text_samples": texts}


def _rate(correct: int, n: int) -> float | None:
    return correct / n if n else None


def evaluate_vsr(encoder, rows: Sequence[dict], images_root: str, annotations: dict | None = None,
                 detector: Callable[[Image.Image], list[dict]] | None = None, rule: str = "contrast",
                 dev_rows: Sequence[dict] | None = None, progress: bool = True, nlp: Any = "default"
                 ) -> dict[str, Any]:
    """Accuracy of ``encoder`` (``encode.Encoder`` or anything with ``texts``/``images``) on VSR rows.

    ``annotations``: ``load_coco_annotations``' index; else ``detector`` (``YoloBoxes``) finds the
    instances. ``dev_rows`` (same images root and boxes) tune the threshold: required by
    ``rule="threshold"``, used by ``"contrast"`` for its symmetric relations. ``nlp``: a spaCy
    pipeline for the spans ("default": ``load_nlp()`` if a model is installed; None: string search).

    Returns ``accuracy``, ``n``, ``correct``, ``per_relation`` / ``per_category``
    (``{name: {"n", "accuracy"}}``), ``modes`` (rows per scoring mode), ``skipped`` (reason ->
    count, of ``rows``), ``dev`` (dev rows used and skipped), ``rule``, ``threshold`` and
    ``predictions`` (``id, image, caption, relation, label, pred, score, mode`` per row; ``score``
    is ``sim - sim_contrast`` for contrasted rows, ``sim - threshold`` otherwise; pred = score > 0).
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {RULES}")
    if rule == "threshold" and dev_rows is None:
        raise ValueError("the threshold rule needs dev_rows to tune its threshold on")
    if nlp == "default":
        nlp = _default_nlp()
    contrast = rule == "contrast"

    threshold, dev = None, None
    if dev_rows is not None:
        dev_items, dev_skipped = _similarities(encoder, dev_rows, images_root, annotations, detector, nlp,
                                               False, progress, "VSR dev")
        threshold = tune_threshold([i["sim"] for i in dev_items], [i["row"]["label"] for i in dev_items])
        dev = {"n": len(dev_items), "skipped": dict(dev_skipped)}

    items, skipped = _similarities(encoder, rows, images_root, annotations, detector, nlp, contrast,
                                   progress, "VSR")
    predictions = []
    for item in items:
        row = item["row"]
        if item["mode"] == "threshold":
            if threshold is None:
                skipped["no_contrast"] += 1  # symmetric relation, no dev rows to tune a threshold
                continue
            score = item["sim"] - threshold
        else:
            score = item["sim"] - item["sim_contrast"]
        predictions.append({"id": row["id"], "image": row["image"], "caption": row["caption"],
                            "relation": row["relation"], "label": int(row["label"]),
                            "pred": int(score > 0), "score": score, "mode": item["mode"]})

    groups: dict[str, dict[str, list[int]]] = {"per_relation": defaultdict(list), "per_category": defaultdict(list)}
    for p in predictions:
        hit = int(p["pred"] == p["label"])
        groups["per_relation"][p["relation"]].append(hit)
        groups["per_category"][RELATION_CATEGORIES[p["relation"]]].append(hit)
    correct = sum(p["pred"] == p["label"] for p in predictions)
    return {
        "rule": rule,
        "threshold": threshold,
        "n": len(predictions),
        "correct": correct,
        "accuracy": _rate(correct, len(predictions)),
        **{name: {k: {"n": len(h), "accuracy": _rate(sum(h), len(h))} for k, h in sorted(g.items())}
           for name, g in groups.items()},
        "modes": dict(Counter(p["mode"] for p in predictions)),
        "skipped": dict(skipped),
        "dev": dev,
        "predictions": predictions,
    }


def _default_nlp():
    """The training extractor's spaCy pipeline, or None (string search only) if no model is installed."""
    from sapretrain.curation.svo import load_nlp

    try:
        return load_nlp()
    except (ImportError, OSError):
        return None


def format_vsr_table(result: dict[str, Any]) -> str:
    """A markdown table: overall accuracy, then each relation by count (most frequent first)."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [f"VSR zero-shot, rule `{result['rule']}`"
             + (f", threshold {result['threshold']:.4f}" if result.get("threshold") is not None else ""),
             "", "| relation | n | accuracy (%) |", "|---|---:|---:|",
             f"| **overall** | {result['n']} | {pct(result['accuracy'])} |"]
    per_relation = sorted(result["per_relation"].items(), key=lambda kv: (-kv[1]["n"], kv[0]))
    lines += [f"| {name} | {stats['n']} | {pct(stats['accuracy'])} |" for name, stats in per_relation]
    if result["skipped"]:
        lines += ["", "skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result["skipped"].items()))]
    return "\n".join(lines)
