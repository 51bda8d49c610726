"""A real detector for the synthetic scenes, so the demo's boxes are not the generator's.

    weights = train_scene_detector("data/detector")          # cached: a second call only checks it
    finder = SceneBoxes(weights)                              # detections per image, batched
    boxes, status = match_parts({"subj": "red cube", "obj": "large sphere"}, finder.detect([image])[0], w, h)

**Detector.** An ultralytics YOLOv8n built from ``yolov8n.yaml`` (random init: no weights exist on
these machines) and trained on the synthetic *train* split only (scenes ``0 .. train_scenes-1``,
validation on the next ``val_scenes``; the evaluation split's seeds are never seen). Its 16 classes
are CLEVR's colour x shape ("red cube", "blue sphere"): the two objects of a scene always differ
in colour or shape (sapretrain/scenes/synthetic.py), so colour + shape names an object. Hue and
saturation augmentation are off (they would turn one class into another); flips, mosaic and scale
stay on. Trained once (3 epochs at 160 px on 1,200 scenes: about 3 minutes on 2 CPU cores) into
``OUT/scenes-yolov8n.pt`` with ``OUT/detector.json`` (settings and the validation mAP50 /
mAP50-95 on 200 further train-split scenes); later calls with the same settings reuse it.
``DetectorSettings.labels`` "shape" or "color" and a smaller ``width`` give quicker detectors
(tests/test_detector_e2e.py trains a colour-only half-width one in about a minute: colour is
learnt in a few hundred steps, shape is not). ultralytics' experiment trackers (MLflow, Ray
Tune, ...) stay off for the run.

**From caption parts to boxes** (``match_parts``: ``sapretrain.boxes.choose_boxes``, rule
"attributes"). A part ("large red metal cube") names its shape
by its noun (cube / block, sphere / ball) and maybe its colour. Detections (kept from a low
confidence, 0.05) are merged into instances when their boxes overlap (one object is often
detected under two labels), and the two parts take the two distinct instances whose labels agree
best with their words (+1 per shared attribute, -1 per contradicted one, times the label's score);
a size word ("large" / "small") breaks ties, then confidence. With fewer than two instances a part
gets the whole frame (counted: the model then sees no ROI for it, as for any user whose detector
missed). The relation text is never read, so the boxes cannot leak the answer.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sapretrain.boxes import choose_boxes, instances  # noqa: F401 (instances re-exported)
from sapretrain.scenes.synthetic import COLORS, SHAPES, SIZES, plan_scene, scene_id

CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
# DetectorSettings.labels -> class names. "color": "red object" (colour is learnt in a few hundred
# steps, shape is not; a caption's "red cube" matches it through the "object" hypernym and "red").
LABELS = {"color shape": CLASSES, "shape": SHAPES, "color": tuple(f"{c} object" for c in COLORS)}
SHAPE_WORDS = {"cube": "cube", "cubes": "cube", "block": "cube", "blocks": "cube",
               "sphere": "sphere", "spheres": "sphere", "ball": "sphere", "balls": "sphere"}
WEIGHTS_NAME = "scenes-yolov8n.pt"
WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DetectorSettings:
    train_scenes: int = 1200  # train-split scenes 0..N-1 (make_shards renders 4000 of them)
    val_scenes: int = 200  # the next ones
    epochs: int = 3
    imgsz: int = 160
    batch: int = 16
    seed: int = 0
    # A few hundred iterations from random init: a short warm-up and a fixed AdamW rate (ultralytics'
    # "auto" picks 0.0005 for 16 classes and warms up for 3 epochs, i.e. the whole run).
    lr0: float = 0.003
    warmup_epochs: float = 0.3
    mosaic: float = 0.0
    width: float = 0.25  # yolov8n's width multiple; smaller: a narrower YOLOv8
    labels: str = "color shape"  # 16 classes "red cube"; or "shape" ("cube"), "color" ("red object")


def class_names(labels: str) -> tuple[str, ...]:
    """The class names of a ``DetectorSettings.labels`` value."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {sorted(LABELS)}, got {labels!r}")
    return LABELS[labels]


def _label_lines(index: int, labels: str = "color shape") -> str:
    """YOLO label lines (class cx cy w h, normalised) of train scene ``index``; planning is cheap."""
    classes = class_names(labels)
    scene = plan_scene("train", index)
    lines = []
    for obj in scene.objects:
        x0, y0, x1, y1 = scene._clip(obj.box)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        cls = classes.index({"color shape": f"{obj.color} {obj.shape}", "shape": obj.shape,
                             "color": f"{obj.color} object"}[labels])
        cx, cy = (x0 + x1) / 2 / scene.width, (y0 + y1) / 2 / scene.height
        w, h = (x1 - x0) / scene.width, (y1 - y0) / scene.height
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "".join(line + "\n" for line in lines)


def write_yolo_dataset(synthetic_dir: str | Path, out_dir: str | Path, settings: DetectorSettings) -> Path:
    """A YOLO dataset (data.yaml, image lists, label files) over the rendered train scenes.

    Images stay where ``write_synthetic`` put them (``synthetic_dir/images``); ultralytics finds each
    image's labels by swapping ``/images/`` for ``/labels/`` in its path, so the labels go beside them.
    """
    synthetic_dir, out_dir = Path(synthetic_dir).resolve(), Path(out_dir).resolve()
    images = synthetic_dir / "images"
    labels = synthetic_dir / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    needed = settings.train_scenes + settings.val_scenes
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(needed):
        name = scene_id("train", index)
        image = next((p for p in (images / f"{name}.png", images / f"{name}.jpg") if p.exists()), None)
        if image is None:
            raise FileNotFoundError(f"{images}: no rendered image for {name}; the detector trains on the "
                                    f"first {needed} train scenes (python tools/make_shards.py renders them)")
        (labels / f"{name}.txt").write_text(_label_lines(index, settings.labels), encoding="utf-8")
        lists["train" if index < settings.train_scenes else "val"].append(str(image))
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, paths in lists.items():
        (out_dir / f"{split}.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
    data = out_dir / "data.yaml"
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(class_names(settings.labels)))
    data.write_text(f"path: {out_dir}\ntrain: {out_dir / 'train.txt'}\nval: {out_dir / 'val.txt'}\nnames:\n{names}",
                    encoding="utf-8")
    return data


def train_scene_detector(out_dir: str | Path, synthetic_dir: str | Path = "data/synthetic/train",
                         settings: DetectorSettings | None = None, workers: int = 2, log=print) -> Path:
    """Train (or reuse) the scene detector; returns the weights path. See the module docstring."""
    settings = settings or DetectorSettings()
    out = Path(out_dir)
    weights, meta_path = out / WEIGHTS_NAME, out / "detector.json"
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        # settings added since a detector was trained count as their defaults
        if {**asdict(DetectorSettings()), **(meta.get("settings") or {})} == asdict(settings):
            log(f"scene detector: already trained ({weights}, val mAP50 {meta['metrics']['mAP50']:.3f})")
            return weights
        log(f"scene detector: {meta_path} holds other settings; training again")
    from sapretrain.detector import load_yolo

    data = write_yolo_dataset(synthetic_dir, out / "dataset", settings)
    started = time.time()
    model = load_yolo(_model_config(out, settings.width))
    runs = (out / "runs").resolve()
    with _no_tracking():
        model.train(data=str(data), epochs=settings.epochs, imgsz=settings.imgsz, batch=settings.batch,
                    device="cpu", workers=workers, seed=settings.seed, deterministic=True, amp=False,
                    plots=False, val=False, project=str(runs), name="train", exist_ok=True, verbose=False,
                    optimizer="AdamW", lr0=settings.lr0, warmup_epochs=settings.warmup_epochs,
                    mosaic=settings.mosaic, hsv_h=0.0, hsv_s=0.0, hsv_v=0.2, close_mosaic=0, patience=settings.epochs)
    # Validated once, after the last epoch (val=False: no per-epoch validation, so best.pt is last.pt).
    best = runs / "train" / "weights" / "last.pt"
    if not best.exists():
        raise RuntimeError(f"detector training wrote no {best}")
    metrics = _validate(best, data, settings)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    shutil.copyfile(best, tmp)
    os.replace(tmp, weights)
    meta = {"settings": asdict(settings), "classes": list(class_names(settings.labels)), "metrics": metrics,
            "seconds": round(time.time() - started, 1)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"scene detector: trained in {meta['seconds']:.0f} s, val mAP50 {metrics['mAP50']:.3f} "
        f"(mAP50-95 {metrics['mAP50-95']:.3f}) -> {weights}")
    return weights


def _model_config(out: Path, width: float) -> str:
    """``yolov8n.yaml``, or for another width a copy of ultralytics' YOLOv8 config at that width
    (depth and everything else as yolov8n) written into ``out``."""
    if width == DetectorSettings.width:
        return "yolov8n.yaml"
    import yaml

    from sapretrain.detector import resolve_weights

    config = yaml.safe_load(resolve_weights("yolov8n.yaml").with_name("yolov8.yaml").read_text(encoding="utf-8"))
    config["scales"] = {"n": [0.33, float(width), 1024]}
    config["scale"] = "n"
    path = out / f"yolov8n-w{width:g}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


TRACKERS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


@contextlib.contextmanager
def _no_tracking():
    """ultralytics' experiment-tracker callbacks off for one training, in memory only (its settings
    file is left as it is): an offline CPU run logs to none of them, and merely importing Ray Tune
    when it is installed costs seconds."""
    from ultralytics.utils import SETTINGS

    saved = {key: SETTINGS.get(key) for key in TRACKERS}
    dict.update(SETTINGS, dict.fromkeys(TRACKERS, False))  # dict's own update: SETTINGS.update writes the file
    try:
        yield
    finally:
        dict.update(SETTINGS, saved)


def _validate(weights: Path, data: Path, settings: DetectorSettings) -> dict[str, float]:
    from sapretrain.detector import load_yolo

    result = load_yolo(str(weights)).val(data=str(data), imgsz=settings.imgsz, batch=settings.batch,
                                         device="cpu", plots=False, verbose=False, workers=0)
    return {"mAP50": round(float(result.box.map50), 4), "mAP50-95": round(float(result.box.map), 4)}


# --------------------------------------------------------------------------------------------
# Caption parts -> boxes


def part_attributes(text: str) -> dict[str, str | None]:
    """Shape, colour and size named by a part's words ("large red metal cube")."""
    words = WORD.findall(text.lower())
    shape = next((SHAPE_WORDS[w] for w in reversed(words) if w in SHAPE_WORDS), None)
    return {"shape": shape, "color": next((w for w in words if w in COLORS), None),
            "size": next((w for w in words if w in SIZES), None)}


def match_parts(texts: dict[str, str], detections: list, width: int, height: int
                ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Subject and object boxes for the parts' ``texts`` ({"subj", "obj"}) among ``detections``
    (``Detection`` or ``{"name", "box", "score"}``), and per part how: "detected", "by_size" (a
    size word broke a tie) or "missing" (no instance left: the whole frame).

    The project's box choice, rule "attributes" (``sapretrain.boxes``), with the scenes' words
    (``part_attributes``): the pair of distinct instances with the largest summed agreement on
    shape and colour; ties to the pair whose boxes fit the size words, then the more confident.
    Only the parts' own words are read."""
    choice = choose_boxes(detections, texts["subj"], texts["obj"], rule="attributes", attributes=part_attributes,
                          width=width, height=height)
    return choice.boxes, choice.how


class SceneBoxes:
    """Detections per image (batched) and the subject/object boxes a caption's parts name."""

    def __init__(self, weights: str | Path, conf: float = 0.05, imgsz: int | None = None, batch: int = 32):
        from sapretrain.detector import YoloDetector

        if imgsz is None:
            meta = Path(weights).with_name("detector.json")
            imgsz = json.loads(meta.read_text())["settings"]["imgsz"] if meta.exists() else DetectorSettings.imgsz
        # per-class NMS: the "attributes" rule merges an object's labels itself and weighs them all
        self.detector = YoloDetector(str(weights), conf=conf, imgsz=imgsz, batch=batch, device="cpu", agnostic=False)

    def detect(self, images: Sequence[Any], progress: bool = True) -> list[list]:
        from tqdm import tqdm

        out = []
        step = self.detector.batch
        for start in tqdm(range(0, len(images), step), desc="detecting", unit="batch", disable=not progress):
            out.extend(self.detector(list(images[start:start + step])))
        return out
