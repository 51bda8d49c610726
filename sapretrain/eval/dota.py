"""DoTA zero-shot traffic-anomaly detection (SA-CLIP paper Table 2, App. C).

Each frame of a DoTA clip is embedded (``v``) and compared with a hierarchy of natural-language
descriptions of normal and abnormal traffic (``u``, configs/eval/dota_descriptions.yaml):

    score(frame)    = mean_{d in abnormal(g)} cos(v, u_d)                      # the reported AUC
    contrast(frame) = score(frame) - mean_{d in normal(g)} cos(v, u_d)         # a second number

where ``g`` is the clip's group and ``abnormal(g)`` its abnormal descriptions plus the ``common``
ones. The paper's Eq. 11 could not be consulted here; the first score follows DESIGN.md ("score =
mean similarity to the abnormal descriptions"), the second is the normal-contrasted reading.
Frame-level ROC-AUC is reported per group and overall.

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
(``UNGROUPED``) count only in "overall" and are scored against all descriptions.

SA-CLIP's image embedding needs a subject and an object box: the two largest annotated boxes of
the frame (largest = subject); with one box the object is the whole frame; with no annotation both
are the whole frame (counted as ``no_boxes``). A plain CLIP ignores boxes.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

from sapretrain.data.demo import PROJECT_ROOT
from sapretrain.eval.encode import EvalSample

DEFAULT_DESCRIPTIONS = str(PROJECT_ROOT / "configs" / "eval" / "dota_descriptions.yaml")
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


def pick_boxes(objects: Sequence[Mapping[str, Any]], width: int, height: int) -> dict[str, list[float]] | None:
    """Subject = largest annotated box, object = second largest (whole frame if only one); boxes
    are clipped to the image and ones under 2 px a side dropped. ``None`` without a usable box."""
    boxes = []
    for obj in objects:
        x0, y0, x1, y1 = (float(c) for c in obj["bbox"])
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            boxes.append([x0, y0, x1, y1])
    if not boxes:
        return None
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    whole = [0.0, 0.0, float(width), float(height)]
    return {"subj": boxes[0], "obj": boxes[1] if len(boxes) > 1 else whole}


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


def _read_frame(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes now: a truncated file fails here
    except (OSError, SyntaxError, ValueError):
        return None


def load_clip(meta: Mapping[str, Any], clip_id: str, frames_root, objects: Mapping[int, list],
              frame_stride: int, uses_boxes: bool, counts: Counter) -> tuple[list[int], list[EvalSample]]:
    """The readable frames of a clip (every ``frame_stride``-th) and their samples; a missing or
    unreadable frame is counted in ``counts`` and left out."""
    frames, samples = [], []
    for frame in range(0, int(meta["num_frames"]), frame_stride):
        path = frame_path(frames_root, clip_id, frame)
        if not path.is_file():
            counts["missing_frame"] += 1
            continue
        image = _read_frame(path)
        if image is None:
            counts["unreadable_frame"] += 1
            continue
        boxes = None
        if uses_boxes:
            boxes = pick_boxes(objects.get(frame, []), image.width, image.height)
            if boxes is None:
                counts["no_boxes"] += 1
                whole = [0.0, 0.0, float(image.width), float(image.height)]
                boxes = {"subj": whole, "obj": whole}
        frames.append(frame)
        samples.append(EvalSample(image=image, boxes=boxes))
    return frames, samples


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


def frame_auc(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, str | None]:
    """ROC-AUC (ties count half); ``None`` and a note when only one class is present."""
    from sklearn.metrics import roc_auc_score

    classes = set(int(x) for x in labels)
    if len(classes) < 2:
        if not classes:
            return None, "no frames"
        return None, f"only {'abnormal' if 1 in classes else 'normal'} frames: AUC undefined"
    return float(roc_auc_score(labels, scores)), None


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


def evaluate_dota(encoder, metadata_path: str | Path, frames_root: str | Path,
                  annotations_root: str | Path | None = None,
                  descriptions: str | Path = DEFAULT_DESCRIPTIONS,
                  frame_stride: int = 1, max_clips: int | None = None, progress: bool = True,
                  nlp=None) -> dict[str, Any]:
    """Frame-level ROC-AUC of ``encoder`` on the non-ego DoTA clips, per group and overall.

    ``encoder`` is an ``Encoder`` (or anything with ``texts``, ``images`` and ``uses_boxes``).
    ``max_clips`` takes the first non-ego clips in metadata order. The result holds ``groups``
    (``VV``, ``VP``, ``VO``, ``overall``: auc, auc_contrast, frame and clip counts, a note when
    the AUC is undefined), ``skipped`` (per reason), ``no_boxes`` and ``clips`` (per clip: frame
    indices, labels, scores and the top descriptions).
    """
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    sections = load_descriptions(descriptions)
    sets = description_sets(sections)

    # Text side: every distinct description once.
    texts = sorted({d.text for ds in sections.values() for d in ds})
    triplets = description_triplets(texts, nlp)
    u_all = encoder.texts([EvalSample(caption=t, triplet=triplets[t]) for t in texts])  # (N, 2D)
    row = {t: i for i, t in enumerate(texts)}
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
    for clip_id, meta, group in tqdm(clips, desc="DoTA clips", unit="clip", disable=not progress):
        if not (Path(frames_root) / clip_id / "images").is_dir():
            counts["missing_folder"] += 1
            continue
        objects = load_frame_objects(annotations_root, clip_id) if encoder.uses_boxes else {}
        frames, samples = load_clip(meta, clip_id, frames_root, objects, frame_stride, encoder.uses_boxes, counts)
        if not frames:
            counts["missing_clip"] += 1
            continue
        v = encoder.images(samples)  # (F, 2D)
        ds = sets[group]
        score, contrast, sims = frame_scores(v, u_of[group], [d.abnormal for d in ds])
        labels = [frame_label(meta, f) for f in frames]
        per_clip[clip_id] = {
            "group": group, "anomaly_class": meta["anomaly_class"],
            "frames": frames, "labels": labels,
            "score": [round(float(s), 6) for s in score], "contrast": [round(float(s), 6) for s in contrast],
            "explanations": explain(sims, labels, ds),
        }

    return {
        "descriptions": str(descriptions),
        "frame_stride": frame_stride,
        "score": "auc: mean cosine to the clip group's abnormal descriptions; "
                 "auc_contrast: that minus the mean cosine to its normal ones",
        "groups": _group_metrics(per_clip),
        "clips_evaluated": len(per_clip),
        "excluded": dict(excluded),
        "skipped": {reason: counts[reason] for reason in SKIP_REASONS},
        "no_boxes": counts["no_boxes"],
        "boxes": "annotations (two largest), whole frame otherwise" if encoder.uses_boxes else "ignored (plain CLIP)",
        "clips": per_clip,
    }


def _group_labels(per_clip: Mapping[str, dict], group: str, key: str = "score") -> tuple[list[int], list[float]]:
    rows = [c for c in per_clip.values() if group == OVERALL or c["group"] == group]
    return [x for c in rows for x in c["labels"]], [x for c in rows for x in c[key]]


def _group_metrics(per_clip: Mapping[str, dict]) -> dict[str, dict]:
    out = {}
    for group in (*GROUPS, OVERALL):
        labels, scores = _group_labels(per_clip, group)
        _, contrast = _group_labels(per_clip, group, "contrast")
        auc, note = frame_auc(labels, scores)
        auc_contrast, _ = frame_auc(labels, contrast)
        out[group] = {
            "auc": auc, "auc_contrast": auc_contrast,
            "clips": sum(1 for c in per_clip.values() if group == OVERALL or c["group"] == group),
            "frames": len(labels), "abnormal_frames": int(sum(labels)), "normal_frames": len(labels) - int(sum(labels)),
        }
        if note:
            out[group]["note"] = note
    return out


# --------------------------------------------------------------------------------------------
# Reporting


def format_dota_table(result: Mapping[str, Any]) -> str:
    """A markdown table: per group AUC, contrast AUC, clips and frames; skip counts below."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    lines = ["| group | AUC | AUC (contrast) | clips | frames (abnormal) |", "|---|---|---|---|---|"]
    for group, m in result["groups"].items():
        lines.append(f"| {group} | {pct(m['auc'])} | {pct(m['auc_contrast'])} | {m['clips']} | "
                     f"{m['frames']} ({m['abnormal_frames']}) |")
    skipped = ", ".join(f"{k} {v}" for k, v in result["skipped"].items() if v) or "none"
    lines.append("")
    lines.append(f"Skipped: {skipped}. Ego clips excluded: {result['excluded'].get('ego', 0)}. "
                 f"Frames without boxes: {result['no_boxes']}.")
    return "\n".join(lines)


def plot_dota(result: Mapping[str, Any], path: str | Path) -> None:
    """ROC curves per group (and overall) of the main score, as a PNG."""
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
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="DoTA frame-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
