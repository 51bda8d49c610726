"""Models under evaluation, and how captions and images become their embeddings.

Every model is evaluated through the same code: an SA-CLIP (``u``, ``v``) or a plain CLIP. A plain
CLIP is an ``SAClip`` with both heads off (``use_svo=False, use_roi=False``), whose ``u . v`` is
exactly CLIP's cosine (sapretrain/model/saclip.py), so a baseline never takes a different path.

Model specs (``load_model``; the weights are read by ``sapretrain.model.checkpoint.load_saclip``):

    runs/demo                     a training run: its latest complete checkpoint
    runs/demo/checkpoints/step-00000300    one trainer checkpoint (state.pt)
    model.pt                      a ``save_saclip`` file
    exports/demo                  an exported Hub folder (config.json + model.safetensors)
    openclip:ViT-B-32:openai      any open_clip model and pretrained tag (or weights path), as plain CLIP
    openclip:sa-tiny              an open_clip model with random weights (tests)

Inputs (``EvalSample``): a PIL image with the subject/object boxes in pixels, and a caption with
the character spans of its subject, relation and object (the extractor's triplet format). The
same preprocessing as the shards is applied: ROI crops by ``roi_crop`` with the shard writer's
context, boxes normalised to the whole frame, captions tokenized with their SVO token positions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from sapretrain import storage
from sapretrain.data.batch import build_preprocess
from sapretrain.model import PARTS, SAClip, SAClipConfig, build_saclip, load_saclip
from sapretrain.model.checkpoint import CONFIG_FILE
from sapretrain.data.batch import caption_tensors
from sapretrain.shards.process import ImageSpec, normalise, roi_crop
from sapretrain.shards.tokens import SpanTokenizer
from sapretrain.shards.writer import ShardConfig
from sapretrain.train.checkpoint import resolve_checkpoint

OPENCLIP_PREFIX = "openclip:"


@dataclass
class EvalSample:
    image: Image.Image | None = None  # RGB
    boxes: dict[str, Sequence[float]] | None = None  # {"subj", "obj"}: [x0, y0, x1, y1] pixels
    caption: str | None = None
    triplet: dict[str, Any] | None = None  # {"subj"|"rel"|"obj": {"start", "end", ...}} char offsets


# --------------------------------------------------------------------------------------------
# Loading


def load_model(spec: str, device: str = "cpu") -> tuple[SAClip, str]:
    """The model named by ``spec`` (see the module docstring) in eval mode, and a display name."""
    if spec.startswith(OPENCLIP_PREFIX):
        name, _, tag = spec[len(OPENCLIP_PREFIX):].partition(":")
        if not name:
            raise ValueError(f"{spec!r}: expected openclip:MODEL[:TAG_OR_WEIGHTS]")
        cfg = SAClipConfig(name=name, pretrained=tag or None, use_svo=False, use_roi=False)
        return build_saclip(cfg).to(device).eval(), spec
    fs, path = storage.url_to_fs(spec)
    if not fs.exists(path):
        raise FileNotFoundError(f"model {spec!r}: no such file or directory (or use openclip:MODEL:TAG)")
    if fs.isdir(path) and not fs.exists(f"{path.rstrip('/')}/{CONFIG_FILE}"):  # a run or a trainer checkpoint
        return load_saclip(f"{resolve_checkpoint(spec)}/state.pt", map_location=device), spec.rstrip("/")
    return load_saclip(spec, map_location=device), spec.rstrip("/")


def model_summary(model: SAClip) -> dict[str, Any]:
    """What was evaluated: the SAClipConfig fields, and whether it is a plain CLIP."""
    cfg = model.cfg
    return {"config": json.loads(json.dumps(cfg.__dict__)), "plain_clip": not (cfg.use_svo or cfg.use_roi)}


# --------------------------------------------------------------------------------------------
# Encoding


class Encoder:
    """Batched text and image embeddings of one model, with the shard writer's preprocessing."""

    def __init__(self, model: SAClip, shard_cfg: ShardConfig | None = None, batch_size: int = 64,
                 device: str | None = None):
        shard_cfg = shard_cfg or ShardConfig()
        self.model = model.eval()
        self.device = device or next(model.parameters()).device
        self.batch_size = batch_size
        self.preprocess = build_preprocess(model)
        self.spec = ImageSpec(shard_cfg.image_size, shard_cfg.roi_size, shard_cfg.roi_context,
                              shard_cfg.jpeg_quality, shard_cfg.max_pixels, False)
        self.tokenizer = SpanTokenizer(shard_cfg.tokenizer, model.clip.context_length)

    @property
    def uses_spans(self) -> bool:
        return self.model.cfg.use_svo

    @property
    def uses_boxes(self) -> bool:
        return self.model.cfg.use_roi

    @torch.no_grad()
    def texts(self, samples: Sequence[EvalSample], parts: bool = False):
        """u (B, 2D) of the samples' captions; with ``parts`` a dict also holding text_embed, r_svo."""
        out = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            ids, masks = zip(*(self._caption(s) for s in chunk))
            feats = self.model._text(torch.stack(ids).to(self.device), torch.stack(masks).to(self.device))
            out.append({k: v.float().cpu() for k, v in feats.items()})
        return _join(out, "u", parts)

    @torch.no_grad()
    def images(self, samples: Sequence[EvalSample], parts: bool = False):
        """v (B, 2D) of the samples' images; with ``parts`` a dict also holding image_embed, r_roi."""
        out = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            pixels = torch.stack([self.preprocess(s.image.convert("RGB")) for s in chunk]).to(self.device)
            rois = boxes = None
            if self.uses_boxes:
                crops, boxes = zip(*(self._rois(s) for s in chunk))
                rois, boxes = torch.stack(crops).to(self.device), torch.stack(boxes).to(self.device)
            image_feats, roi_feats = self.model.vision_features(pixels, rois)
            feats = self.model._vision(image_feats, roi_feats, boxes)
            out.append({k: v.float().cpu() for k, v in feats.items()})
        return _join(out, "v", parts)

    def _caption(self, sample: EvalSample) -> tuple[torch.Tensor, torch.Tensor]:
        if not sample.caption:
            raise ValueError("sample without a caption")
        if sample.triplet is None:
            if self.uses_spans:
                raise ValueError(f"SA-CLIP needs the caption's SVO spans; none for {sample.caption!r}")
            # A plain CLIP ignores the spans; any token keeps caption_tensors' checks satisfied.
            spans = {part: (0, len(sample.caption)) for part in PARTS}
        else:
            spans = {part: (sample.triplet[part]["start"], sample.triplet[part]["end"]) for part in PARTS}
        tokenized = self.tokenizer(sample.caption, spans)
        if not all(tokenized.spans[p] for p in PARTS):
            raise ValueError(f"an SVO span of {sample.caption!r} falls beyond the context length")
        return caption_tensors({"tokens": tokenized.ids, "spans": tokenized.spans}, self.tokenizer.context_length)

    def _rois(self, sample: EvalSample) -> tuple[torch.Tensor, torch.Tensor]:
        if not sample.boxes:
            raise ValueError("SA-CLIP's image embedding needs the subject and object boxes")
        image = sample.image.convert("RGB")
        crops, boxes = [], []
        for part in ("subj", "obj"):
            x0, y0, x1, y1 = (float(v) for v in sample.boxes[part])
            x0, y0 = max(0.0, x0), max(0.0, y0)
            x1, y1 = min(float(image.width), x1), min(float(image.height), y1)
            if x1 - x0 < 1 or y1 - y0 < 1:
                raise ValueError(f"{part} box {list(sample.boxes[part])} has no area inside the "
                                 f"{image.width}x{image.height} image")
            crops.append(self.preprocess(roi_crop(image, (x0, y0, x1, y1), self.spec)))
            boxes.append(normalise((x0, y0, x1, y1), image.width, image.height))
        return torch.stack(crops), torch.tensor(boxes, dtype=torch.float32)


def _join(chunks: list[dict[str, torch.Tensor]], main: str, parts: bool):
    joined = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    return joined if parts else joined.get(main, torch.empty(0))
