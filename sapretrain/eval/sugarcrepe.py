"""SugarCrepe (Hsieh et al., NeurIPS 2023): does the image prefer its caption over a hard negative?

    rows = read_sugarcrepe(["sugar-crepe/data"])            # a folder of <category>.json, or files
    grounding = Grounding.from_annotations("instances_val2017.json")    # or .from_detector(weights)
    prepared = prepare_rows(rows, "coco/val2017", grounding, nlp=load_nlp())   # model-independent
    result = evaluate_sugarcrepe(Encoder(model), prepared)
    lm = BigramLM.fit(corpus_captions); baseline = score_text_baseline(rows, lm.score)

**Data.** One JSON file per category, ``{id: {"filename", "caption", "negative_caption"}}``; the
category is the file's stem: SugarCrepe's seven are ``replace_obj``, ``replace_att``,
``replace_rel``, ``swap_obj``, ``swap_att``, ``add_obj``, ``add_att`` (others are kept under their
own name). A row that is not an object with the three strings is kept as ``bad_row``.

**Metric.** A row is correct when the image's score of its caption is above that of the negative
(a tie earns 1/2: the expected credit of a coin flip, so that a scorer blind to a row is at
chance, not below it). Accuracy is over **all** rows: a row a scorer cannot score counts as
wrong and is listed with its reason (``bad_row``, ``missing_image``, ``unreadable_image``; for
``fallback="wrong"`` also ``no_triplet``, ``no_box``, ``span_beyond_context``). Reported per
category, ``micro`` (all rows) and ``macro`` (mean of the categories).

**Models** go through ``encode.Encoder``, a plain CLIP through exactly the same code. The score of a
caption is ``cos(v, u)``: for a plain CLIP its own cosine. SA-CLIP needs the caption's SVO spans
and, with the ROI branch, subject and object boxes:

- **spans**: the project's extractor (``curation.svo.extract_triplets``) on each caption, the
  positive and the negative separately. Of a caption's triplets the first (in caption order) whose
  subject and object both find a box is used, else the first.
- **boxes**: from ground truth (COCO instances by file name, ``vsr.load_coco_annotations``'
  formats) or a YOLO detector (``sapretrain.detector.YoloDetector``, weights by path), matched to
  the triplet's nouns by the curation's ROI rule (``sapretrain.boxes.choose_boxes`` rule "nouns":
  same noun, synonym, hypernym; the largest instance). ``v`` is computed per caption, with that caption's boxes
  (which caption is the positive is never used).
- **fallback**: when either caption of a row has no triplet (``no_triplet``), none whose nouns both
  find a box (``no_box``), or a span beyond the context length (``span_beyond_context``), SA-CLIP
  cannot form ``u`` or ``v`` for that row. With ``fallback="global"`` (default) the row is scored
  for both captions with the global halves only, ``cos(f_v(image), f_t(caption))`` (SA-CLIP's own
  towers, CLIP-style); the choice depends on both captions alike, never on which is the
  positive. The rows per reason are reported. ``fallback="wrong"`` counts them as wrong instead.

**Baselines** (no model, no learning from the evaluated rows):

- ``text: shorter caption``: prefers the caption with fewer words.
- ``text: bigram LM``: prefers the caption with the higher log-probability under a bigram model of
  a caption corpus (``BigramLM``; interpolated with an add-one unigram model, fixed weight), with
  the evaluated images' captions and the evaluated texts themselves removed from the corpus first
  (SugarCrepe's positives are COCO val2017 captions: an LM fit on them would have memorised them).
- ``image: nouns found`` (with a grounding): prefers the caption whose triplet nouns more often
  match an instance of the image (a parser and the same boxes SA-CLIP gets; how far object
  presence alone goes on ``replace_obj`` / ``add_obj``).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from PIL import Image
from tqdm import tqdm

from sapretrain import storage
from sapretrain.eval.encode import EvalSample

CATEGORIES = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
FIELDS = ("filename", "caption", "negative_caption")
CAPTIONS = ("pos", "neg")
FALLBACKS = ("global", "wrong")
TIE_CREDIT = 0.5
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


# --------------------------------------------------------------------------------------------
# Reading


def read_sugarcrepe(paths: str | Iterable[str]) -> list[dict]:
    """Rows of SugarCrepe JSON files (folders: every ``*.json`` in them), in file then file order.

    Each row: ``id`` (``<category>:<key>``), ``category``, ``filename``, ``caption``, ``negative``
    and ``problem`` (None, or ``bad_row``). A file that is not a JSON object raises ValueError.
    """
    files = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        fs, fpath = storage.url_to_fs(path)
        if not fs.exists(fpath):
            raise FileNotFoundError(f"SugarCrepe data {path!r}: no such file or folder")
        if fs.isdir(fpath):
            found = sorted(f for f in fs.ls(fpath, detail=False) if f.endswith(".json"))
            if not found:
                raise ValueError(f"SugarCrepe folder {path!r} holds no .json files")
            files += [f if storage.is_local(fs) else fs.unstrip_protocol(f) for f in found]
        else:
            files.append(path)
    rows, seen = [], set()
    for url in files:
        category = PurePosixPath(str(url)).stem
        try:
            doc = json.loads(storage.read_bytes(url))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{url}: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{url}: expected SugarCrepe's {{id: {{filename, caption, negative_caption}}}}")
        for key, row in doc.items():
            if f"{category}:{key}" in seen:
                raise ValueError(f"{url}: row {category}:{key} read twice (the same category given twice?)")
            seen.add(f"{category}:{key}")
            ok = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in FIELDS)
            rows.append({"id": f"{category}:{key}", "category": category,
                         "filename": row.get("filename") if ok else None,
                         "caption": row.get("caption") if ok else None,
                         "negative": row.get("negative_caption") if ok else None,
                         "problem": None if ok else "bad_row"})
    return rows


def categories_of(rows: Sequence[dict]) -> list[str]:
    """SugarCrepe's categories present, in the paper's order, then any others sorted."""
    present = {r["category"] for r in rows}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


# --------------------------------------------------------------------------------------------
# Boxes


@dataclass
class Grounding:
    """Where boxes come from: ground-truth instances by file name, or a detector run on the image."""

    source: str  # "gt" | "detector"
    annotations: dict[str, list[dict]] | None = None  # file name -> [{"category", "bbox_xywh", "iscrowd"}]
    detector: Callable[[list], list[list[dict]]] | None = None  # images -> [[{"name", "box"}]]
    roi_config: Any = None  # curation.rois.RoiConfig (noun matching rule); None: configs/curation/rois.yaml
    _matcher: Any = field(default=None, init=False, repr=False)

    @classmethod
    def from_annotations(cls, path: str) -> "Grounding":
        from sapretrain.eval.vsr import load_coco_annotations

        return cls("gt", annotations=load_coco_annotations(path))

    @classmethod
    def from_detector(cls, weights: str, device: str | None = None, conf: float = 0.25,
                      imgsz: int | None = None) -> "Grounding":
        """Boxes from ultralytics weights by path (``imgsz`` None: the size they were trained at)."""
        from sapretrain.detector import YoloDetector

        return cls("detector", detector=YoloDetector(weights, conf=conf, imgsz=imgsz, device=device))

    def config(self):
        if self.roi_config is None:
            from sapretrain.curation.rois import load_roi_config

            self.roi_config = load_roi_config()
        return self.roi_config

    def matcher(self):
        if self._matcher is None:
            from sapretrain.boxes import NounMatcher

            cfg = self.config()
            self._matcher = NounMatcher(cfg.synonyms, cfg.hypernyms)
        return self._matcher

    def instances(self, filenames: Sequence[str], images: Sequence[Image.Image]) -> list[list[dict]]:
        """Per image ``[{"name", "box": [x0, y0, x1, y1]}]`` (or ``Detection``), clipped and crowd-free."""
        from sapretrain.boxes import clip_detections
        from sapretrain.curation.rois import gt_instances

        cfg = self.config()
        if self.source == "gt":
            out = []
            for name, image in zip(filenames, images):
                objects = [{"name": o["category"], "box": [o["bbox_xywh"][0], o["bbox_xywh"][1],
                                                           o["bbox_xywh"][0] + o["bbox_xywh"][2],
                                                           o["bbox_xywh"][1] + o["bbox_xywh"][3]],
                            "iscrowd": o.get("iscrowd", 0)}
                           for o in self.annotations.get(PurePosixPath(name).name, [])]
                out.append(gt_instances(objects, image.width, image.height, cfg.min_box_size))
            return out
        found = self.detector(list(images)) if images else []
        return [clip_detections(dets, image.width, image.height, cfg.min_box_size) for dets, image in zip(found, images)]


# --------------------------------------------------------------------------------------------
# Model-independent preparation: images, triplets, boxes


def load_image(images_root: str, filename: str) -> tuple[Image.Image | None, str | None]:
    """The RGB image, or None and ``missing_image`` / ``unreadable_image``."""
    url = storage.join(images_root, filename)
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        return None, "missing_image"
    try:
        with fs.open(path, "rb") as f:
            return Image.open(f).convert("RGB"), None
    except Exception:  # truncated, not an image, too large: counted, never a crash
        return None, "unreadable_image"


def _whole_caption(caption: str) -> dict:
    """A triplet whose parts span the whole caption: for the pooled text half only, which ignores spans."""
    return {part: {"start": 0, "end": len(caption)} for part in ("subj", "rel", "obj")}


def _nouns(triplet: dict, matcher) -> dict[str, str]:
    return {p: matcher.noun(triplet[p]["text"], triplet[p].get("head")) for p in ("subj", "obj")}


def _ground(triplets: list[dict], instances: list[dict] | None, grounding: Grounding | None) -> dict:
    """The caption's triplet (first with both boxes, else first), its boxes, and its nouns found."""
    out = {"triplet": triplets[0] if triplets else None, "boxes": None, "nouns_found": None}
    if grounding is None or instances is None:
        return out
    from sapretrain.boxes import as_detection
    from sapretrain.curation.rois import choose

    cfg, matcher = grounding.config(), grounding.matcher()
    names = [matcher.noun(as_detection(i).name) for i in instances]
    nouns = {n for t in triplets for n in _nouns(t, matcher).values() if n}
    found = sum(any(matcher.level(n, name) is not None for name in names) for n in nouns)
    out["nouns_found"] = found / len(nouns) if nouns else 0.0
    for t in triplets:
        choice = choose(matcher, _nouns(t, matcher), instances, cfg, {p: t[p]["text"] for p in ("subj", "obj")})
        if choice.boxes is not None:
            return {**out, "triplet": t, "boxes": choice.boxes}
    return out


def prepare_rows(rows: Sequence[dict], images_root: str, grounding: Grounding | None = None, nlp: Any = None,
                 chunk_size: int = 64, progress: bool = True) -> list[dict]:
    """Per row what every scorer shares: image status and size, and per caption its triplets and boxes.

    ``nlp``: a spaCy pipeline for the extractor (None: no triplets, so SA-CLIP falls back on every
    row). Images are decoded here to check and ground them, and again by each model's scoring
    (so memory holds one chunk of images, not the benchmark).
    """
    from sapretrain.curation.svo import extract_triplets

    texts = sorted({r[k] for r in rows if r["problem"] is None for k in ("caption", "negative")})
    parsed = dict(zip(texts, (extract_triplets(d) for d in nlp.pipe(texts)))) if nlp is not None else {}
    prepared = []
    bar = tqdm(total=len(rows), desc="SugarCrepe prepare", disable=not progress, unit="row")
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        images: dict[str, tuple[Image.Image | None, str | None]] = {}
        for r in chunk:
            if r["problem"] is None and r["filename"] not in images:
                images[r["filename"]] = load_image(images_root, r["filename"])
        readable = [f for f, (im, _) in images.items() if im is not None]
        found = grounding.instances(readable, [images[f][0] for f in readable]) if grounding else []
        instances = dict(zip(readable, found))
        for r in chunk:
            item = {**r, "size": None, "captions": {}}
            if r["problem"] is None:
                image, problem = images[r["filename"]]
                item["problem"] = problem
                if image is not None:
                    item["size"] = image.size
                    for key, text in zip(CAPTIONS, (r["caption"], r["negative"])):
                        triplets = parsed.get(text, [])
                        item["captions"][key] = {"text": text, "triplets": len(triplets),
                                                 **_ground(triplets, instances.get(r["filename"]), grounding)}
            prepared.append(item)
        bar.update(len(chunk))
    bar.close()
    return prepared


# --------------------------------------------------------------------------------------------
# Scoring a model


def _credit(pos: float, neg: float) -> float:
    return 1.0 if pos > neg else TIE_CREDIT if pos == neg else 0.0


def _fallback_reason(item: dict, encoder) -> str | None:
    """Why SA-CLIP cannot score this row with u and v (None: it can; a plain CLIP always can)."""
    for key in CAPTIONS:
        c = item["captions"][key]
        if encoder.uses_spans and c["triplet"] is None:
            return "no_triplet"
        if encoder.uses_boxes and c["boxes"] is None:
            return "no_triplet" if c["triplet"] is None else "no_box"
        if encoder.uses_spans:
            spans = {p: (c["triplet"][p]["start"], c["triplet"][p]["end"]) for p in ("subj", "rel", "obj")}
            if not all(encoder.tokenizer(c["text"], spans).spans[p] for p in spans):
                return "span_beyond_context"
    return None


def evaluate_sugarcrepe(encoder, prepared: Sequence[dict], images_root: str, fallback: str = "global",
                        chunk_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``encoder`` (``encode.Encoder``) on ``prepare_rows``' output; see the module doc.

    Returns ``summarize``'s metrics plus ``modes`` (rows scored ``full`` / ``global``),
    ``fallback`` (reason -> rows scored by the global halves) and ``predictions`` (per row
    ``id, category, pos, neg, credit, mode, reason``).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback {fallback!r}: expected one of {FALLBACKS}")
    chunk_size = chunk_size or getattr(encoder, "batch_size", 64)
    predictions: list[dict] = []
    bar = tqdm(total=len(prepared), desc="SugarCrepe", disable=not progress, unit="row")
    for start in range(0, len(prepared), chunk_size):
        chunk = prepared[start:start + chunk_size]
        todo, image_samples, text_samples = [], [], []
        images: dict[str, Image.Image | None] = {}
        for item in chunk:
            base = {"id": item["id"], "category": item["category"], "pos": None, "neg": None, "credit": 0.0,
                    "mode": None, "reason": item["problem"]}
            if item["problem"] is not None:
                predictions.append(base)
                continue
            reason = _fallback_reason(item, encoder)
            if reason is not None and fallback == "wrong":
                predictions.append({**base, "reason": reason})
                continue
            if item["filename"] not in images:
                images[item["filename"]] = load_image(images_root, item["filename"])[0]
            image = images[item["filename"]]
            if image is None:  # gone since prepare_rows looked
                predictions.append({**base, "reason": "unreadable_image"})
                continue
            mode = "full" if reason is None else "global"
            caps = item["captions"]
            whole = [0.0, 0.0, float(image.width), float(image.height)]
            if mode == "full" and encoder.uses_boxes:
                views = [EvalSample(image=image, boxes=caps[k]["boxes"]) for k in CAPTIONS]
            else:  # one view; the global half of v ignores boxes, a model without ROIs has none
                views = [EvalSample(image=image, boxes={"subj": whole, "obj": whole} if encoder.uses_boxes else None)]
            for k in CAPTIONS:
                triplet = caps[k]["triplet"] if mode == "full" else None
                if triplet is None and encoder.uses_spans:
                    triplet = _whole_caption(caps[k]["text"])  # global mode reads the pooled half only
                text_samples.append(EvalSample(caption=caps[k]["text"], triplet=triplet))
            todo.append((item, base, mode, reason, len(image_samples), len(views)))
            image_samples.extend(views)
        if todo:
            v = encoder.images(image_samples, parts=True)  # v (N, 2D), image_embed (N, D)
            u = encoder.texts(text_samples, parts=True)  # u (2R, 2D), text_embed (2R, D)
            for r, (item, base, mode, reason, first, n_views) in enumerate(todo):
                img = [first, first + n_views - 1]  # the positive's view, the negative's view
                if mode == "full":
                    pos, neg = (float(v["v"][img[i]] @ u["u"][2 * r + i]) for i in (0, 1))
                else:
                    pos, neg = (float(v["image_embed"][img[i]] @ u["text_embed"][2 * r + i]) for i in (0, 1))
                predictions.append({**base, "pos": pos, "neg": neg, "credit": _credit(pos, neg), "mode": mode,
                                    "reason": reason})
        bar.update(len(chunk))
    bar.close()
    order = {item["id"]: k for k, item in enumerate(prepared)}
    predictions.sort(key=lambda p: order[p["id"]])
    return {**summarize(predictions), "predictions": predictions}


# --------------------------------------------------------------------------------------------
# Baselines


class BigramLM:
    """A bigram word model of captions: ``λ·P_ML(w | prev) + (1-λ)·P_add1(w)``, fixed ``λ``.

    Words are lower-cased ``[a-z0-9]+('[a-z]+)?`` runs; each caption is wrapped in ``<s> … </s>``.
    The unigram model is add-one smoothed over the vocabulary plus one unknown word, so every
    caption has a finite score. ``λ`` is fixed (0.8), not tuned on any evaluated row.
    """

    def __init__(self, lam: float = 0.8):
        self.lam = lam
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()
        self.contexts: Counter = Counter()
        self.captions = 0

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def fit(cls, captions: Iterable[str], lam: float = 0.8) -> "BigramLM":
        lm = cls(lam)
        for caption in captions:
            seq = ["<s>", *cls.words(caption), "</s>"]
            lm.unigrams.update(seq[1:])
            lm.contexts.update(seq[:-1])
            lm.bigrams.update(zip(seq, seq[1:]))
            lm.captions += 1
        if not lm.captions:
            raise ValueError("the bigram LM needs at least one caption to fit on")
        return lm

    def logprob(self, prev: str, word: str) -> float:
        total, vocab = sum(self.unigrams.values()), len(self.unigrams) + 1  # + the unknown word
        unigram = (self.unigrams[word] + 1) / (total + vocab)
        context = self.contexts[prev]
        if not context:
            return math.log(unigram)
        return math.log(self.lam * self.bigrams[prev, word] / context + (1 - self.lam) * unigram)

    def score(self, text: str) -> float:
        """log P(caption): the sum over its words and the end marker (longer captions score lower)."""
        seq = ["<s>", *self.words(text), "</s>"]
        return sum(self.logprob(a, b) for a, b in zip(seq, seq[1:]))


def read_caption_corpus(path: str) -> list[tuple[str, str | None]]:
    """``(caption, image)`` pairs of a caption corpus: JSONL with ``caption`` (and ``file_name``,
    ``image`` or ``image_id``), or a COCO ``captions_*.json``."""
    text = storage.read_bytes(path).decode("utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
        files = {im.get("id"): im.get("file_name") for im in doc.get("images", []) if isinstance(im, dict)}
        return [(a["caption"], files.get(a.get("image_id"), a.get("image_id")))
                for a in doc["annotations"] if isinstance(a, dict) and isinstance(a.get("caption"), str)]
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{path} line {number}: no caption")
        image = next((row[k] for k in ("file_name", "image", "image_id") if row.get(k) is not None), None)
        pairs.append((row["caption"], image))
    return pairs


def held_out_corpus(pairs: Sequence[tuple[str, Any]], rows: Sequence[dict]) -> tuple[list[str], dict[str, int]]:
    """The corpus captions an LM may be fit on: none of an evaluated image, none equal to an evaluated text."""
    from sapretrain.curation.exclude import ExclusionList

    evaluated = ExclusionList()
    for r in rows:
        if r["filename"]:
            evaluated.add(r["filename"], "sugarcrepe")
    texts = {" ".join(BigramLM.words(r[k])) for r in rows if r["problem"] is None for k in ("caption", "negative")}
    kept, counts = [], Counter(captions=len(pairs))
    for caption, image in pairs:
        if image is not None and evaluated.match(image if isinstance(image, int) else str(image)):
            counts["dropped_evaluated_image"] += 1
        elif " ".join(BigramLM.words(caption)) in texts:
            counts["dropped_evaluated_text"] += 1
        else:
            kept.append(caption)
    counts["kept"] = len(kept)
    return kept, dict(counts)


def score_text_baseline(rows: Sequence[dict], score: Callable[[str], float]) -> dict[str, Any]:
    """A text-only scorer: prefers the caption with the higher ``score(text)``; images unused."""
    predictions = []
    for r in rows:
        base = {"id": r["id"], "category": r["category"], "pos": None, "neg": None, "credit": 0.0,
                "mode": None, "reason": "bad_row" if r["problem"] == "bad_row" else None}
        if base["reason"] is None:
            pos, neg = score(r["caption"]), score(r["negative"])
            base.update(pos=pos, neg=neg, credit=_credit(pos, neg), mode="text")
        predictions.append(base)
    return {**summarize(predictions), "predictions": predictions}


def shorter_caption(text: str) -> float:
    return -float(len(BigramLM.words(text)))


def score_grounding_baseline(prepared: Sequence[dict]) -> dict[str, Any]:
    """Prefers the caption whose triplet nouns more often match an instance (``prepare_rows`` with a grounding)."""
    predictions = []
    for item in prepared:
        base = {"id": item["id"], "category": item["category"], "pos": None, "neg": None, "credit": 0.0,
                "mode": None, "reason": item["problem"]}
        if item["problem"] is None:
            pos, neg = (item["captions"][k]["nouns_found"] for k in CAPTIONS)
            base.update(pos=pos, neg=neg, credit=_credit(pos, neg), mode="nouns")
        predictions.append(base)
    return {**summarize(predictions), "predictions": predictions}


def evaluate_baselines(rows: Sequence[dict], prepared: Sequence[dict], corpus: Sequence[tuple[str, Any]] | None,
                       grounded: bool) -> tuple[dict[str, dict], dict[str, Any]]:
    """The no-learning scorers beside the models, and notes on how they were made (corpus counts)."""
    results = {"text: shorter caption": score_text_baseline(rows, shorter_caption)}
    notes: dict[str, Any] = {}
    if corpus is not None:
        captions, counts = held_out_corpus(corpus, rows)
        notes["lm_corpus"] = counts
        results["text: bigram LM"] = score_text_baseline(rows, BigramLM.fit(captions).score)
    else:
        notes["lm_corpus"] = "not given (--lm-corpus): no bigram LM baseline"
    if grounded:
        results["image: nouns found"] = score_grounding_baseline(prepared)
    return results, notes


# --------------------------------------------------------------------------------------------
# Metrics and table


def summarize(predictions: Sequence[dict]) -> dict[str, Any]:
    """Accuracy over all rows (unscorable ones count 0), per category, micro and macro."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_category[p["category"]].append(p)
    per_category = {}
    for category in categories_of(predictions):
        group = by_category[category]
        correct = sum(p["credit"] for p in group)
        per_category[category] = {"n": len(group), "correct": correct, "accuracy": correct / len(group),
                                  "unscorable": sum(p["mode"] is None for p in group),
                                  "ties": sum(p["mode"] is not None and p["pos"] == p["neg"] for p in group)}
    n = len(predictions)
    correct = sum(p["credit"] for p in predictions)
    unscorable = [{"id": p["id"], "category": p["category"], "reason": p["reason"]}
                  for p in predictions if p["mode"] is None]
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,  # micro
        "macro_accuracy": (sum(c["accuracy"] for c in per_category.values()) / len(per_category)
                           if per_category else None),
        "per_category": per_category,
        "scored": n - len(unscorable),
        "ties": sum(c["ties"] for c in per_category.values()),
        "modes": dict(Counter(p["mode"] for p in predictions if p["mode"] is not None)),
        "fallback": dict(Counter(p["reason"] for p in predictions if p["mode"] == "global")),
        "unscorable": dict(Counter(r["reason"] for r in unscorable)),
        "unscorable_rows": unscorable,
    }


def format_sugarcrepe_table(results: dict[str, dict], categories: Sequence[str]) -> str:
    """One markdown table, a row per scorer (models and baselines), accuracy in %, then the notes."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["| scorer | " + " | ".join(categories) + " | macro | micro | scored / n |",
             "|---|" + "---:|" * (len(categories) + 3)]
    for label, r in results.items():
        cells = [pct(r["per_category"].get(c, {}).get("accuracy")) for c in categories]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {pct(r['macro_accuracy'])} | {pct(r['accuracy'])} | {r['scored']} / {r['n']} |")
    lines.append("")
    lines.append("Rows per category: " + ", ".join(
        f"{c} {next(iter(results.values()))['per_category'].get(c, {}).get('n', 0)}" for c in categories)
        + f". A tie earns {TIE_CREDIT}; an unscorable row counts as wrong.")
    for label, r in results.items():
        notes = []
        if r["unscorable"]:
            notes.append("unscorable (wrong): " + ", ".join(f"{k} {v}" for k, v in sorted(r["unscorable"].items())))
        if r["fallback"]:
            notes.append("scored by the global halves: " + ", ".join(f"{k} {v}" for k, v in sorted(r["fallback"].items())))
        if r["ties"]:
            notes.append(f"ties {r['ties']}")
        if notes:
            lines.append(f"- {label}: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def scorable(results: dict[str, dict]) -> bool:
    """Whether any scorer scored any row (a run that scored nothing is a mistake)."""
    return any(r["scored"] for r in results.values())
