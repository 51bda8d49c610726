"""The project's one detector wrapper, and loading ultralytics YOLO weights without running code.

    detector = YoloDetector("yolov8n.pt")    # batched; YOLO-World ("world" in the name): set_classes
    found = detector([image_a, image_b], classes=["man", "horse"])  # per image [Detection(name, box, score)]
    model = load_yolo("yolov8n.pt")          # ~/.cache/sapretrain/weights/yolov8n.pt, never ./yolov8n.pt
    model = load_yolo("./runs/best.pt")      # a path: used as given
    model = load_yolo("yolov8n.yaml")        # random init from ultralytics' packaged model config

A ``.pt`` file is a pickle, and unpickling can call any function it names. ultralytics unpickles
with ``weights_only=False`` by default, so a planted ``yolov8n.pt`` could run anything. Here a
checkpoint is loaded only after two checks:

1. **Scan** (``check_checkpoint``, nothing executed): every global the pickle references beyond
   torch's own tensor/storage set must be on ``allowed_global``'s list: ``nn.Module`` classes of
   ``torch.nn.modules`` and ``ultralytics.nn.{modules,tasks}``, the loss/assigner classes of
   ``ultralytics.utils.{loss,tal}`` that training checkpoints carry, and a fixed set of data types
   (``IterableSimpleNamespace``, numpy scalars/dtypes, ``pathlib`` paths, ``builtins.getattr``,
   which the restricted unpickler narrows to ``nn.Module`` attributes). Anything else
   (``os.system``, ``builtins.exec``, a ``__reduce__`` of any other class) is refused with
   ``UnsafeWeightsError`` naming it; so is a file that is not a ``torch.save`` zip archive.
2. **Restricted load**: ultralytics' own ``weights_only=True`` mode (``ULTRALYTICS_SAFE_LOAD``,
   switched on for this process by ``load_yolo``) unpickles with torch's restricted unpickler and
   builds models from their YAML without ``eval``. An ultralytics without that mode is refused.

**Where weights are looked up** (``resolve_weights``). A name with a directory part (``./x.pt``,
``/data/x.pt``, ``runs/best.pt``) is used as given. A bare file name (``yolov8n.pt``, the config
default) means ``weights_dir()`` (``$SAPRETRAIN_WEIGHTS_DIR``, default
``~/.cache/sapretrain/weights``) and **never the working directory**; when it is missing there and
the machine is online (not ``YOLO_OFFLINE``), an official ultralytics asset of that name is
downloaded into that folder (and then scanned like any other file). A bare ``.yaml`` name means
ultralytics' packaged model configs (``yolov8n.yaml`` → ``ultralytics/cfg/models/v8/yolov8.yaml``
at scale n). Other formats (ONNX, TorchScript, engines) are not loaded.

**Detections** are ``Detection(name, box, score)``: the class name, the box ``(x0, y0, x1, y1)`` in
pixels of the image given, the confidence. Subject and object boxes among them: ``sapretrain.boxes``.
Users: ``curation/rois.py``, ``eval/vsr.py`` (``YoloBoxes`` is this class), ``eval/dota.py``,
``eval/sugarcrepe.py``, ``eval/scene_detector.py``.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_WEIGHTS = "yolov8n.pt"  # a bare name: looked up in weights_dir()
WEIGHT_SUFFIXES = (".pt",)
CONFIG_SUFFIXES = (".yaml", ".yml")

# Globals outside the nn.Module rule that genuine checkpoints reference (ultralytics' own list).
DATA_GLOBALS = frozenset({
    "builtins.getattr",  # Detect.forward etc.; the restricted unpickler limits it to nn.Module attributes
    "ultralytics.utils.IterableSimpleNamespace",
    "ultralytics.yolo.utils.IterableSimpleNamespace",  # checkpoints older than 8.0.44
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtypes.Float64DType",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
    # Renamed classes that ultralytics maps to current ones while loading (YOLOv9e, YOLOv10).
    "ultralytics.nn.modules.block.Silence",
    "ultralytics.nn.tasks.YOLOv10DetectionModel",
    "ultralytics.utils.loss.v10DetectLoss",
})
MODULE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")
CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")  # criterion state in training checkpoints


class DetectorError(ValueError):
    """Detector weights that cannot be used: missing, wrong format, or unsafe."""


class UnsafeWeightsError(DetectorError):
    """A checkpoint referencing something a YOLO checkpoint never needs (it could run code)."""


def weights_dir() -> Path:
    """Where bare weight names live: ``$SAPRETRAIN_WEIGHTS_DIR``, else ``~/.cache/sapretrain/weights``."""
    return Path(os.environ.get("SAPRETRAIN_WEIGHTS_DIR") or Path.home() / ".cache" / "sapretrain" / "weights")


def _is_bare(name: str) -> bool:
    return "/" not in name and "\\" not in name and name not in (".", "..")


def _offline() -> bool:
    return os.environ.get("YOLO_OFFLINE", "").lower() in ("1", "true", "yes")


def _packaged_config(name: str) -> Path:
    """``yolov8n.yaml`` → the path ultralytics reads for it inside its own package (scale from the name)."""
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + Path(name).suffix  # yolov8n -> yolov8
    for candidate in (name, unified):
        found = sorted(root.rglob(candidate))
        if found:
            return found[0].parent / name
    raise DetectorError(f"no ultralytics model config {name!r} (looked in {root}); pass a path to a .yaml")


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The file ``weights`` means (see the module doc); raises ``DetectorError`` when there is none."""
    name = str(weights).strip()
    if not name:
        raise DetectorError("no detector weights given: pass a .pt path or a model .yaml")
    suffix = Path(name).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES + CONFIG_SUFFIXES:
        raise DetectorError(f"detector weights {name!r}: only ultralytics .pt checkpoints and .yaml model "
                            "configs are loaded (not ONNX, TorchScript or engine files)")
    if suffix in CONFIG_SUFFIXES:
        if _is_bare(name):
            return _packaged_config(name)
        if not Path(name).expanduser().is_file():
            raise DetectorError(f"detector config {name} does not exist")
        return Path(name).expanduser()
    if not _is_bare(name):
        if not Path(name).expanduser().is_file():
            raise DetectorError(f"detector weights {name} do not exist")
        return Path(name).expanduser()
    path = weights_dir() / name
    if not path.is_file() and not _offline():
        _download_official(name, path)
    if not path.is_file():
        raise DetectorError(
            f"detector weights {name!r} not found in {weights_dir()} (a bare name is looked up there, set by "
            f"SAPRETRAIN_WEIGHTS_DIR, never in the working directory): put the file there, or pass a path "
            f"such as ./{name}")
    return path


def _download_official(name: str, path: Path) -> None:
    """Fetch an official ultralytics asset into ``path`` (online only; failures leave ``path`` absent)."""
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if name not in GITHUB_ASSETS_NAMES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        attempt_download_asset(str(path))
    except Exception:  # offline, rate-limited, ...: the caller reports the missing file
        pass


def allowed_global(name: str) -> bool:
    """May a YOLO checkpoint reference the global ``module.Name``? (Importing a module of the
    allowed packages runs only that installed package's own code.)"""
    if name in DATA_GLOBALS:
        return True
    module, _, attr = name.rpartition(".")
    in_packages = any(module == p or module.startswith(p + ".") for p in MODULE_PACKAGES)
    if not (in_packages or module in CLASS_MODULES) or not attr.isidentifier():
        return False
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return False
    if not isinstance(obj, type):
        return False
    if module in CLASS_MODULES:
        return obj.__module__ == module
    import torch

    return issubclass(obj, torch.nn.Module)


def check_checkpoint(path: str | os.PathLike) -> None:
    """Refuse (``UnsafeWeightsError``) a ``.pt`` that is not a ``torch.save`` archive or whose pickle
    references a global outside ``allowed_global``. Nothing in the file is executed."""
    import torch

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # a bare pickle, a renamed image, a truncated zip
        raise UnsafeWeightsError(f"{path} is not a torch.save checkpoint archive ({type(e).__name__}: {e}); "
                                 "refusing to unpickle it") from None
    refused = sorted(n for n in needed if not allowed_global(n))
    if refused:
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise UnsafeWeightsError(f"{path} references {shown}, which no YOLO checkpoint needs (it could run code "
                                 "when unpickled): refusing to load it")


def _restricted_ultralytics() -> None:
    """Switch ultralytics to its ``weights_only=True`` loading for this process (and its children)."""
    from ultralytics.nn import tasks

    safe = getattr(tasks, "_SafeLoad", None)
    if safe is None or not getattr(safe, "SUPPORTED", False) or not hasattr(tasks, "SAFE_LOAD"):
        import ultralytics

        raise DetectorError(f"ultralytics {ultralytics.__version__} (with this torch) has no restricted "
                            "weights_only loading: install the version pinned in requirements.txt")
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    tasks.SAFE_LOAD = True  # read at call time by torch_safe_load and by model construction


def load_yolo(weights: str | os.PathLike = DEFAULT_WEIGHTS):
    """An ``ultralytics.YOLO`` from a checked ``.pt`` or a model ``.yaml`` (random init); see the module doc.
    Raises ``DetectorError`` (a ``ValueError``) with what to do instead."""
    path = resolve_weights(weights)
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        check_checkpoint(path)
    _restricted_ultralytics()
    from ultralytics import YOLO

    try:
        return YOLO(str(path))
    except Exception as e:  # ultralytics' refusal or a damaged file: one line naming the file
        raise DetectorError(f"cannot load detector {path}: {type(e).__name__}: {str(e).strip()[:300]}") from None


@dataclass(frozen=True)
class Detection:
    """One detected object: class ``name``, ``box`` ``(x0, y0, x1, y1)`` in pixels, ``score``."""

    name: str
    box: tuple[float, float, float, float]
    score: float = 1.0


def trained_imgsz(model) -> int:
    """The input size a loaded YOLO was trained at (its checkpoint's ``train_args.imgsz``, which
    ultralytics keeps in ``model.overrides``); 640, ultralytics' default, when it does not say."""
    size = getattr(model, "overrides", {}).get("imgsz")
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0 else 640


class YoloDetector:
    """An ultralytics YOLO (v8/11, or YOLO-World when "world" is in the weights' name), batched.

    ``detector(images, classes=None)`` -> per image a list of ``Detection``; ``classes`` sets an
    open-vocabulary model's classes (kept until other classes are asked for), a closed one ignores it.
    ``names``: the model's class names (a closed model only ever returns these). ``imgsz`` None:
    the size the weights were trained at (``trained_imgsz``): the tests' scene detector, trained at
    128 px, locates 110 of 120 objects at 128 px and 7 when its input is scaled to 640. ``agnostic``: one class per object
    (ultralytics' class-agnostic NMS). Its default NMS is per class, so an object the model is
    unsure of comes back under two names ("cube" and "sphere", "car" and "truck"), and a caption
    naming both would get that one object as its subject and its object.
    """

    def __init__(self, weights: str | os.PathLike = DEFAULT_WEIGHTS, conf: float = 0.25, imgsz: int | None = None,
                 batch: int = 16, device: str | None = None, agnostic: bool = True):
        self.model = load_yolo(weights)  # checked, restricted unpickling; bare names never from the cwd
        self.weights = str(weights)
        self.open_vocab = "world" in Path(str(weights)).name.lower()
        self.imgsz = int(imgsz) if imgsz else trained_imgsz(self.model)
        self.conf, self.batch, self.device, self.agnostic = conf, max(1, int(batch)), device, bool(agnostic)
        self._classes: list[str] | None = None

    @property
    def names(self) -> list[str]:
        """Class names, in the model's class order (an open-vocabulary model: the classes last set)."""
        names = self.model.names
        return [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]

    def __call__(self, images: Sequence[Any], classes: Sequence[str] | None = None) -> list[list[Detection]]:
        if self.open_vocab and classes and list(classes) != self._classes:
            self.model.set_classes(list(classes))
            self._classes = list(classes)
        if not images:
            return []
        results = self.model.predict(list(images), batch=self.batch, conf=self.conf, imgsz=self.imgsz,
                                     device=self.device, agnostic_nms=self.agnostic, verbose=False)
        out = []
        for result in results:
            names, boxes = result.names, result.boxes
            out.append([Detection(str(names[int(c)]), tuple(float(v) for v in xyxy), float(s))
                        for xyxy, c, s in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist())])
        return out
