"""DoTA zero-shot traffic-anomaly detection (SA-CLIP paper Table 2, App. C; Eq. 11).

Each frame of a DoTA clip is embedded (``v``) and compared with a hierarchy of natural-language
descriptions of normal and abnormal traffic (``u``, configs/eval/dota_descriptions.yaml). Every
frame is scored against the SAME sets (Eq. 11: one abnormal set D(a) for every frame), whatever
its clip's group:

    score(frame)    = mean_{d in D(a)} cos(v, u_d)           # headline: "auc" per group
    contrast(frame) = score(frame) - mean_{d in D(n)} cos(v, u_d)              # secondary

D(a) is every abnormal description of the hierarchy (VV, VP, VO and ``common``), D(n) every
normal one. Frame-level ROC-AUC is computed on these scores and split by the clip groups
afterwards (VV, VP, VO, and overall = all evaluated frames), each with a bootstrap 95 %
confidence interval over clips. The former reading, which scored each frame against the
descriptions of its clip's *gold* group (``anomaly_class``, which a user would not have), is
kept only as the labelled secondary ``oracle_group`` (and ``oracle_group_contrast``).

Data (DoTA release layout):

    metadata_val.json            {clip_id: {anomaly_start, anomaly_end, anomaly_class, num_frames, ...}}
    FRAMES_ROOT/<clip_id>/images/000000.jpg ... (num_frames - 1)   10 fps
    ANN_ROOT/<clip_id>.json      optional: {"labels": [{frame_id, image_path, objects: [{bbox}]}]}

Frame ``i`` is the file ``f"{i:06d}.jpg"``, counted from 0 within the clip (DoTA's
``dataset/video2frames.py`` writes clip frames as ``str(i).zfill(6)``, ``i`` from 0), and it is
anomalous iff ``anomaly_start <= i < anomaly_end``. An annotation entry belongs to the frame its
``image_path`` names (falling back to ``frame_id``).

Grouping (``anomaly_class`` is ``"ego: <cat>"`` or ``"other: <cat>"``): ego clips are not
evaluated. Non-ego clips: VV = start_stop_or_stationary, moving_ahead_or_waiting, lateral,
oncoming, turning; VP = pedestrian; VO = obstacle. leave_to_left / leave_to_right / unknown clips
(``UNGROUPED``) count only in "overall".

Boxes (SA-CLIP's image embedding needs a subject and an object box; a plain CLIP ignores them),
by box source:

- ``DetectorBoxes`` (headline when weights are given): a detector run on every frame; of its
  detections of ``ROAD_CLASSES`` (``sapretrain.boxes.choose_boxes``, rule "largest"), the subject is the largest vehicle (``VEHICLES``; the largest
  detection if there is no vehicle) and the object the largest other detection (whole frame if
  there is none). Largest rather than most confident: the descriptions are about the road users
  closest to the camera, which are the largest.
- ``WholeFrameBoxes`` (no detector): both boxes are the whole frame, labelled as such.
- ``AnnotationBoxes`` (secondary only): the dataset's annotated objects of the anomaly, the two
  largest; they exist around the anomaly, so they leak its place and time.

A frame without a box of its source gets whole-frame boxes and is counted in ``no_boxes``.

No-learning baselines (same frames, same metrics): ``position`` (the frame's relative position
in its clip, ``i / (num_frames - 1)``: how far the anomaly windows' placement alone gets), and
with a box source that finds boxes ``box_area`` (the subject box's share of the frame) and
``box_iou`` (intersection over union of the two picked boxes; 0 with fewer than two).
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

from sapretrain.boxes import area as box_area
from sapretrain.boxes import choose_boxes, clip_box, clip_detections
from sapretrain.boxes import iou as box_iou
from sapretrain.eval.encode import EvalSample

DEFAULT_DESCRIPTIONS = "configs/eval/dota_descriptions.yaml"  # shipped with the package (sapretrain.resources)
GROUPS = ("VV", "VP", "VO")
COMMON = "common"
UNGROUPED = "ungrouped"  # non-ego clips outside VV / VP / VO: only in "overall"
OVERALL = "overall"
KINDS = ("normal", "abnormal")
CATEGORY_GROUP = {
    "start_stop_or_stationary": "VV",
    "moving_ahead_or_waiting": "VV",
    "lateral": "VV",
    "oncoming": "VV",
    "turning": "VV",
    "pedestrian": "VP",
    "obstacle": "VO",
    "leave_to_left": UNGROUPED,
    "leave_to_right": UNGROUPED,
    "unknown": UNGROUPED,
}
ACTORS = ("ego", "other")
TOP_K = 3
SKIP_REASONS = ("missing_folder", "missing_clip", "missing_frame", "unreadable_frame")
SECONDARY_SCORES = ("contrast", "oracle_group", "oracle_group_contrast")
BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
MIN_BOX = 2.0  # px; a narrower or lower box (after clipping to the frame) is no box
# COCO names (a COCO-trained detector's classes) of what the descriptions talk about.
VEHICLES = frozenset(("car", "truck", "bus", "motorcycle", "bicycle", "train"))
ROAD_CLASSES = VEHICLES | frozenset(("person", "traffic light", "fire hydrant", "stop sign", "parking meter",
                                     "bench", "bird", "cat", "dog", "horse", "sheep", "cow"))
BASELINES = ("position", "box_area", "box_iou")
BASELINE_DESCRIPTIONS = {
    "position": "frame index / (clip length - 1), no pixels (where anomaly windows sit in DoTA clips)",
    "box_area": "subject box area / frame area (0 without a box), no model",
    "box_iou": "IoU of the subject and object boxes (0 with fewer than two), no model",
}


class Description(NamedTuple):
    text: str
    path: str  # place in the hierarchy, e.g. "VV/abnormal/turning"
    abnormal: bool


# --------------------------------------------------------------------------------------------
# Descriptions


def load_descriptions(path: str | Path) -> dict[str, list[Description]]:
    """The description hierarchy, flattened per section (``VV``, ``VP``, ``VO``, ``common``).

    Raises ``ValueError`` naming the place of an unknown group or kind, an empty list or mapping,
    a non-string or blank entry, a duplicate, or a group left without normal or abnormal
    descriptions (counting ``common``).
    """
    from sapretrain.resources import resolve_config

    path = resolve_config(path)
    with open(path) as f:
        tree = yaml.safe_load(f)
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"{path}: expected a mapping of groups {list(GROUPS) + [COMMON]}")
    sections = {}
    for group, body in tree.items():
        if group not in GROUPS and group != COMMON:
            raise ValueError(f"{path}: unknown group {group!r}; expected one of {list(GROUPS) + [COMMON]}")
        if not isinstance(body, dict) or not body:
            raise ValueError(f"{path}: group {group!r} must map 'normal' / 'abnormal' to descriptions")
        unknown = sorted(set(body) - set(KINDS))
        if unknown:
            raise ValueError(f"{path}: {group}: unknown key(s) {unknown}; expected {list(KINDS)}")
        found: list[Description] = []
        for kind in KINDS:
            if kind in body:
                found.extend(_leaves(body[kind], f"{group}/{kind}", kind == "abnormal", path))
        texts = Counter(d.text for d in found)
        duplicates = sorted(t for t, n in texts.items() if n > 1)
        if duplicates:
            raise ValueError(f"{path}: {group}: duplicate description(s) {duplicates}")
        sections[group] = found
    sections.setdefault(COMMON, [])
    for group in GROUPS:
        own = sections.get(group, [])
        for abnormal in (False, True):
            if not any(d.abnormal == abnormal for d in own + sections[COMMON]):
                kind = KINDS[abnormal]
                raise ValueError(f"{path}: group {group} has no {kind} descriptions (neither its own nor {COMMON}'s)")
        sections.setdefault(group, [])
    return sections


def _leaves(node: Any, where: str, abnormal: bool, path) -> list[Description]:
    if isinstance(node, list):
        if not node:
            raise ValueError(f"{path}: {where}: empty list")
        out = []
        for i, text in enumerate(node):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: {where}[{i}]: expected a non-empty sentence, got {text!r}")
            out.append(Description(text.strip(), where, abnormal))
        return out
    if isinstance(node, dict):
        if not node:
            raise ValueError(f"{path}: {where}: empty mapping")
        return [d for key, child in node.items() for d in _leaves(child, f"{where}/{key}", abnormal, path)]
    raise ValueError(f"{path}: {where}: expected a list of sentences or a mapping of sub-categories, got {node!r}")


def description_triplets(texts: Sequence[str], nlp=None) -> dict[str, dict]:
    """The first SVO triplet of each text; ``ValueError`` listing every text without one."""
    from sapretrain.curation.svo import extract_triplets, load_nlp

    nlp = nlp or load_nlp()
    found, missing = {}, []
    for text, doc in zip(texts, nlp.pipe(list(texts))):
        triplets = extract_triplets(doc)
        if triplets:
            found[text] = triplets[0]
        else:
            missing.append(text)
    if missing:
        raise ValueError(f"no subject-relation-object triplet found in description(s) {missing}: SA-CLIP needs "
                         "their spans; rephrase them as 'a <subject> <relation> a <object>'")
    return found


def description_sets(sections: Mapping[str, list[Description]]) -> dict[str, list[Description]]:
    """The descriptions each clip group is scored against: its own plus ``common``; all for UNGROUPED."""
    sets = {g: list(sections[g]) + list(sections[COMMON]) for g in GROUPS}
    sets[UNGROUPED] = [d for g in GROUPS for d in sections[g]] + list(sections[COMMON])
    return sets


# --------------------------------------------------------------------------------------------
# Clips, frames, boxes


def load_metadata(path: str | Path) -> dict[str, dict]:
    with open(path) as f:
        metadata = json.load(f)
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected {{clip_id: {{anomaly_start, anomaly_end, anomaly_class, num_frames}}}}")
    return metadata


def clip_group(anomaly_class: str) -> str | None:
    """``VV`` / ``VP`` / ``VO`` / ``UNGROUPED`` for a non-ego clip, ``None`` for an ego clip."""
    actor, sep, category = (part.strip() for part in anomaly_class.partition(":"))
    if not sep or actor not in ACTORS or category not in CATEGORY_GROUP:
        raise ValueError(f"unknown anomaly_class {anomaly_class!r}: expected 'ego|other: <category>' with a "
                         f"category of {sorted(CATEGORY_GROUP)}")
    return None if actor == "ego" else CATEGORY_GROUP[category]


def frame_label(meta: Mapping[str, Any], frame: int) -> int:
    """1 if frame ``frame`` (0-based within the clip) lies in ``[anomaly_start, anomaly_end)``."""
    return int(meta["anomaly_start"] <= frame < meta["anomaly_end"])


def frame_path(frames_root: str | Path, clip_id: str, frame: int) -> Path:
    return Path(frames_root) / clip_id / "images" / f"{frame:06d}.jpg"


def _clip_box(box: Sequence[Any], width: float, height: float) -> list[float] | None:
    """``box`` clipped to the image, or None when it is malformed or under ``MIN_BOX`` px a side."""
    return clip_box(box, width, height, MIN_BOX, decimals=None)


def annotated_boxes(objects: Sequence[Mapping[str, Any]], width: int, height: int) -> list[list[float]]:
    """The two largest annotated boxes of a frame (largest first), clipped; fewer if there are fewer."""
    boxes = [b for b in (_clip_box(o.get("bbox", ()), width, height) for o in objects) if b is not None]
    return sorted(boxes, key=box_area, reverse=True)[:2]


def pick_detections(detections: Sequence, width: int, height: int, classes: Iterable[str] | None = ROAD_CLASSES,
                    subject_classes: Iterable[str] = VEHICLES) -> list[list[float]]:
    """Subject and object among a frame's detections (``Detection`` or ``{"name", "box"}``).

    The project's box choice, rule "largest" (``sapretrain.boxes``): only ``classes`` count (None:
    all); subject: the largest of ``subject_classes``, else the largest detection; object: the
    largest other. Returns 0, 1 or 2 boxes (clipped; under ``MIN_BOX`` px dropped).
    """
    kept = clip_detections(detections, width, height, MIN_BOX, decimals=None)
    choice = choose_boxes(kept, rule="largest", classes=classes, subject_classes=subject_classes, width=width,
                          height=height)
    return [choice.boxes[p] for p in ("subj", "obj") if choice.how[p] == "detected"]


def box_pair(found: Sequence[Sequence[float]], width: int, height: int) -> dict[str, list[float]]:
    """``{"subj", "obj"}`` from 0-2 found boxes; the whole frame stands in for a missing one."""
    whole = [0.0, 0.0, float(width), float(height)]
    return {"subj": list(found[0]) if found else whole, "obj": list(found[1]) if len(found) > 1 else whole}


def pick_boxes(objects: Sequence[Mapping[str, Any]], width: int, height: int) -> dict[str, list[float]] | None:
    """Subject = largest annotated box, object = second largest (whole frame if only one); boxes
    are clipped to the image and ones under 2 px a side dropped. ``None`` without a usable box."""
    found = annotated_boxes(objects, width, height)
    return box_pair(found, width, height) if found else None


def load_frame_objects(annotations_root: str | Path | None, clip_id: str) -> dict[int, list[dict]]:
    """Annotated objects per frame index of a clip; empty without an annotation file."""
    if annotations_root is None:
        return {}
    path = Path(annotations_root) / f"{clip_id}.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        labels = json.load(f).get("labels", [])
    out = {}
    for entry in labels:
        stem = Path(entry.get("image_path") or "").stem
        frame = int(stem) if stem.isdigit() else int(entry["frame_id"])
        out[frame] = list(entry.get("objects") or [])
    return out


class WholeFrameBoxes:
    """No detector: subject and object are both the whole frame."""

    mode = "whole_frame"
    finds_boxes = False

    def describe(self) -> str:
        return "whole frame (no detector weights given): subject = object = the frame"

    def clip_boxes(self, clip_id: str, frames: Sequence[int], images: Sequence[Image.Image]) -> list[list]:
        return [[] for _ in frames]


class AnnotationBoxes:
    """The dataset's annotated anomaly objects (secondary only: they mark the anomaly)."""

    mode = "annotations"
    finds_boxes = True

    def __init__(self, annotations_root: str | Path):
        self.root = annotations_root

    def describe(self) -> str:
        return f"annotated anomaly objects ({self.root}), two largest (oracle: not the headline)"

    def clip_boxes(self, clip_id: str, frames: Sequence[int], images: Sequence[Image.Image]) -> list[list]:
        objects = load_frame_objects(self.root, clip_id)
        return [annotated_boxes(objects.get(f, []), im.width, im.height) for f, im in zip(frames, images)]


class DetectorBoxes:
    """A detector run on every frame, subject and object by ``pick_detections``.

    ``detector(images) -> [[Detection]]`` per image (``sapretrain.detector.YoloDetector``). Picks are cached per (clip, frame), so several
    models (and the baselines) share one detection pass. ``classes`` / ``subject_classes``: the
    names that count and the subject's (COCO's road users by default; ``classes=None``: every
    class). Weights whose class names (``detector.names``) include none of ``classes`` (a
    detector trained on something else) are warned about, and ``describe`` says so: every frame
    then gets the whole frame.
    """

    mode = "detector"
    finds_boxes = True

    def __init__(self, detector: Callable[[list], list[list[dict]]], name: str = "detector",
                 classes: Iterable[str] | None = ROAD_CLASSES, subject_classes: Iterable[str] = VEHICLES):
        names = None if getattr(detector, "open_vocab", False) else getattr(detector, "names", None)
        self.problem = None
        if classes is not None and names and not set(names) & set(classes):
            shown = ", ".join(list(names)[:8]) + (" ..." if len(names) > 8 else "")
            self.problem = (f"detector {name} finds none of DoTA's road classes (it finds {shown}): every "
                            "frame's boxes are the whole frame; use COCO-trained weights, or pass classes")
            warnings.warn(self.problem, stacklevel=2)
        self.detector = detector
        self.name = name
        self.classes = None if classes is None else frozenset(classes)
        self.subject_classes = frozenset(subject_classes)
        self._cache: dict[tuple[str, int], list[list[float]]] = {}

    def describe(self) -> str:
        text = (f"detector {self.name} on every frame: subject = largest vehicle, object = largest "
                "other road-user/obstacle detection (whole frame if none)")
        return f"{text}. WARNING: {self.problem}" if self.problem else text

    def clip_boxes(self, clip_id: str, frames: Sequence[int], images: Sequence[Image.Image]) -> list[list]:
        todo = [i for i, f in enumerate(frames) if (clip_id, f) not in self._cache]
        if todo:
            found = self.detector([images[i] for i in todo])
            for i, detections in zip(todo, found):
                self._cache[(clip_id, frames[i])] = pick_detections(detections, images[i].width, images[i].height,
                                                                    self.classes, self.subject_classes)
        return [self._cache[(clip_id, f)] for f in frames]


def _read_frame(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here
    except (OSError, SyntaxError, ValueError):
        return None


def load_clip(meta: Mapping[str, Any], clip_id: str, frames_root, frame_stride: int,
              counts: Counter) -> tuple[list[int], list[Image.Image]]:
    """The readable frames of a clip (every ``frame_stride``-th) and their images; a missing or
    unreadable frame is counted in ``counts`` and left out."""
    frames, images = [], []
    for frame in range(0, int(meta["num_frames"]), frame_stride):
        path = frame_path(frames_root, clip_id, frame)
        if not path.is_file():
            counts["missing_frame"] += 1
            continue
        image = _read_frame(path)
        if image is None:
            counts["unreadable_frame"] += 1
            continue
        frames.append(frame)
        images.append(image)
    return frames, images


# --------------------------------------------------------------------------------------------
# Scores and metrics


def frame_scores(v: torch.Tensor, u: torch.Tensor,
                 abnormal: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: score (mean cosine to the abnormal descriptions), contrast (score minus mean
    cosine to the normal ones), and the cosine matrix (F, N). ``v`` (F, E), ``u`` (N, E)."""
    sims = (F.normalize(v.double(), dim=-1) @ F.normalize(u.double(), dim=-1).T).numpy()  # (F, N)
    mask = np.asarray(abnormal, dtype=bool)
    score = sims[:, mask].mean(axis=1)
    normal = sims[:, ~mask].mean(axis=1) if (~mask).any() else np.zeros_like(score)
    return score, score - normal, sims


def baseline_scores(frames: Sequence[int], num_frames: int, found: Sequence[list] | None,
                    sizes: Sequence[tuple[int, int]]) -> dict[str, list[float]]:
    """The no-learning scores of a clip's frames (see the module doc); box ones only with ``found``."""
    out = {"position": [f / (num_frames - 1) if num_frames > 1 else 0.0 for f in frames]}
    if found is not None:
        out["box_area"] = [box_area(b[0]) / (w * h) if b else 0.0 for b, (w, h) in zip(found, sizes)]
        out["box_iou"] = [box_iou(b[0], b[1]) if len(b) > 1 else 0.0 for b in found]
    return out


def frame_auc(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, str | None]:
    """ROC-AUC (ties count half); ``None`` and a note when only one class is present."""
    from sklearn.metrics import roc_auc_score

    classes = set(int(x) for x in labels)
    if len(classes) < 2:
        if not classes:
            return None, "no frames"
        return None, f"only {'abnormal' if 1 in classes else 'normal'} frames: AUC undefined"
    return float(roc_auc_score(labels, scores)), None


def bootstrap_auc(labels: Sequence[Sequence[int]], scores: Sequence[Sequence[float]],
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                  level: float = CI_LEVEL) -> dict[str, Any]:
    """Percentile bootstrap interval of the frame ROC-AUC, resampling CLIPS with replacement.

    ``labels[c]`` / ``scores[c]``: the frames of clip ``c``. Each resample draws ``C`` clips
    (``numpy.random.default_rng(seed).integers(0, C, C)``, one call per resample) and computes the
    AUC over all frames of the drawn clips, a clip drawn k times counting k times: frames of one
    clip are not independent, clips are. Resamples with frames of one class only are left out
    and counted (``undefined``). Returns ``{"low", "high", "resamples", "undefined"}``; low/high
    are None when no resample is defined.
    """
    n_clips = len(labels)
    out = {"low": None, "high": None, "resamples": resamples, "undefined": 0}
    if n_clips == 0 or resamples <= 0:
        out["undefined"] = max(resamples, 0)
        return out
    y = np.concatenate([np.asarray(c, dtype=bool) for c in labels])  # (N,)
    s = np.concatenate([np.asarray(c, dtype=float) for c in scores])  # (N,)
    clip_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(labels)])  # (N,)
    order = np.argsort(s, kind="stable")
    s, y, clip_of = s[order], y[order], clip_of[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first frame of each run of tied scores
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        weight = np.bincount(rng.integers(0, n_clips, n_clips), minlength=n_clips)[clip_of]  # (N,)
        pos = np.add.reduceat(weight * y, starts).astype(float)  # weighted abnormal frames per tie run
        neg = np.add.reduceat(weight * ~y, starts).astype(float)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            out["undefined"] += 1
            continue
        below = np.cumsum(neg) - neg  # normal frames scored strictly lower
        aucs.append(float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)))
    if aucs:
        tail = 100 * (1 - level) / 2
        out["low"], out["high"] = (float(x) for x in np.percentile(aucs, [tail, 100 - tail]))
    return out


def _top(mean_sims: np.ndarray, descriptions: Sequence[Description], k: int = TOP_K) -> list[dict]:
    order = np.argsort(-mean_sims, kind="stable")[:k]
    return [{"text": descriptions[i].text, "path": descriptions[i].path, "abnormal": descriptions[i].abnormal,
             "similarity": round(float(mean_sims[i]), 6)} for i in order]


def explain(sims: np.ndarray, labels: Sequence[int], descriptions: Sequence[Description], k: int = TOP_K) -> dict:
    """The ``k`` descriptions with the highest mean cosine over the anomaly-window frames and over
    the normal frames of a clip (empty list when the clip has none of that kind)."""
    labels = np.asarray(labels, dtype=bool)
    out = {}
    for name, rows in (("anomaly_window", labels), ("normal_frames", ~labels)):
        out[name] = _top(sims[rows].mean(axis=0), descriptions, k) if rows.any() else []
    return out


# --------------------------------------------------------------------------------------------
# The evaluation


def evaluate_dota(encoder, metadata_path: str | Path, frames_root: str | Path, boxes=None,
                  descriptions: str | Path = DEFAULT_DESCRIPTIONS, frame_stride: int = 1,
                  max_clips: int | None = None, baselines: bool = False,
                  bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0, progress: bool = True,
                  nlp=None) -> dict[str, Any]:
    """Frame-level ROC-AUC of ``encoder`` on the non-ego DoTA clips (Eq. 11), per group and overall.

    ``encoder`` is an ``Encoder`` (or anything with ``texts``, ``images`` and ``uses_boxes``).
    ``boxes``: a box source (``DetectorBoxes``, ``WholeFrameBoxes`` (default), ``AnnotationBoxes``).
    ``max_clips`` takes the first non-ego clips in metadata order. ``baselines``: also score the
    same frames with the no-learning baselines. The result holds ``groups`` (the headline: per
    group auc, ``ci95``, frame and clip counts, a note when the AUC is undefined), ``secondary``
    (``contrast``, ``oracle_group``, ``oracle_group_contrast``: the same per group), optionally
    ``baselines`` (name -> groups), ``boxes`` (mode, source, frames without boxes), ``skipped``
    (per reason), ``bootstrap`` and ``clips`` (per clip: frame indices, labels, scores, top
    descriptions).
    """
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    boxes = boxes if boxes is not None else WholeFrameBoxes()
    sections = load_descriptions(descriptions)
    sets = description_sets(sections)
    # D(a) and D(n): the whole hierarchy, one entry per (text, kind); the same for every frame.
    headline_by_key: dict[tuple[str, bool], Description] = {}
    for d in (d for ds in sections.values() for d in ds):
        headline_by_key.setdefault((d.text, d.abnormal), d)
    headline = list(headline_by_key.values())

    # Text side: every distinct description once.
    texts = sorted({d.text for d in headline})
    triplets = description_triplets(texts, nlp)
    u_all = encoder.texts([EvalSample(caption=t, triplet=triplets[t]) for t in texts])  # (T, 2D)
    row = {t: i for i, t in enumerate(texts)}
    u_headline = u_all[[row[d.text] for d in headline]]  # (|D(a)| + |D(n)|, 2D)
    u_of = {g: u_all[[row[d.text] for d in ds]] for g, ds in sets.items()}

    # Clips.
    metadata = load_metadata(metadata_path)
    excluded = Counter()
    clips = []
    for clip_id, meta in metadata.items():
        group = clip_group(meta["anomaly_class"])
        if group is None:
            excluded["ego"] += 1
        else:
            clips.append((clip_id, meta, group))
    if max_clips is not None:
        clips = clips[:max_clips]

    counts = Counter()
    per_clip: dict[str, dict] = {}
    need_boxes = encoder.uses_boxes or (baselines and boxes.finds_boxes)
    for clip_id, meta, group in tqdm(clips, desc="DoTA clips", unit="clip", disable=not progress):
        if not (Path(frames_root) / clip_id / "images").is_dir():
            counts["missing_folder"] += 1
            continue
        frames, images = load_clip(meta, clip_id, frames_root, frame_stride, counts)
        if not frames:
            counts["missing_clip"] += 1
            continue
        found = boxes.clip_boxes(clip_id, frames, images) if need_boxes else None
        if found is not None:
            counts["no_boxes"] += sum(1 for b in found if not b)
        samples = [EvalSample(image=im, boxes=box_pair(found[i], im.width, im.height) if encoder.uses_boxes else None)
                   for i, im in enumerate(images)]
        v = encoder.images(samples)  # (F, 2D)
        score, contrast, sims = frame_scores(v, u_headline, [d.abnormal for d in headline])
        oracle, oracle_contrast, _ = frame_scores(v, u_of[group], [d.abnormal for d in sets[group]])
        labels = [frame_label(meta, f) for f in frames]
        entry = {
            "group": group, "anomaly_class": meta["anomaly_class"],
            "frames": frames, "labels": labels,
            **{key: [round(float(x), 6) for x in values] for key, values in (
                ("score", score), ("contrast", contrast), ("oracle_group", oracle),
                ("oracle_group_contrast", oracle_contrast))},
            "explanations": explain(sims, labels, headline),
        }
        if baselines:
            entry["baselines"] = baseline_scores(frames, int(meta["num_frames"]),
                                                 found if boxes.finds_boxes else None,
                                                 [im.size for im in images])
        per_clip[clip_id] = entry

    result = {
        "descriptions": str(descriptions),
        "frame_stride": frame_stride,
        "score": "auc: mean cosine to all abnormal descriptions D(a), the same set for every frame (Eq. 11)",
        "secondary_scores": {
            "contrast": "score minus the mean cosine to all normal descriptions D(n)",
            "oracle_group": "mean cosine to the abnormal descriptions of the clip's GOLD group (+ common): "
                            "uses the label's anomaly_class, not a deployable score",
            "oracle_group_contrast": "oracle_group minus the mean cosine to that group's normal descriptions",
        },
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": CI_LEVEL,
                      "method": "percentile; clips resampled with replacement within each group"},
        "groups": group_metrics(per_clip, lambda c: c["score"], bootstrap, seed),
        "secondary": {key: group_metrics(per_clip, lambda c, k=key: c[k], bootstrap, seed)
                      for key in SECONDARY_SCORES},
        "clips_evaluated": len(per_clip),
        "excluded": dict(excluded),
        "skipped": {reason: counts[reason] for reason in SKIP_REASONS},
        "no_boxes": counts["no_boxes"],
        "boxes": {"mode": boxes.mode if encoder.uses_boxes else "ignored",
                  "source": boxes.describe() if encoder.uses_boxes else "ignored (plain CLIP)",
                  "frames_without_boxes": counts["no_boxes"] if encoder.uses_boxes else None},
        "clips": per_clip,
    }
    if baselines:
        names = BASELINES if boxes.finds_boxes else BASELINES[:1]
        result["baselines"] = {
            name: {"description": BASELINE_DESCRIPTIONS[name],
                   "boxes": boxes.mode if name != "position" else "none",
                   "groups": group_metrics(per_clip, lambda c, n=name: c["baselines"][n], bootstrap, seed)}
            for name in names}
    return result


def _group_clips(per_clip: Mapping[str, dict], group: str) -> list[dict]:
    return [c for c in per_clip.values() if group == OVERALL or c["group"] == group]


def _group_labels(per_clip: Mapping[str, dict], group: str, key: str = "score") -> tuple[list[int], list[float]]:
    rows = _group_clips(per_clip, group)
    return [x for c in rows for x in c["labels"]], [x for c in rows for x in c[key]]


def group_metrics(per_clip: Mapping[str, dict], get: Callable[[dict], Sequence[float]],
                  bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """Per group (VV, VP, VO, overall): frame ROC-AUC of the scores ``get(clip)`` over the group's
    frames, its bootstrap CI over the group's clips, and the counts."""
    out = {}
    for group in (*GROUPS, OVERALL):
        rows = _group_clips(per_clip, group)
        labels = [x for c in rows for x in c["labels"]]
        auc, note = frame_auc(labels, [x for c in rows for x in get(c)])
        ci = bootstrap_auc([c["labels"] for c in rows], [get(c) for c in rows], bootstrap, seed)
        out[group] = {
            "auc": auc, "ci95": [ci["low"], ci["high"]] if auc is not None and ci["low"] is not None else None,
            "bootstrap_undefined": ci["undefined"],
            "clips": len(rows),
            "frames": len(labels), "abnormal_frames": int(sum(labels)), "normal_frames": len(labels) - int(sum(labels)),
        }
        if note:
            out[group]["note"] = note
    return out


# --------------------------------------------------------------------------------------------
# Reporting


def _auc_cell(m: Mapping[str, Any]) -> str:
    if m["auc"] is None:
        return "n/a"
    cell = f"{100 * m['auc']:.1f}"
    if m.get("ci95"):
        cell += f" [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"
    return cell


def _row(name: str, boxes: str, groups: Mapping[str, dict]) -> str:
    return f"| {name} | {boxes} | " + " | ".join(_auc_cell(groups[g]) for g in (*GROUPS, OVERALL)) + " |"


HEADER = ["| model | boxes | " + " | ".join(f"{g} AUC [95% CI]" for g in (*GROUPS, OVERALL)) + " |",
          "|---|---|" + "---|" * (len(GROUPS) + 1)]


def format_dota_table(result: Mapping[str, Any], label: str = "model") -> str:
    """Markdown for one model: headline AUC with CI per group, then the secondary scores, counts."""
    mode = result["boxes"]["mode"]
    lines = [*HEADER, _row(f"**{label}** (Eq. 11, D(a))", mode, result["groups"])]
    for key, groups in result["secondary"].items():
        lines.append(_row(f"{label}: {key} (secondary)", mode, groups))
    for name, b in result.get("baselines", {}).items():
        lines.append(_row(f"{name} (no model)", b["boxes"], b["groups"]))
    lines += ["", counts_line(result)]
    return "\n".join(lines)


def counts_line(result: Mapping[str, Any]) -> str:
    g = result["groups"]
    sizes = ", ".join(f"{k} {g[k]['clips']} clips / {g[k]['frames']} frames ({g[k]['abnormal_frames']} abnormal)"
                      for k in (*GROUPS, OVERALL))
    skipped = ", ".join(f"{k} {v}" for k, v in result["skipped"].items() if v) or "none"
    b = result["bootstrap"]
    return (f"{sizes}. Skipped: {skipped}. Ego clips excluded: {result['excluded'].get('ego', 0)}. "
            f"Boxes: {result['boxes']['source']}; frames without boxes: {result['no_boxes']}. "
            f"CI: {b['resamples']} clip resamples, seed {b['seed']}.")


def format_dota_summary(results: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Any] | None = None,
                        annotated: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One table for a run: every model's headline row and the no-learning baselines beside them,
    then a secondary table (contrast, oracle group, annotated boxes), then the counts."""
    lines = ["Headline: every frame scored against the same abnormal set D(a) (Eq. 11); frame ROC-AUC (%) "
             "split by group afterwards, bootstrap 95% CI over clips.", "", *HEADER]
    for label, r in results.items():
        lines.append(_row(f"**{label}**", r["boxes"]["mode"], r["groups"]))
    for name, b in (baselines or {}).items():
        lines.append(_row(f"{name} (no model)", b["boxes"], b["groups"]))
    lines += ["", "Secondary (not comparable to the headline: oracle_group uses the gold anomaly_class; "
              "annotated boxes mark the anomaly):", "", *HEADER]
    for label, r in results.items():
        for key, groups in r["secondary"].items():
            lines.append(_row(f"{label}: {key}", r["boxes"]["mode"], groups))
        if annotated and label in annotated:
            lines.append(_row(f"{label}: annotated boxes", "annotations", annotated[label]["groups"]))
    if baselines:
        lines += ["", "Baselines: " + "; ".join(f"{n}: {b['description']}" for n, b in baselines.items()) + "."]
    if results:
        lines += ["", counts_line(next(iter(results.values())))]
    return "\n".join(lines) + "\n"


def plot_dota(result: Mapping[str, Any], path: str | Path) -> None:
    """ROC curves per group (and overall) of the headline score, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for group in (*GROUPS, OVERALL):
        labels, scores = _group_labels(result["clips"], group)
        auc = result["groups"][group]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{group} (AUC {auc:.3f})", linewidth=2 if group == OVERALL else 1)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="DoTA frame-level ROC (D(a))")
    if any(result["groups"][g]["auc"] is not None for g in (*GROUPS, OVERALL)):
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no group with both classes", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
