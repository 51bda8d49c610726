"""The Python API: load a model, embed captions and images, score image-caption pairs.

    import sapretrain
    model = sapretrain.load("runs/demo/saclip")      # run dir, checkpoint, model file, exported folder,
                                                     # or openclip:NAME[:TAG] (plain CLIP)
    text = model.encode_text(["a cat under a table"])   # runs the SVO extractor
    text.u.shape, text.triplets[0]["rel"]["text"]       # (1, 2D), 'under'
    image = model.encode_image(["photo.jpg"], captions=["a cat under a table"])
    image.box_source                                    # ['detector'] / ['given'] / ['whole_frame']
    model.score("photo.jpg", "a cat under a table")     # cosine of v and u, in [-1, 1]

What each call does (docs/api.md has the full contract):

- ``encode_text`` parses each caption with spaCy (``sapretrain.curation.svo``) and takes its
  first subject-relation-object triplet (or the ``triplets`` given), tokenizes it as the shards
  do, and returns ``u`` (B, 2D) with its parts ``text_embed`` (B, D) and ``r_svo`` (B, D). A
  caption without a triplet raises ``NoTripletError``, unless ``missing_triplet="global"``: then
  its ``u`` is the caption's global half only, ``concat(text_embed, 0)`` (exactly the
  ``use_svo=False`` form, unit norm), and ``triplets[i]`` is None. A plain CLIP needs no triplet.
- ``encode_image`` needs the subject and object boxes of each image for SA-CLIP's ROI half:
  ``boxes`` given ([x0, y0, x1, y1] pixels per part) are used as they are (``given``); else the
  caption's subject and object are looked for with the pipeline's detector and the curation
  box-choice rule (``sapretrain.boxes.find_boxes``, rule "nouns": best noun match, then the
  larger boxes, never one instance for both) (``detector``); when there is no detector, no caption, or no
  match, both ROIs are the whole frame (``whole_frame``, with the reason in ``box_detail``).
  ``box_source`` says which, per image. A plain CLIP ignores boxes (``not_used``).
- ``score(image, caption)`` is the cosine of the image's ``v`` (boxes for that caption) and the
  caption's ``u``: what the evaluation ranks by. ``score_batch(images, captions)`` scores pair i
  (image i with caption i), shape (B,); to rank captions for one image, repeat the image: each
  caption then gets its own boxes.

Inputs are checked: an image that is not a PIL image or a readable file, a caption that is not
non-empty text, lists of different lengths, or a box outside the image raise ``ValueError``
(``FileNotFoundError`` for a missing file) naming the item.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from sapretrain.eval.encode import Encoder, EvalSample, load_model
from sapretrain.model import SAClip
from sapretrain.model.checkpoint import read_pretrained_config
from sapretrain.shards.writer import ShardConfig

PARTS = ("subj", "rel", "obj")
BOX_PARTS = ("subj", "obj")
MISSING_TRIPLET = ("error", "global")


class NoTripletError(ValueError):
    """A caption in which the SVO extractor finds no subject-relation-object triplet."""


@dataclass
class TextEmbeddings:
    u: torch.Tensor  # (B, 2D) SA-CLIP text embedding, unit norm
    text_embed: torch.Tensor  # (B, D) normalised CLIP caption feature
    r_svo: torch.Tensor  # (B, D) SVO head output before normalisation (zeros: none)
    triplets: list[dict | None]  # the triplet used per caption (extractor format), None: global only
    captions: list[str] = field(default_factory=list)


@dataclass
class ImageEmbeddings:
    v: torch.Tensor  # (B, 2D) SA-CLIP image embedding, unit norm
    image_embed: torch.Tensor  # (B, D) normalised CLIP image feature
    r_roi: torch.Tensor  # (B, D) ROI head output before normalisation (zeros: none)
    boxes: list[dict[str, list[float]] | None]  # subject/object boxes used (pixels), None: not used
    box_source: list[str]  # given | detector | whole_frame | not_used
    box_detail: list[str | None]  # why whole_frame was used


def load(source: str, **kwargs) -> "SAClipPipeline":
    """``SAClipPipeline.from_pretrained(source, **kwargs)``."""
    return SAClipPipeline.from_pretrained(source, **kwargs)


class SAClipPipeline:
    """An SA-CLIP (or plain CLIP) model with the extractor, tokenizer, crops and box finder it needs.

    ``detector``: None (no detection: whole-frame ROIs unless boxes are given), ultralytics
    weights (``"yolov8n.pt"``, looked up as ``sapretrain.detector`` does), or any callable
    ``detector(images, classes) -> [[Detection or {"name", "box": [x0, y0, x1, y1], "score"}, ...], ...]``
    (as ``sapretrain.detector.YoloDetector``). ``shard_config``: the tokenizer and ROI crop settings
    (the model's training shards'; exported folders carry theirs).
    """

    def __init__(self, model: SAClip, shard_config: ShardConfig | None = None, detector: Any = None,
                 nlp: Any = None, device: str | None = None, batch_size: int = 64, name: str | None = None):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.name = name
        self.shard_config = shard_config or ShardConfig()
        self.encoder = Encoder(self.model, self.shard_config, batch_size=batch_size)
        self._detector = detector
        self._nlp = nlp

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str = "cpu", detector: Any = None,
                        shard_config: ShardConfig | None = None, **kwargs) -> "SAClipPipeline":
        """Load ``source``: a training run dir (its latest complete checkpoint), a checkpoint dir
        or ``state.pt``, a ``save_saclip`` file, an exported folder (``sapretrain.export``), or
        ``openclip:NAME[:TAG]`` (a plain CLIP through open_clip)."""
        source = str(source)
        model, name = load_model(source, device=device)
        if shard_config is None:
            shard_config = _exported_shard_config(source)
        return cls(model, shard_config=shard_config, detector=detector, device=device, name=name, **kwargs)

    # ----- properties

    @property
    def uses_triplets(self) -> bool:
        return self.encoder.uses_spans

    @property
    def uses_boxes(self) -> bool:
        return self.encoder.uses_boxes

    @property
    def nlp(self):
        if self._nlp is None:
            from sapretrain.curation.svo import load_nlp

            self._nlp = load_nlp()
        return self._nlp

    # ----- text

    def parse(self, caption: str) -> list[dict]:
        """Every triplet the SVO extractor finds in ``caption`` (extractor format, character spans)."""
        from sapretrain.curation.svo import extract_triplets

        return extract_triplets(self.nlp(_check_caption(caption, 0)))

    def triplet_of(self, caption: str) -> dict | None:
        """The triplet ``encode_text`` uses for ``caption``: the extractor's first, None when none."""
        found = self.parse(caption)
        return found[0] if found else None

    def encode_text(self, captions: str | Sequence[str], triplets: Sequence[dict | None] | None = None,
                    missing_triplet: str = "error") -> TextEmbeddings:
        """Text embeddings of ``captions`` (see the module doc); ``triplets`` skip the extractor."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if missing_triplet not in MISSING_TRIPLET:
            raise ValueError(f"missing_triplet={missing_triplet!r}: expected one of {MISSING_TRIPLET}")
        if not captions:
            raise ValueError("encode_text: no captions")
        for i, c in enumerate(captions):
            _check_caption(c, i)
        if triplets is not None and len(triplets) != len(captions):
            raise ValueError(f"{len(triplets)} triplets for {len(captions)} captions")
        used = list(triplets) if triplets is not None else [self._triplet_or_none(c) for c in captions]
        global_only = []
        for i, (caption, triplet) in enumerate(zip(captions, used)):
            if triplet is not None:
                _check_triplet(caption, triplet, i)
            elif self.uses_triplets:
                if missing_triplet == "error":
                    raise NoTripletError(
                        f"caption {i} {caption!r}: the SVO extractor found no subject-relation-object triplet; "
                        "pass triplets=[...] with character spans, or missing_triplet='global' to use the "
                        "caption's global embedding only")
                global_only.append(i)
        samples = [EvalSample(caption=c, triplet=t if t is not None else _whole(c)) for c, t in zip(captions, used)]
        feats = self.encoder.texts(samples, parts=True)
        if global_only:  # u = concat(text_embed, 0): the use_svo=False form, still unit norm
            rows = torch.tensor(global_only)
            d = feats["text_embed"].shape[1]
            feats["u"][rows] = torch.cat([feats["text_embed"][rows], torch.zeros(len(rows), d)], dim=1)
            feats["r_svo"][rows] = 0.0
        used = [None if i in global_only else t for i, t in enumerate(used)]
        return TextEmbeddings(feats["u"], feats["text_embed"], feats["r_svo"], used, captions)

    def _triplet_or_none(self, caption: str) -> dict | None:
        return self.triplet_of(caption) if (self.uses_triplets or self.uses_boxes) else None

    # ----- images

    def encode_image(self, images, captions: Sequence[str] | str | None = None,
                     boxes: Sequence[dict | None] | dict | None = None,
                     triplets: Sequence[dict | None] | None = None) -> ImageEmbeddings:
        """Image embeddings (see the module doc). ``images``: PIL images or paths (one or a list);
        ``boxes``: per image ``{"subj": [x0, y0, x1, y1], "obj": [...]}`` in pixels, or None."""
        single = isinstance(images, (str, os.PathLike, Image.Image))
        images = [_open_image(im, i) for i, im in enumerate([images] if single else list(images))]
        if not images:
            raise ValueError("encode_image: no images")
        captions = _per_image(captions, len(images), "captions", str)
        boxes = _per_image(boxes, len(images), "boxes", dict)
        triplets = _per_image(triplets, len(images), "triplets", dict)
        used, sources, details = [None] * len(images), ["not_used"] * len(images), [None] * len(images)
        if self.uses_boxes:
            pending = []  # images whose boxes are to be found
            for i, image in enumerate(images):
                if boxes[i] is not None:
                    used[i], sources[i] = _check_boxes(boxes[i], image, i), "given"
                else:
                    pending.append(i)
            found = self._find_boxes([images[i] for i in pending], [captions[i] for i in pending],
                                     [triplets[i] for i in pending], pending)
            for i, (box, detail) in zip(pending, found):
                if box is None:
                    box, sources[i] = {p: [0.0, 0.0, float(images[i].width), float(images[i].height)]
                                       for p in BOX_PARTS}, "whole_frame"
                else:
                    sources[i] = "detector"
                used[i], details[i] = box, detail
        samples = [EvalSample(image=im, boxes=b) for im, b in zip(images, used)]
        feats = self.encoder.images(samples, parts=True)
        return ImageEmbeddings(feats["v"], feats["image_embed"], feats["r_roi"], used, sources, details)

    @property
    def detector(self) -> Callable | None:
        if isinstance(self._detector, (str, os.PathLike)):
            from sapretrain.detector import YoloDetector

            self._detector = YoloDetector(str(self._detector))
        return self._detector

    def _find_boxes(self, images: list[Image.Image], captions: list[str | None], triplets: list[dict | None],
                    index: list[int]) -> list[tuple[dict | None, str | None]]:
        """Per image the subject and object boxes of its caption, or None and why not.

        The one place that calls the detector and the box-choice rule (``sapretrain.boxes``), so
        a change of either is made here. The detector runs once over all images that need it."""
        out: list[tuple[dict | None, str | None]] = [(None, "no detector configured")] * len(images)
        if self.detector is None or not images:
            return out
        parts = []  # (position, subject text, object text)
        for k, (caption, triplet) in enumerate(zip(captions, triplets)):
            if triplet is None:
                if caption is None:
                    out[k] = (None, "no caption to find the subject and object of")
                    continue
                triplet = self.triplet_of(_check_caption(caption, index[k]))
                if triplet is None:
                    out[k] = (None, f"no triplet in {caption!r}")
                    continue
            parts.append((k, triplet["subj"]["text"], triplet["obj"]["text"]))
        if not parts:
            return out
        from sapretrain.boxes import find_boxes

        choices = find_boxes(self.detector, [images[k] for k, _, _ in parts], [s for _, s, _ in parts],
                             [o for _, _, o in parts])
        for (k, _, _), choice in zip(parts, choices):
            out[k] = (choice.boxes, None) if choice.boxes is not None else \
                (None, f"detector: {choice.reason} ({choice.detail})")
        return out

    # ----- scores

    def score(self, image, caption: str, boxes: dict | None = None, triplet: dict | None = None,
              missing_triplet: str = "error") -> float:
        """Cosine similarity of ``image`` (boxes for ``caption``) and ``caption``."""
        return float(self.score_batch([image], [caption], None if boxes is None else [boxes], missing_triplet,
                                      None if triplet is None else [triplet])[0])

    def score_batch(self, images, captions: Sequence[str], boxes: Sequence[dict | None] | None = None,
                    missing_triplet: str = "error", triplets: Sequence[dict | None] | None = None) -> torch.Tensor:
        """(B,) cosine similarity of image i and caption i (``triplets``: known spans, skip the extractor)."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        single = isinstance(images, (str, os.PathLike, Image.Image))
        images = [images] if single else list(images)
        if len(images) != len(captions):
            raise ValueError(f"score_batch: {len(images)} images for {len(captions)} captions (pair i is "
                             "image i with caption i; repeat an image to score it against several captions)")
        text = self.encode_text(captions, triplets=triplets, missing_triplet=missing_triplet)
        image = self.encode_image(images, captions=captions, boxes=boxes, triplets=text.triplets)
        return (torch.nn.functional.normalize(image.v, dim=-1) * torch.nn.functional.normalize(text.u, dim=-1)).sum(-1)

    def __repr__(self) -> str:
        cfg = self.model.cfg
        kind = "plain CLIP" if not (cfg.use_svo or cfg.use_roi) else "SA-CLIP"
        return f"SAClipPipeline({self.name or cfg.name!r}, {kind}, detector={self._detector!r})"


# ----- helpers


def _exported_shard_config(source: str) -> ShardConfig | None:
    """The tokenizer / crop settings an exported folder carries (None: not an export)."""
    if source.startswith("openclip:"):
        return None
    path = Path(source)
    if not (path / "config.json").is_file():
        return None
    values = read_pretrained_config(source).get("shards") or {}
    known = {k: v for k, v in values.items() if k in ShardConfig.__dataclass_fields__}
    return ShardConfig(**known)


def _check_caption(caption: Any, i: int) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption {i}: {caption!r} is not a non-empty string")
    return caption


def _check_triplet(caption: str, triplet: Any, i: int) -> None:
    if not isinstance(triplet, dict) or any(not isinstance(triplet.get(p), dict) for p in PARTS):
        raise ValueError(f"triplet {i}: expected {{'subj', 'rel', 'obj'}} parts with 'start'/'end', got {triplet!r}")
    for p in PARTS:
        start, end = triplet[p].get("start"), triplet[p].get("end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(caption)):
            raise ValueError(f"triplet {i}: {p} span ({start}, {end}) is not inside caption {caption!r}")


def _whole(caption: str) -> dict:
    """Spans over the whole caption: for models that read no spans (plain CLIP, global-only rows)."""
    return {p: {"start": 0, "end": len(caption)} for p in PARTS}


def _open_image(image: Any, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {i}: {image} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"image {i}: {image} is not a readable image ({e})") from None
    raise ValueError(f"image {i}: expected a PIL image or a path, got {type(image).__name__}")


def _per_image(values, n: int, what: str, single_type: type) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, single_type):
        values = [values]
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} images")
    return values


def _check_boxes(boxes: Any, image: Image.Image, i: int) -> dict[str, list[float]]:
    if not isinstance(boxes, dict) or any(p not in boxes for p in BOX_PARTS):
        raise ValueError(f"boxes {i}: expected {{'subj': [x0, y0, x1, y1], 'obj': [...]}} in pixels, got {boxes!r}")
    out = {}
    for p in BOX_PARTS:
        box = boxes[p]
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"boxes {i}: {p} box {box!r} is not four numbers [x0, y0, x1, y1]") from None
        if not (min(x1, image.width) - max(x0, 0) >= 1 and min(y1, image.height) - max(y0, 0) >= 1):
            raise ValueError(f"boxes {i}: {p} box {list(box)} has no area inside the {image.width}x{image.height} image")
        out[p] = [x0, y0, x1, y1]
    return out
