"""VSR evaluation (paper Table 1): is a templated spatial caption true of its image?

    rows, bad = read_vsr("zeroshot_test.jsonl")              # bad: unusable lines, with reasons
    detector = YoloBoxes("weights/yolov8x.pt")               # headline boxes
    result = evaluate_vsr(Encoder(model), rows, "coco/train2017", detector=detector, bad_lines=bad)
    gold = evaluate_vsr(Encoder(model), rows, "coco/train2017",       # secondary: gold COCO boxes
                        annotations=load_coco_annotations("instances_train2017.json"), bad_lines=bad)
    baseline = evaluate_geometry(rows, "coco/train2017", detector=detector, bad_lines=bad)  # no model
    print(format_vsr_table(result))

Each VSR row is a COCO image, a caption "The cat is under the table.", its relation, subject and
object (COCO category names; absent in VSR's ``random`` split) and a 0/1 label. Per row:

- **subject and object**: the row's ``subj``/``obj``, else derived from the caption by the
  training extractor (``derive_names``), ordered as the caption writes them.
- **boxes**, from one source per evaluation: a detector (``YoloBoxes``, mode ``detector``, the
  headline) or the COCO instance annotations (``boxes_from_coco``, mode ``gold``, a labelled
  secondary number); either way the largest instance of each category (if both are the same
  category, the larger of the two largest is the subject): ``sapretrain.boxes.choose_boxes``. No instance: skipped ``no_box``.
- **spans**: the caption's subject/relation/object character spans, from the training extractor
  (``caption_triplet``), else by string search (VSR captions are templated). None: ``no_svo``.
  If the extractor reads the caption with subject and object exchanged (passives: "X is enclosed
  by Y" gives Y | enclosed by | X, as in training), the boxes are exchanged with them.
- **score**, by ``rule`` (neither looks at the evaluated file's labels):

  - ``"contrast"`` (default): true iff ``sim(v, u(caption)) > sim(v, u(contrast caption))``, the
    contrast caption having the relation replaced by its opposite (``INVERSE``: left of -> right
    of, on -> under, contains -> inside, near -> far from, ...: the project's
    relations table, sapretrain/relations.py) or, for an asymmetric relation with no opposite
    (``against``, ``around``, ...), subject and object exchanged. ``v`` is the same for both
    captions (the boxes of the original caption). Symmetric relations with no opposite
    (``SYMMETRIC``: touching, opposite to, across from, along, among, between, with) cannot be contrasted:
    they use the threshold rule, with the threshold tuned on ``dev_rows``; without dev rows they
    are skipped ``no_contrast``.
  - ``"threshold"``: true iff ``sim(v, u(caption)) > t``, one cosine threshold ``t`` tuned on
    ``dev_rows`` (the midpoint that maximises dev accuracy) and applied unchanged.

``sim`` is the cosine of the model's ``v`` and ``u`` (both unit-norm; plain CLIP: its own cosine).
**Accuracy is over every row of the file**: a row that cannot be scored (and an unusable line)
counts as wrong and is listed with its reason; the accuracy over the scored rows only is
reported beside it as a secondary number. The reasons depend on the data, boxes and rule, never
on the model (a plain CLIP needs the spans too), so every model is scored on the same rows.

The **geometry baseline** (``evaluate_geometry``, no model) applies ``GEOMETRY_RULES`` to the
same boxes (left of: subject centre left of the object's; above / on: higher centre; in front
of: lower bottom edge; inside: half the subject box in the object box; touching: the boxes
overlap; near: edge gap under the smaller box's side; ...), and predicts the dev majority
label for the relations without a rule.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Sequence

from PIL import Image
from tqdm import tqdm

from sapretrain import relations, storage
from sapretrain.boxes import area as _area
from sapretrain.boxes import as_detection, choose_boxes
from sapretrain.detector import YoloDetector
from sapretrain.eval.encode import EvalSample

REQUIRED_FIELDS = ("image", "caption", "label", "relation")
NAME_FIELDS = ("subj", "obj")  # COCO category names; absent in VSR's random split: derived from the caption
RULES = ("contrast", "threshold")
GEOMETRY_LABEL = "geometry (no model)"

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
# bijection and not restricted to VSR's own phrases; only the caption's relation words change. Both
# tables are the project's one relations table (sapretrain/relations.py, the shipped
# configs/curation/negatives.yaml) restricted to VSR's relations.
INVERSE: dict[str, str] = {r: inv for r in sorted(RELATIONS) if (inv := relations.inverse(r, "spatial"))}
# Symmetric and without an opposite: exchanging subject and object gives no contrast.
SYMMETRIC = frozenset(r for r in RELATIONS if r not in INVERSE and relations.is_symmetric(r))
# Every other relation (against, past, around, across, down from) is contrasted by exchanging
# subject and object.

# Relations written as a verb ("The bowl contains the apple."), all others follow a copula.
VERB_RELATIONS = frozenset(("contains", "has as a part", "consists of"))


# --------------------------------------------------------------------------------------------
# Reading


def read_vsr(path: str) -> tuple[list[dict], list[dict]]:
    """The usable rows of a VSR JSONL file, and its unusable lines ``{"id", "line", "reason"}``.

    Reasons: ``not_json``, ``missing_field``, ``bad_label`` (not 0/1), ``unknown_relation``. Each
    row keeps its fields; ``id`` is the row's own ``id`` or ``<file name>:<line number>``. Rows
    without ``subj``/``obj`` (VSR's random split) are kept: the evaluation derives them from the
    caption. The unusable lines still count as rows of the file (wrong) in ``evaluate_vsr``.
    """
    fs, fpath = storage.url_to_fs(path)
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    rows, bad = [], []
    with fs.open(fpath, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                problem = "not_json"
            else:
                problem = row_problem(row)
            row_id = f"{name}:{number}"
            if problem:
                given = row.get("id") if problem != "not_json" and isinstance(row, dict) else None
                bad.append({"id": str(given or row_id), "line": number, "reason": problem})
                continue
            rows.append({**row, "id": str(row.get("id", row_id))})
    return rows, bad


def bad_line_counts(bad: Sequence[dict]) -> Counter:
    """``read_vsr``'s unusable lines counted by reason."""
    return Counter(b["reason"] for b in bad)


def row_problem(row: Any) -> str | None:
    """Why a parsed VSR row cannot be evaluated, or None (``subj``/``obj`` may be absent)."""
    if not isinstance(row, dict) or any(row.get(k) in (None, "") for k in REQUIRED_FIELDS):
        return "missing_field"
    if type(row["label"]) is not int or row["label"] not in (0, 1):  # not "1", 1.0 or True
        return "bad_label"
    if not all(isinstance(row[k], str) for k in ("image", "caption", "relation")):
        return "missing_field"
    if any(k in row and row[k] not in (None, "") and not isinstance(row[k], str) for k in NAME_FIELDS):
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


def select_boxes(objects: Iterable, subj: str, obj: str, matcher=None,
                 texts: tuple[str, str] | None = None) -> dict[str, list[float]] | None:
    """The ``boxes_from_coco`` rule over one image's instances: COCO ``{"category", "bbox_xywh",
    "iscrowd"}`` or detections (``Detection``, ``{"name", "box"}``). The project's box choice
    (``sapretrain.boxes.choose_boxes``, rule "nouns") with no overlap rule (two instances of one
    category may overlap): exact category names, or with ``matcher`` (detector boxes: the
    curation's ``NounMatcher``) nouns matched to any detector's class names ("red cube" /
    "block"), ``texts`` (the rows' subject and object words) choosing among names with modifiers
    ("red cube" before "blue cube"). For COCO's names both ways agree."""
    found = []
    for o in objects:
        if isinstance(o, dict) and "bbox_xywh" in o:
            if o.get("iscrowd"):
                continue
            x, y, w, h = (float(v) for v in o["bbox_xywh"])
            o = {"name": o["category"], "box": [x, y, x + w, y + h]}
        d = as_detection(o)
        if d.box[2] > d.box[0] and d.box[3] > d.box[1]:
            found.append(d)
    if matcher is None:
        return choose_boxes(found, subj.lower(), obj.lower(), matcher=None, same_instance_iou=None).boxes
    words = dict(zip(("subj", "obj"), texts or (subj, obj)))
    return choose_boxes(found, matcher.noun(subj), matcher.noun(obj), matcher=matcher, same_instance_iou=None,
                        texts=words).boxes


# The project's one detector wrapper: ``YoloBoxes("yolov8n.pt")([image])`` -> ``[[Detection]]``.
# A COCO-trained YOLO's class names are COCO's category names, which VSR's subj/obj use; other
# weights' names (the synthetic scenes' "red cube") are matched through the curation's nouns.
YoloBoxes = YoloDetector
DETECT_CHUNK = 64  # images per detector call (the detector batches within it)


def _detect_images(rows: Sequence[dict], images_root: str, detector, detected: dict) -> None:
    """Detections of the rows' images not yet in ``detected``, in one detector call."""
    todo = list(dict.fromkeys(r["image"] for r in rows if row_problem(r) is None and r["image"] not in detected))
    images = {f: _load_image(images_root, f) for f in todo}
    readable = [f for f in todo if images[f] is not None]
    if readable:
        detected.update(zip(readable, detector([images[f] for f in readable])))


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


def _noun_matcher():
    """The curation's noun -> COCO category matcher (configs/curation/rois.yaml synonyms), once."""
    global _MATCHER
    if _MATCHER is None:
        from sapretrain.curation.rois import NounMatcher, load_roi_config

        cfg = load_roi_config()
        _MATCHER = NounMatcher(cfg.synonyms, cfg.hypernyms)
    return _MATCHER


_MATCHER = None


def derive_names(caption: str, relation: str, nlp) -> dict[str, str] | None:
    """Subject and object of a caption without ``subj``/``obj`` fields (VSR's random split).

    The training extractor's triplet whose relation text matches ``relation`` (equal, else one
    containing the other; the first such triplet), its parts ordered as the caption writes them:
    VSR's subject precedes the relation, so a passive the extractor reads backwards ("X is
    enclosed by Y" -> Y | enclosed by | X) still gives X as the subject. Returns the caption words
    (``subj``, ``obj``: for spans and contrast captions) and their COCO categories
    (``subj_category``, ``obj_category``: for boxes, through the curation's synonyms, "man" ->
    "person"); None without such a triplet or without a spaCy pipeline.
    """
    if nlp is None:
        return None
    from sapretrain.curation.svo import extract_triplets

    wanted = relation.lower()
    best, best_score = None, 0
    for t in extract_triplets(nlp(caption)):
        rel = t["rel"]["text"].lower()
        score = 2 if rel == wanted else 1 if rel and (_find(wanted, rel) >= 0 or _find(rel, wanted) >= 0) else 0
        if score > best_score:
            best, best_score = t, score
    if best is None:
        return None
    first, second = sorted((best["subj"], best["obj"]), key=lambda part: part["start"])
    matcher = _noun_matcher()

    def category(part: dict) -> str:
        noun = matcher.noun(part["text"], part.get("head"))
        return matcher.category.get(noun, noun)

    return {"subj": first["text"], "obj": second["text"],
            "subj_category": category(first), "obj_category": category(second)}


def row_names(row: dict, nlp) -> dict[str, Any] | None:
    """The row's subject/object words and categories: its own fields, else ``derive_names``."""
    if all(isinstance(row.get(k), str) and row[k] for k in NAME_FIELDS):
        return {"subj": row["subj"], "obj": row["obj"], "subj_category": row["subj"], "obj_category": row["obj"],
                "derived": False}
    found = derive_names(row["caption"], row["relation"], nlp)
    return {**found, "derived": True} if found else None


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


def _check_boxes(annotations, detector) -> str:
    """The box mode of one evaluation: ``gold`` (COCO annotations) or ``detector``; exactly one source."""
    if (annotations is None) == (detector is None):
        raise ValueError("VSR evaluation takes one box source: COCO annotations (gold) or a detector")
    return "gold" if annotations is not None else "detector"


def _locate(row: dict, images_root: str, annotations, detector, detected: dict, nlp) -> tuple | str:
    """``(names, image, boxes)`` of a row in VSR's subject/object order, or why it has none."""
    problem = row_problem(row)
    if problem:
        return problem
    names = row_names(row, nlp)
    if names is None:
        return "no_svo"
    image = _load_image(images_root, row["image"])
    if image is None:
        return "missing_image"
    subj, obj = names["subj_category"], names["obj_category"]
    if annotations is not None:
        boxes = boxes_from_coco(annotations, row["image"], subj, obj)
    else:
        if row["image"] not in detected:
            detected[row["image"]] = detector([image])[0]
        boxes = select_boxes(detected[row["image"]], subj, obj, matcher=_noun_matcher(),
                             texts=(names["subj"], names["obj"]))
    if boxes is None or not all(_inside(b, image) for b in boxes.values()):
        return "no_box"
    return names, image, boxes


def _similarities(encoder, rows: Sequence[dict], images_root: str, annotations, detector, nlp,
                  contrast: bool, progress: bool, desc: str, detected: dict
                  ) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Per scorable row: the row, ``mode``, ``sim`` and (contrasted rows) ``sim_contrast``; the
    other rows with the reason they were skipped.

    ``contrast``: build contrast captions; rows whose relation has none get mode ``threshold``.
    """
    skipped: list[tuple[dict, str]] = []
    done: list[dict] = []
    chunk_size = getattr(encoder, "batch_size", 64)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="row")
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        if detector is not None:
            _detect_images(chunk, images_root, detector, detected)
        items, image_samples, text_samples = [], [], []
        for row in chunk:
            item = _prepare(row, images_root, annotations, detector, detected, nlp, contrast)
            if isinstance(item, str):
                skipped.append((row, item))
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
    located = _locate(row, images_root, annotations, detector, detected, nlp)
    if isinstance(located, str):
        return located
    names, image, boxes = located
    caption, subj, rel, obj = row["caption"], names["subj"], row["relation"], names["obj"]
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
    if flipped:  # the caption's grammatical subject is VSR's object (passive): boxes follow the spans
        boxes = {"subj": boxes["obj"], "obj": boxes["subj"]}
    return {"row": row, "mode": mode, "derived": names["derived"],
            "image_sample": EvalSample(image=image, boxes=boxes), "text_samples": texts}


def _rate(correct: int, n: int) -> float | None:
    return correct / n if n else None


def _with_ids(rows: Sequence[Any]) -> list[dict]:
    """Rows as given (``read_vsr`` sets ``id``); a row without one gets its index, a non-mapping
    becomes an empty row that ``row_problem`` rejects (``missing_field``)."""
    return [r if isinstance(r, dict) and "id" in r else {**(r if isinstance(r, dict) else {}), "id": f"row {i}"}
            for i, r in enumerate(rows)]


def _summarise(rows: Sequence[dict], scored: Sequence[dict], skipped: Sequence[tuple[dict, str]],
               bad_lines: Sequence[dict]) -> dict[str, Any]:
    """Accuracy over ALL rows of the file (skipped rows and unusable lines count as wrong), the
    scored-only accuracy beside it, per relation / category, skips by reason, and every row's
    prediction (``pred`` None and ``skipped`` its reason for a row that was not scored)."""
    reason_of = {id(row): reason for row, reason in skipped}
    by_row = {id(p.pop("_row")): p for p in scored}
    predictions = []
    for row in rows:
        if id(row) in by_row:
            predictions.append(by_row[id(row)])
        else:
            predictions.append({"id": row["id"], "image": row.get("image"), "caption": row.get("caption"),
                                "relation": row.get("relation"), "label": row.get("label"), "pred": None,
                                "skipped": reason_of.get(id(row), "not_scored")})
    predictions += [{"id": b["id"], "line": b["line"], "pred": None, "skipped": b["reason"]} for b in bad_lines]

    groups: dict[str, dict[str, list[int]]] = {"per_relation": defaultdict(list), "per_category": defaultdict(list)}
    for p in predictions:
        if p.get("relation") in RELATIONS:
            hit = int(p["pred"] is not None and p["pred"] == p["label"])
            groups["per_relation"][p["relation"]].append(hit)
            groups["per_category"][RELATION_CATEGORIES[p["relation"]]].append(hit)
    total = len(predictions)
    correct = sum(p["pred"] is not None and p["pred"] == p["label"] for p in predictions)
    n_scored = sum(p["pred"] is not None for p in predictions)
    skipped_rows = [{"id": p["id"], "reason": p["skipped"]} for p in predictions if p["pred"] is None]
    return {
        "n": total,
        "correct": correct,
        "accuracy": _rate(correct, total),
        "scored": n_scored,
        "accuracy_scored": _rate(correct, n_scored),
        **{name: {k: {"n": len(h), "accuracy": _rate(sum(h), len(h))} for k, h in sorted(g.items())}
           for name, g in groups.items()},
        "skipped": dict(Counter(r["reason"] for r in skipped_rows)),
        "skipped_rows": skipped_rows,
        "derived_names": sum(1 for p in predictions if p.get("derived")),
        "predictions": predictions,
    }


def evaluate_vsr(encoder, rows: Sequence[dict], images_root: str, annotations: dict | None = None,
                 detector: Callable[[list], list[list]] | None = None, rule: str = "contrast",
                 dev_rows: Sequence[dict] | None = None, bad_lines: Sequence[dict] = (), progress: bool = True,
                 nlp: Any = "default", detections: dict | None = None) -> dict[str, Any]:
    """Accuracy of ``encoder`` (``encode.Encoder`` or anything with ``texts``/``images``) on VSR rows.

    Boxes from exactly one source: ``annotations`` (``load_coco_annotations``' index: ``gold``)
    or ``detector`` (``YoloBoxes``, i.e. ``sapretrain.detector.YoloDetector``, or any
    ``detector(images) -> [[Detection]]``: ``detector``). ``dev_rows`` (same images root and boxes) tune
    the threshold: required by ``rule="threshold"``, used by ``"contrast"`` for its symmetric
    relations. ``bad_lines``: ``read_vsr``'s unusable lines, counted as rows of the file. ``nlp``:
    a spaCy pipeline for the spans and for rows without subj/obj ("default": ``load_nlp()`` if a
    model is installed; None: string search, and such rows are skipped ``no_svo``).
    ``detections``: image file name -> the detector's instances, filled and reused, so several
    models (and the geometry baseline) share one detection pass.

    Returns ``accuracy`` (correct / ``n``, ``n`` = every row of the file: a row that could not be
    scored counts as wrong), ``accuracy_scored`` (correct / ``scored``, secondary),
    ``per_relation`` / ``per_category`` (``{name: {"n", "accuracy"}}``, all rows), ``modes``
    (rows per scoring mode), ``skipped`` (reason -> count) and ``skipped_rows`` (``id``,
    ``reason``), ``dev`` (dev rows used and skipped), ``rule``, ``threshold``, ``boxes`` and
    ``predictions`` (every row: ``id, image, caption, relation, label, pred, score, mode``, or
    ``pred`` None and ``skipped``; ``score`` is ``sim - sim_contrast`` for contrasted rows,
    ``sim - threshold`` otherwise; pred = score > 0).
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {RULES}")
    if rule == "threshold" and dev_rows is None:
        raise ValueError("the threshold rule needs dev_rows to tune its threshold on")
    box_mode = _check_boxes(annotations, detector)
    if nlp == "default":
        nlp = _default_nlp()
    contrast = rule == "contrast"
    rows = _with_ids(rows)
    detections = {} if detections is None else detections

    threshold, dev = None, None
    if dev_rows is not None:
        dev_items, dev_skipped = _similarities(encoder, dev_rows, images_root, annotations, detector, nlp,
                                               False, progress, "VSR dev", detections)
        if dev_items:
            threshold = tune_threshold([i["sim"] for i in dev_items], [i["row"]["label"] for i in dev_items])
        dev = {"n": len(dev_items), "skipped": dict(Counter(reason for _, reason in dev_skipped))}

    items, skipped = _similarities(encoder, rows, images_root, annotations, detector, nlp, contrast,
                                   progress, "VSR", detections)
    scored = []
    for item in items:
        row = item["row"]
        if item["mode"] == "threshold":
            if threshold is None:
                skipped.append((row, "no_contrast"))  # symmetric relation, no dev rows to tune a threshold
                continue
            score = item["sim"] - threshold
        else:
            score = item["sim"] - item["sim_contrast"]
        scored.append({"_row": row, "id": row["id"], "image": row["image"], "caption": row["caption"],
                       "relation": row["relation"], "label": int(row["label"]), "pred": int(score > 0),
                       "score": score, "mode": item["mode"], "derived": item["derived"]})
    modes = dict(Counter(p["mode"] for p in scored))
    return {"rule": rule, "threshold": threshold, "boxes": box_mode,
            **_summarise(rows, scored, skipped, bad_lines), "modes": modes, "dev": dev}


# --------------------------------------------------------------------------------------------
# The box-geometry baseline (no model)


def _centre(b: Sequence[float]) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    return _area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def _gap(a: Sequence[float], b: Sequence[float]) -> float:
    """Distance between the boxes' edges (0 when they overlap or touch)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return (dx * dx + dy * dy) ** 0.5


def _contained(a: Sequence[float], b: Sequence[float]) -> bool:
    """At least half of box ``a`` lies inside box ``b``."""
    return _area(a) > 0 and _intersection(a, b) >= 0.5 * _area(a)


def _near(a: Sequence[float], b: Sequence[float]) -> bool:
    """The edge gap is under the side of the smaller box (sqrt of its area)."""
    return _gap(a, b) < min(_area(a), _area(b)) ** 0.5


def _left(s, o):
    return _centre(s)[0] < _centre(o)[0]


def _above(s, o):  # image y grows downwards
    return _centre(s)[1] < _centre(o)[1]


def _front(s, o):  # the lower bottom edge is nearer the camera on a ground plane
    return s[3] > o[3]


# relation -> rule on (subject box, object box) in pixels, VSR's subject/object order.
GEOMETRY_RULES: dict[str, Callable[[Sequence[float], Sequence[float]], bool]] = {
    **dict.fromkeys(("left of", "at the left side of"), _left),
    **dict.fromkeys(("right of", "at the right side of"), lambda s, o: _left(o, s)),
    **dict.fromkeys(("above", "over", "on top of", "on"), _above),
    **dict.fromkeys(("below", "under", "beneath"), lambda s, o: _above(o, s)),
    "in front of": _front,
    **dict.fromkeys(("behind", "at the back of"), lambda s, o: _front(o, s)),
    **dict.fromkeys(("inside", "within", "in", "into", "enclosed by", "part of"), _contained),
    **dict.fromkeys(("contains", "surrounding", "has as a part", "consists of"), lambda s, o: _contained(o, s)),
    **dict.fromkeys(("outside", "out of"), lambda s, o: not _contained(s, o)),
    **dict.fromkeys(("touching", "attached to", "connected to", "against"), lambda s, o: _intersection(s, o) > 0),
    "detached from": lambda s, o: _intersection(s, o) == 0,
    **dict.fromkeys(("near", "close to", "next to", "beside", "by", "adjacent to", "alongside",
                     "at the side of"), _near),
    **dict.fromkeys(("far from", "far away from"), lambda s, o: not _near(s, o)),
}
assert set(GEOMETRY_RULES) <= RELATIONS


def majority_labels(dev_rows: Sequence[dict] | None) -> tuple[dict[str, int], int]:
    """Per relation the majority dev label (1 on a tie), and the overall one (1 without dev rows)."""
    by_relation: dict[str, list[int]] = defaultdict(list)
    for row in dev_rows or ():
        if row_problem(row) is None:
            by_relation[row["relation"]].append(int(row["label"]))
    everything = [y for ys in by_relation.values() for y in ys]
    overall = int(2 * sum(everything) >= len(everything))
    return {rel: int(2 * sum(ys) >= len(ys)) for rel, ys in by_relation.items()}, overall


def evaluate_geometry(rows: Sequence[dict], images_root: str, annotations: dict | None = None,
                      detector: Callable[[list], list[list]] | None = None,
                      dev_rows: Sequence[dict] | None = None, bad_lines: Sequence[dict] = (),
                      nlp: Any = "default", detections: dict | None = None) -> dict[str, Any]:
    """The no-model baseline: ``GEOMETRY_RULES`` on the subject/object boxes of each row, the dev
    majority label (per relation, else overall, else true) for relations without a rule.

    Same rows, boxes (one source, as ``evaluate_vsr``) and result format as ``evaluate_vsr``
    (rule ``geometry``; ``modes``: ``rule`` / ``majority``); a row without boxes counts as wrong.
    """
    box_mode = _check_boxes(annotations, detector)
    if nlp == "default":
        nlp = _default_nlp()
    majority, overall = majority_labels(dev_rows)
    rows = _with_ids(rows)
    detected = {} if detections is None else detections
    scored, skipped = [], []
    for k, row in enumerate(rows):
        if detector is not None and k % DETECT_CHUNK == 0:
            _detect_images(rows[k:k + DETECT_CHUNK], images_root, detector, detected)
        located = _locate(row, images_root, annotations, detector, detected, nlp)
        if isinstance(located, str):
            skipped.append((row, located))
            continue
        names, _, boxes = located
        rule = GEOMETRY_RULES.get(row["relation"])
        pred = int(rule(boxes["subj"], boxes["obj"])) if rule else majority.get(row["relation"], overall)
        scored.append({"_row": row, "id": row["id"], "image": row["image"], "caption": row["caption"],
                       "relation": row["relation"], "label": int(row["label"]), "pred": pred,
                       "mode": "rule" if rule else "majority", "derived": names["derived"]})
    modes = dict(Counter(p["mode"] for p in scored))
    return {"rule": "geometry", "threshold": None, "boxes": box_mode,
            **_summarise(rows, scored, skipped, bad_lines), "modes": modes,
            "dev": {"n": len(dev_rows or ()), "majority": majority, "overall_majority": overall}}


def _default_nlp():
    """The training extractor's spaCy pipeline, or None (string search only) if no model is installed."""
    from sapretrain.curation.svo import load_nlp

    try:
        return load_nlp()
    except (ImportError, OSError):
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_vsr_table(result: dict[str, Any]) -> str:
    """A markdown table: overall accuracy (all rows; scored-only beside it), then each relation by
    count (most frequent first), then the skips."""
    lines = [f"VSR, rule `{result['rule']}`, boxes `{result.get('boxes', '?')}`"
             + (f", threshold {result['threshold']:.4f}" if result.get("threshold") is not None else ""),
             "", "| relation | n | accuracy (%) |", "|---|---:|---:|",
             f"| **overall (all rows)** | {result['n']} | {_pct(result['accuracy'])} |",
             f"| overall (scored rows only, secondary) | {result['scored']} | {_pct(result['accuracy_scored'])} |"]
    per_relation = sorted(result["per_relation"].items(), key=lambda kv: (-kv[1]["n"], kv[0]))
    lines += [f"| {name} | {stats['n']} | {_pct(stats['accuracy'])} |" for name, stats in per_relation]
    if result["skipped"]:
        lines += ["", "skipped (counted wrong): " + ", ".join(f"{k} {v}" for k, v in sorted(result["skipped"].items()))]
    return "\n".join(lines)


def format_vsr_summary(results: dict[str, dict[str, dict]]) -> str:
    """One table of every (model or baseline, box mode): ``results[label][mode]`` = a result."""
    lines = ["| model | boxes | accuracy, all rows (%) | correct / rows | accuracy, scored only (%) | scored | skipped |",
             "|---|---|---:|---:|---:|---:|---|"]
    for label, by_mode in results.items():
        for mode, r in by_mode.items():
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())) or "none"
            lines.append(f"| {label} | {mode} | {_pct(r['accuracy'])} | {r['correct']} / {r['n']} | "
                         f"{_pct(r['accuracy_scored'])} | {r['scored']} | {skipped} |")
    return "\n".join(lines) + "\n"
