"""Subject and object boxes among an image's detections: one function, its rules named.

    matcher = default_matcher()                               # configs/curation/rois.yaml synonyms
    choice = choose_boxes(detections, "man", "horse", matcher=matcher)
    choice.boxes            # {"subj": [x0, y0, x1, y1], "obj": [...]} (pixels), or None
    choice.reason, choice.detail, choice.how               # why none; per part how it was found
    found = find_boxes(YoloDetector("yolov8n.pt"), image, "man", "horse")   # detect, then choose

``detections`` are ``sapretrain.detector.Detection`` or mappings ``{"name", "box", "score"?}``
(ground-truth objects too). Every rule picks two **distinct** instances, subject and object, and
never reads the relation (so boxes cannot leak the label). ``rule``:

- ``"nouns"`` (curation ROIs, SugarCrepe, VSR, the API): the parts' nouns against the detections'
  names. With a ``NounMatcher`` a name matches at level 0 (same noun), 1 (same category through
  the synonyms: "man" / "person") or 2 (hypernym: "animal" / "dog"), up to ``max_level``;
  without one, only the same lowercase name (VSR: subject and object are COCO category names).
  Of the (subject, object) pairs that are not one instance (IoU >= ``same_instance_iou``; None:
  only the same detection), the first by (sum of levels, modifier fit, subject level, larger
  subject box, larger object box) wins: when both parts name one category the subject gets the
  largest instance and the object the next. The modifier fit (with ``texts``, the parts' whole
  texts) counts the words of a class name besides its noun that the part also says: a detector
  whose classes are "red cube" / "blue cube" gives "the red block" the red one whatever the
  sizes (COCO's names have no such words). ``same_category=False`` refuses such pairs. None:
  ``no_box`` (a part matches nothing) or ``same_box`` (both only match one instance).
- ``"largest"`` (DoTA: one pair per frame for many descriptions, so no nouns): only ``classes``
  count; the subject is the largest of ``subject_classes`` (else the largest), the object the
  largest other that is not the subject's box again (IoU < 0.7). The descriptions are about the road users nearest the camera, the largest.
- ``"attributes"`` (the synthetic scenes' detector, whose classes are "colour shape"): the
  parts' texts and the class names are read by ``attributes`` (text -> ``{"shape", "color",
  "size", ...}``); overlapping detections (IoU >= 0.7) merge into one instance with every label;
  the pair with the largest summed agreement (per label +1 per shared attribute, -1 per
  contradicted one, times its score; size excluded) wins, ties broken by the size words ("large"
  / "small": the larger / smaller of the two), then by confidence.

``"largest"`` and ``"attributes"`` stand the whole frame (``width`` x ``height``) in for a part
they cannot fill (``how[part] == "missing"``) when the size is given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

from sapretrain.detector import Detection

PARTS = ("subj", "obj")
RULES = ("nouns", "largest", "attributes")
SAME_INSTANCE_IOU = 0.7  # "attributes": detections overlapping this much are one object


# ---------------------------------------------------------------------------------------------
# Box geometry


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (area(a) + area(b) - inter)


def clip_box(box: Any, width: float | None, height: float | None, min_size: float = 2.0,
             decimals: int | None = 2) -> list[float] | None:
    """``box`` clipped to the image, or None when it is malformed or under ``min_size`` px a side;
    rounded to ``decimals`` (None: as computed)."""
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
    return [x0, y0, x1, y1] if decimals is None else [round(v, decimals) for v in (x0, y0, x1, y1)]


def as_detection(d: Detection | Mapping[str, Any]) -> Detection:
    """A ``Detection`` from itself or from ``{"name", "box", "score"?}``."""
    if isinstance(d, Detection):
        return d
    try:
        return Detection(str(d["name"]), tuple(float(v) for v in d["box"]), float(d.get("score", 1.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"a detection needs 'name' and a 4-number 'box' (x0, y0, x1, y1): {d!r}") from e


def clip_detections(detections: Iterable, width: float | None, height: float | None, min_size: float = 2.0,
                    decimals: int | None = 2) -> list[Detection]:
    """The detections whose boxes survive ``clip_box``, with the clipped boxes."""
    out = []
    for d in map(as_detection, detections):
        box = clip_box(list(d.box), width, height, min_size, decimals)
        if box is not None:
            out.append(Detection(d.name, tuple(box), d.score))
    return out


# ---------------------------------------------------------------------------------------------
# Nouns

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
NOUN_MEMO = 100_000  # memoised nouns and levels per matcher (a memo starts over when full)


class NounMatcher:
    """Normalised nouns and how well a part's noun matches a box's name (docs/curation.md §7).

    A noun is the head lemma (or the last word), singular and lowercase, or the known multi-word
    name ending at it ("hot dog"); ``level`` is 0 same noun, 1 same category (``synonyms``:
    category -> words), 2 through ``hypernyms`` (word -> categories it covers), None otherwise.
    """

    def __init__(self, synonyms: dict[str, list[str]], hypernyms: dict[str, list[str]]):
        from sapretrain.config import ConfigError

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
        self._nouns: dict[tuple[str, str | None], str] = {}  # noun() and level() memos: names repeat
        self._levels: dict[tuple[str, str], int | None] = {}

    def noun(self, text: str, head: str | None = None) -> str:
        """The noun of a part (``text`` with its ``head`` lemma) or of an object/class name."""
        if type(text) is not str or not (head is None or type(head) is str):
            return self._noun(text, head)
        key = (text, head)
        found = self._nouns.get(key)
        if found is None:
            if len(self._nouns) >= NOUN_MEMO:
                self._nouns.clear()
            found = self._nouns[key] = self._noun(text, head)
        return found

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

    def _noun(self, text: str, head: str | None) -> str:
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
        key = (noun, name)
        if key in self._levels:
            return self._levels[key]
        if len(self._levels) >= NOUN_MEMO:
            self._levels.clear()
        found = self._levels[key] = self._level(noun, name)
        return found

    def _level(self, noun: str, name: str) -> int | None:
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


@lru_cache(maxsize=1)
def default_matcher() -> NounMatcher:
    """The ``NounMatcher`` of the shipped ``configs/curation/rois.yaml`` (read once)."""
    from sapretrain.config import read_yaml
    from sapretrain.resources import config_path

    data = read_yaml(config_path("curation/rois.yaml"))
    return NounMatcher(data.get("synonyms") or {}, data.get("hypernyms") or {})


class _ExactNames:
    """No matcher: a part matches a detection of the same lowercase name only (level 0)."""

    @staticmethod
    def noun(text: str, head: str | None = None) -> str:
        return " ".join(str(text).lower().split())

    level = staticmethod(lambda noun, name: 0 if noun and noun == name else None)
    category: dict[str, str] = {}
    describe = staticmethod(lambda noun: f"'{noun}'")


# ---------------------------------------------------------------------------------------------
# The choice


@dataclass
class Choice:
    boxes: dict[str, list[float]] | None  # {"subj", "obj"} pixels, when found
    reason: str | None = None  # else no_box / same_box
    detail: str | None = None
    how: dict[str, str] | None = None  # per part: detected | by_size | missing (the whole frame)
    source: str | None = None  # find_boxes: "detector"


def choose_boxes(detections: Iterable, subj: str | None = None, obj: str | None = None, *, rule: str = "nouns",
                 matcher: NounMatcher | None = None, max_level: int = 2, same_instance_iou: float | None = 0.9,
                 same_category: bool = True, classes: Iterable[str] | None = None,
                 subject_classes: Iterable[str] = (), attributes: Callable[[str], dict] | None = None,
                 width: float | None = None, height: float | None = None,
                 texts: Mapping[str, str] | None = None) -> Choice:
    """Subject and object boxes among ``detections`` by ``rule`` (see the module doc). ``subj`` /
    ``obj``: nouns as ``matcher.noun`` gives them ("nouns"), the parts' texts ("attributes"),
    unused ("largest"). ``texts`` ("nouns"): the parts' whole texts ({"subj", "obj"}), for the
    class names' modifier words ("red" of "red cube")."""
    dets = [as_detection(d) for d in detections]
    if rule == "nouns":
        if not subj or not obj:
            raise ValueError("rule 'nouns' needs the subject and object nouns")
        return _by_nouns(dets, {"subj": subj, "obj": obj}, matcher or _ExactNames(), max_level,
                         same_instance_iou, same_category, texts)
    whole = None if width is None or height is None else [0.0, 0.0, float(width), float(height)]
    if rule == "largest":
        return _largest(dets, None if classes is None else frozenset(classes), frozenset(subject_classes), whole)
    if rule == "attributes":
        if attributes is None or not subj or not obj:
            raise ValueError("rule 'attributes' needs the parts' texts and an attributes(text) reader")
        return _by_attributes(dets, {"subj": subj, "obj": obj}, attributes, whole)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def modifiers(name: str, noun: str) -> frozenset[str]:
    """The words of a class or object name besides its noun: ``{"red"}`` of "red cube" (COCO's
    names are all nouns, "traffic light" included, so they have none)."""
    return frozenset(WORD.findall(str(name).lower())) - frozenset(noun.split())


def _fit(mods: frozenset[str], text: str | None) -> int:
    """How many of a name's modifier words the part's text also says ("red cube" / "the red block": 1)."""
    return len(mods & frozenset(WORD.findall(text.lower()))) if mods and text else 0


def _by_nouns(dets: list[Detection], nouns: dict[str, str], matcher, max_level: int,
              same_instance_iou: float | None, same_category: bool,
              texts: Mapping[str, str] | None = None) -> Choice:
    names = [matcher.noun(d.name) for d in dets]
    mods = [modifiers(d.name, n) for d, n in zip(dets, names)]
    texts = texts or {}
    cands = {}
    for part in PARTS:
        # (level, -fit, -area, index): best match first, then the name whose modifiers the part
        # says ("red cube" for "the red block" before "blue cube"), then the larger box
        found = [(lvl, -_fit(mods[i], texts.get(part)), -area(d.box), i) for i, d in enumerate(dets)
                 if (lvl := matcher.level(nouns[part], names[i])) is not None and lvl <= max_level]
        cands[part] = sorted(found)
    missing = [p for p in PARTS if not cands[p]]
    if missing:
        seen = ", ".join(sorted(set(names))[:12]) or "nothing"
        detail = "; ".join(f"{p}: no {matcher.describe(nouns[p])}" for p in missing)
        return Choice(None, "no_box", f"{detail} among [{seen}]")
    cats = [matcher.category.get(n, n) for n in names]
    best = None
    for ls, fs, neg_s, i in cands["subj"]:
        for lo, fo, neg_o, j in cands["obj"]:
            if i == j or (same_instance_iou is not None and iou(dets[i].box, dets[j].box) >= same_instance_iou):
                continue
            if not same_category and cats[i] == cats[j]:
                continue
            rank = (ls + lo, fs + fo, ls, neg_s, neg_o, i, j)
            if best is None or rank < best:
                best = rank
    if best is None:
        return Choice(None, "same_box", f"subj {matcher.describe(nouns['subj'])} and obj "
                      f"{matcher.describe(nouns['obj'])} only match one instance")
    i, j = best[-2:]
    return Choice({"subj": list(dets[i].box), "obj": list(dets[j].box)}, how={"subj": "detected", "obj": "detected"})


def _fill(found: dict[str, list[float]], whole: list[float] | None) -> Choice:
    """``found`` parts, the whole frame standing in for the others; without a frame size both
    parts must be found."""
    how = {p: "detected" if p in found else "missing" for p in PARTS}
    if whole is not None:
        return Choice({p: list(found.get(p, whole)) for p in PARTS}, how=how)
    if len(found) < 2:
        return Choice(None, "no_box", f"{len(found)} of 2 parts found", how=how)
    return Choice({p: list(found[p]) for p in PARTS}, how=how)


def _largest(dets: list[Detection], classes: frozenset | None, subject_classes: frozenset,
             whole: list[float] | None) -> Choice:
    kept = sorted((d for d in dets if classes is None or d.name in classes), key=lambda d: area(d.box), reverse=True)
    if not kept:
        return _fill({}, whole)
    subject = next((i for i, d in enumerate(kept) if d.name in subject_classes), 0)
    # another object, not the subject again under a second label (NMS is per class: a detector
    # often reports one vehicle as both "car" and "truck")
    rest = [d for i, d in enumerate(kept) if i != subject and iou(d.box, kept[subject].box) < SAME_INSTANCE_IOU]
    found = {"subj": list(kept[subject].box)}
    if rest:
        found["obj"] = list(rest[0].box)
    return _fill(found, whole)


def instances(detections: Iterable, same_iou: float = SAME_INSTANCE_IOU) -> list[dict]:
    """Detections merged into objects: boxes overlapping by ``same_iou`` are one instance that
    keeps every label with its score (``{"box", "score", "labels": [(name, score)]}``). Most
    confident first."""
    merged: list[dict] = []
    for d in sorted(map(as_detection, detections), key=lambda d: -d.score):
        box = list(d.box)
        for inst in merged:
            if iou(inst["box"], box) >= same_iou:
                inst["labels"].append((d.name, d.score))
                break
        else:
            merged.append({"box": box, "score": d.score, "labels": [(d.name, d.score)]})
    return merged


def agreement(attrs: dict[str, str | None], inst: dict, attributes: Callable[[str], dict]) -> float:
    """How well an instance's labels fit a part: per label, +1 for each attribute the part names
    that the label shares, -1 for each it contradicts (size aside), times the label's score; the
    best label counts."""
    best = -float("inf")
    for name, score in inst["labels"]:
        have = attributes(name)
        fit = sum(1 if want == have.get(key) else -1 for key, want in attrs.items() if key != "size" and want is not None)
        best = max(best, fit * score)
    return best


def _by_attributes(dets: list[Detection], texts: dict[str, str], attributes: Callable[[str], dict],
                   whole: list[float] | None) -> Choice:
    attrs = {part: attributes(texts[part]) for part in PARTS}
    objs = instances(dets)
    if len(objs) < 2:
        ranked = sorted(PARTS, key=lambda p: -agreement(attrs[p], objs[0], attributes)) if objs else []
        return _fill({ranked[0]: objs[0]["box"]} if objs else {}, whole)

    def size_fit(i: int, j: int) -> int:
        fit = 0
        for part, mine, other in (("subj", i, j), ("obj", j, i)):
            size = attrs[part].get("size")
            if size is not None:
                larger = area(objs[mine]["box"]) > area(objs[other]["box"])
                fit += 1 if larger == (size == "large") else -1
        return fit

    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    fit = {(i, j): round(agreement(attrs["subj"], objs[i], attributes) + agreement(attrs["obj"], objs[j], attributes), 6)
           for i, j in pairs}
    i, j = max(pairs, key=lambda p: (fit[p], size_fit(*p), objs[p[0]]["score"] + objs[p[1]]["score"]))
    # A size word decided it when other pairs agreed as well on the attributes alone.
    tied = sum(f == fit[i, j] for f in fit.values()) > 1
    by = "by_size" if tied and size_fit(i, j) != 0 else "detected"
    return Choice({"subj": list(objs[i]["box"]), "obj": list(objs[j]["box"])}, how={"subj": by, "obj": by})


# ---------------------------------------------------------------------------------------------
# Detect, then choose (the API's entry)


def find_boxes(detector: Callable, images: Any, subj: str | Sequence[str], obj: str | Sequence[str], *,
               matcher: NounMatcher | None = None, min_size: float = 2.0, **rule: Any) -> Choice | list[Choice]:
    """Subject and object boxes in each image: ``detector`` (``sapretrain.detector.YoloDetector``
    or any ``detector(images, classes) -> [[Detection]]``) once over the images, then
    ``choose_boxes`` rule "nouns" on the detections clipped to the image. ``subj`` / ``obj``:
    words of the caption ("man", "two dogs": their nouns are taken with ``matcher``, default
    ``default_matcher()``), one pair for all images or one per image. ``images``: a PIL image
    (returns one ``Choice``) or a list (returns a list). ``Choice.source`` is "detector";
    ``Choice.boxes`` is None with the reason when a part is not found."""
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    subjs = [subj] * len(images) if isinstance(subj, str) else list(subj)
    objs = [obj] * len(images) if isinstance(obj, str) else list(obj)
    if not (len(subjs) == len(objs) == len(images)):
        raise ValueError(f"{len(images)} images but {len(subjs)} subjects and {len(objs)} objects")
    matcher = matcher or default_matcher()
    nouns = [(matcher.noun(s), matcher.noun(o)) for s, o in zip(subjs, objs)]
    classes = sorted({n for pair in nouns for n in pair if n})
    found = detector(images, classes) if images else []
    out = []
    for image, dets, (s, o), texts in zip(images, found, nouns, zip(subjs, objs)):
        choice = choose_boxes(clip_detections(dets, image.width, image.height, min_size), s, o, matcher=matcher,
                              texts=dict(zip(PARTS, texts)), **rule)
        choice.source = "detector"
        out.append(choice)
    return out[0] if single else out
