"""SA-CLIP (paper §2.2): an open_clip CLIP plus an SVO text head and an ROI/box vision head.

For a sample with caption tokens ``text`` (L,), SVO span masks ``spans`` (3, L), image, subject and
object ROI crops and their boxes (DESIGN.md §1):

    tokens  = ln_final(transformer(token_emb + pos_emb)) @ text_projection      # (L, D)
    pooled  = open_clip's encode_text(text)                                     # (D,) EOT feature
    r_svo   = Linear(mean over {subj, rel, obj} of mean(tokens[span]))          # (D,)
    u       = concat(normalize(pooled), normalize(r_svo)) / sqrt(2)             # (2D,) unit norm

    f_v     = open_clip's encode_image                                          # (D,)
    e(box)  = MLP(x0, y0, x1, y1, area)                                         # (D,)
    r_roi   = Linear(concat(f_v(subj_crop) + e(subj_box), f_v(obj_crop) + e(obj_box)))   # (D,)
    v       = concat(normalize(f_v(image)), normalize(r_roi)) / sqrt(2)         # (2D,) unit norm

``forward(batch)`` returns, per sample (2N, ·): u, u_neg (negative caption, same path), v,
text_embed / neg_text_embed / image_embed (normalised CLIP features), r_svo, r_roi (raw head
outputs, before normalisation), and logit_scale () (see below). A batch without ``neg_text``
(the trainer drops it when no loss term reads it) gives no u_neg / neg_text_embed. The batch's
``groups`` (image/group ids, see sapretrain/data/batch.py) are passed through unchanged.

Choices the paper leaves open, made here:
- The text side *averages* the three part features, as the paper specifies. The vision side
  *concatenates* subject and object before the linear layer, so r_roi knows which region is the
  subject ("cup on table" and "table on cup" have the same two crops; only the roles differ).
  One box MLP is shared by both regions: the role is carried by the concat position.
- Ablations (paper Table 3) keep the width 2D and the unit norm, so the losses (which take u, v
  as L2-normalised, see sapretrain/losses.py) run unchanged: ``use_svo=False`` gives
  ``u = concat(normalize(pooled), 0)``, ``use_roi=False`` gives ``v = concat(normalize(f_v), 0)``.
  The disabled half is exactly zero and adds nothing to any dot product; the live half is the
  unit feature itself (not /sqrt(2)), so a contrastive term on u (v) is then exactly that of the
  plain normalised caption (image) feature at the same temperature, and with both switches off
  u . v is CLIP's cosine. The disabled heads are not built at all (no parameters that never get a
  gradient, which DDP would reject), and with ``use_roi=False`` the ROI crops are not encoded.
- Locked image tower (LiT, paper App. A): all vision parameters frozen, the tower stays in eval
  mode whatever ``train()`` says, runs under ``torch.no_grad()``, and is left out of
  ``param_groups``. With ``unlock_image_groups=k`` (open_clip's ``lock_image_tower(unlocked_groups)``)
  or ``lock_image=False`` the tower trains normally.
- ``logit_scale`` in the output dict is open_clip's learnable *log* scale parameter itself (its
  ``exp()`` is the logit scale), as ``sapretrain.losses.ClipLoss`` takes it. open_clip's own
  ``forward`` returns the ``exp``: do not feed this one to ``open_clip.ClipLoss``.
- Feature cache (DESIGN.md §6): with a fully frozen tower, ``forward`` accepts precomputed raw
  ``f_v`` outputs as ``batch["image_features"]`` (2N, D) and ``batch["roi_features"]`` (2N, 2, D)
  (from ``vision_features``) instead of ``image``/``rois``.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from sapretrain import resources

PARTS = ("subj", "rel", "obj")  # order of the span masks' second axis


register_model_configs = resources.register_model_configs  # the model JSONs in configs/ (sa-tiny)


@dataclass
class SAClipConfig:
    name: str = "ViT-B-32"  # open_clip model name (sa-tiny included) or a path to a model JSON config
    pretrained: str | None = "openai"  # open_clip tag, a local weights file, or None (random init)
    lock_image: bool = True  # LiT: freeze the vision tower
    unlock_image_groups: int = 0  # with lock_image: leave the last k groups of the tower trainable
    use_svo: bool = True  # text half r_svo (paper Table 3 ablation)
    use_roi: bool = True  # vision half r_roi (paper Table 3 ablation)
    box_embed_dim: int = 64  # hidden width of the box MLP

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SAClipConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown} (probably a typo); known: {sorted(known)}")
        return cls(**dict(values))


def resolve_model_name(name: str) -> str:
    """The open_clip registry name for ``name``; a ``*.json`` path is registered under its stem."""
    register_model_configs()
    if name.endswith(".json") or os.path.isfile(name):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {name}")
        open_clip.add_model_config(path)
        name = path.stem
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model {name!r}: not a built-in name, 'sa-tiny', or a JSON config path")
    return name


def build_clip(cfg: SAClipConfig, load_pretrained: bool = True) -> tuple[nn.Module, dict]:
    """The open_clip model for ``cfg`` (weights from ``cfg.pretrained`` when ``load_pretrained``),
    and the open_clip JSON config it was built from.

    A pretrained tag trained with QuickGELU (OpenAI's ViT-B-32 is) gets QuickGELU forced on, so
    ``ViT-B-32`` + ``openai`` is the network the weights were trained as (open_clip only warns).
    ``load_pretrained=False`` builds that same architecture without touching the weights (used when
    a checkpoint holds every tensor).
    """
    name = resolve_model_name(cfg.name)
    tag = open_clip.get_pretrained_cfg(name, cfg.pretrained) if cfg.pretrained else {}
    model_cfg = open_clip.get_model_config(name)
    if tag.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    clip = open_clip.create_model(
        name,
        pretrained=cfg.pretrained if load_pretrained else None,
        force_quick_gelu=bool(model_cfg.get("quick_gelu", False)),
    )
    if tag and not load_pretrained:  # same image mean/std/size as a tag-loaded model
        merged = open_clip.transform.merge_preprocess_dict(open_clip.get_model_preprocess_cfg(clip), tag)
        open_clip.set_model_preprocess_cfg(clip, merged)
    return clip, model_cfg


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


def masked_mean(tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, L, D) over each mask of ``masks`` (B, P, L) → (B, P, D).

    An all-False mask gives zeros (the loader guarantees at least one token per part).
    """
    m = masks.to(tokens.dtype)
    counts = m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, P, 1)
    return torch.bmm(m, tokens) / counts


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) normalised [x0, y0, x1, y1] → (…, 5) with the box area appended."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return torch.cat([boxes, wh[..., :1] * wh[..., 1:]], dim=-1)


class SAClip(nn.Module):
    """SA-CLIP around an open_clip ``CLIP`` / ``CustomTextCLIP``; see the module docstring."""

    def __init__(self, cfg: SAClipConfig, clip: nn.Module, model_cfg: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.model_cfg = model_cfg  # open_clip's JSON config (kept in checkpoints)
        self._text_inline = hasattr(clip, "token_embedding")  # CLIP: text tower attributes inline
        if not self._text_inline:
            text = getattr(clip, "text", None)
            if not isinstance(text, TextTransformer) or text.cls_emb is not None:
                raise NotImplementedError(
                    f"SA-CLIP needs per-token text features; {type(text).__name__} text towers are not supported "
                    "(supported: open_clip CLIP and CustomTextCLIP with a TextTransformer without a CLS embedding)"
                )
        if self._text_parts()[1] == "none":
            raise NotImplementedError("text pool_type 'none' gives no caption feature")

        self.embed_dim = d = _embed_dim(clip)
        self.svo_proj = nn.Linear(d, d) if cfg.use_svo else None
        if cfg.use_roi:
            self.box_embed = nn.Sequential(nn.Linear(5, cfg.box_embed_dim), nn.GELU(), nn.Linear(cfg.box_embed_dim, d))
            self.roi_proj = nn.Linear(2 * d, d)
        else:
            self.box_embed = self.roi_proj = None

        if cfg.lock_image:
            clip.lock_image_tower(unlocked_groups=cfg.unlock_image_groups)
        self.vision_frozen = not any(p.requires_grad for p in clip.visual.parameters())
        self.train(self.training)

    # ----- modes and optimizer groups

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_frozen:
            self.clip.visual.eval()  # LiT: the frozen tower never sees train-mode dropout / norm updates
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over trainable parameters; no decay on biases, norms, embeddings, logit scale."""
        decay, no_decay = [], []
        for name, p in self.trainable_parameters():
            skip = p.ndim < 2 or "embedding" in name or "logit_" in name or "ln_" in name or name.endswith(".bias")
            (no_decay if skip else decay).append(p)
        groups = [
            {"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Cap CLIP's learnable logit scale after an optimizer step, as open_clip's trainer does."""
        self.clip.logit_scale.clamp_(0, math.log(max_scale))

    # ----- text

    def _text_parts(self):
        c = self.clip
        if self._text_inline:
            return c.text_projection, c.text_pool_type, getattr(c, "text_eos_id", None)
        return c.text.text_projection, c.text.pool_type, c.text.eos_id

    def text_features(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids → pooled (B, D), exactly ``clip.encode_text``, and per-token (B, L, D)."""
        c = self.clip
        projection, pool_type, eos_id = self._text_parts()
        length = text.shape[1]
        if self._text_inline:  # the steps of CLIP.encode_text, keeping every token
            keep = self._trimmed_length(text, pool_type)
            text = text[:, :keep]
            cast_dtype = c.transformer.get_cast_dtype()
            x = c.token_embedding(text).to(cast_dtype) + c.positional_embedding[:keep].to(cast_dtype)
            mask = None if c.attn_mask is None else c.attn_mask[:keep, :keep]
            x = c.ln_final(c.transformer(x, attn_mask=mask))  # (B, keep, width)
        else:  # the steps of TextTransformer.forward (no CLS embedding)
            x, attn_mask = c.text._embeds(text)
            x = c.text.ln_final(c.text.transformer(x, attn_mask=attn_mask))
        pooled = _project(text_global_pool(x, text, pool_type, eos_token_id=eos_id), projection)
        tokens = _project(x, projection)
        if tokens.shape[1] < length:  # trimmed padding: zero features there (no span reaches them)
            tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
        return pooled, tokens

    def _trimmed_length(self, text: torch.Tensor, pool_type: str) -> int:
        """Positions up to the batch's last non-padding token, when dropping the rest is exact.

        Under CLIP's causal mask no position attends to a later one, so the trailing padding
        (token id 0) changes nothing before it; EOT/argmax/first pooling reads a kept position.
        Captions are short (~15 of 77 tokens): this is most of the text tower's cost. Without a
        causal mask, or with 'last' pooling, nothing is trimmed.
        """
        length = text.shape[1]
        if self.clip.attn_mask is None or pool_type not in ("argmax", "eos", "first"):
            return length
        nonzero = (text != 0).any(dim=0)  # (L,) some caption has a token here
        if not nonzero.any():
            return length
        return int(nonzero.nonzero().max()) + 1

    def svo_features(self, tokens: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Per-token features (B, L, D), span masks (B, 3, L) → r_svo (B, D)."""
        parts = masked_mean(tokens, spans)  # (B, 3, D) subject, relation, object
        return self.svo_proj(parts.mean(dim=1))

    def _text(self, text: torch.Tensor, spans: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, tokens = self.text_features(text)
        text_embed = F.normalize(pooled, dim=-1)
        if self.cfg.use_svo:
            r_svo = self.svo_features(tokens, spans)
            u = torch.cat([text_embed, F.normalize(r_svo, dim=-1)], dim=-1) / math.sqrt(2)
        else:
            r_svo = torch.zeros_like(text_embed)
            u = torch.cat([text_embed, r_svo], dim=-1)
        return {"u": u, "text_embed": text_embed, "r_svo": r_svo}

    def encode_text(self, text: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B, 3, L) masks → u (B, 2D)."""
        return self._text(text, spans)["u"]

    # ----- vision

    def vision_features(self, image: torch.Tensor, rois: torch.Tensor | None = None):
        """Raw f_v of images (B, 3, H, W) and ROI crops (B, 2, 3, H, W) → (B, D), (B, 2, D) or None.

        One pass of the tower over images and crops together; under no_grad when it is frozen.
        """
        b = image.shape[0]
        pixels = image if rois is None else torch.cat([image, rois.flatten(0, 1)])
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext():
            feats = self.clip.encode_image(pixels)
        roi_feats = None if rois is None else feats[b:].unflatten(0, (b, 2))
        return feats[:b], roi_feats

    def roi_features(self, roi_feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """f_v of the crops (B, 2, D) and their boxes (B, 2, 4) → r_roi (B, D)."""
        x = roi_feats + self.box_embed(box_features(boxes.to(roi_feats.dtype)))  # (B, 2, D)
        return self.roi_proj(x.flatten(1))  # concat keeps subject / object roles

    def _vision(self, image_feats: torch.Tensor, roi_feats: torch.Tensor | None, boxes) -> dict[str, torch.Tensor]:
        image_embed = F.normalize(image_feats, dim=-1)
        if self.cfg.use_roi:
            r_roi = self.roi_features(roi_feats, boxes)
            v = torch.cat([image_embed, F.normalize(r_roi, dim=-1)], dim=-1) / math.sqrt(2)
        else:
            r_roi = torch.zeros_like(image_embed)
            v = torch.cat([image_embed, r_roi], dim=-1)
        return {"v": v, "image_embed": image_embed, "r_roi": r_roi}

    def encode_image(self, images: torch.Tensor, rois: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, 2, 3, H, W), (B, 2, 4) → v (B, 2D)."""
        image_feats, roi_feats = self.vision_features(images, rois if self.cfg.use_roi else None)
        return self._vision(image_feats, roi_feats, boxes)["v"]

    @staticmethod
    def similarity(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix (Bv, Bu)."""
        return F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T

    # ----- training forward

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch contract of ``sapretrain.data.batch`` → per-sample features (2N, ·)."""
        n = batch["text"].shape[0]
        negatives = "neg_text" in batch  # a batch without them (no loss reads them) skips their encoding
        # Caption and negative caption in one pass of the text tower.
        text = self._text(
            torch.cat([batch["text"], batch["neg_text"]]) if negatives else batch["text"],  # (4N or 2N, L)
            torch.cat([batch["spans"], batch["neg_spans"]]) if negatives else batch["spans"],
        )

        if "image_features" in batch:
            if not self.vision_frozen:
                raise ValueError(
                    "precomputed image features need a fully frozen vision tower (lock_image, no unlocked groups)"
                )
            image_feats, roi_feats = batch["image_features"], batch.get("roi_features")
        else:
            image_feats, roi_feats = self.vision_features(batch["image"], batch["rois"] if self.cfg.use_roi else None)
        vision = self._vision(image_feats, roi_feats, batch.get("boxes"))

        out = {
            "u": text["u"][:n],
            "v": vision["v"],
            "text_embed": text["text_embed"][:n],
            "image_embed": vision["image_embed"],
            "r_svo": text["r_svo"][:n],
            "r_roi": vision["r_roi"],
            "logit_scale": self.clip.logit_scale,  # log scale: exp() is CLIP's logit scale
        }
        if negatives:
            out["u_neg"], out["neg_text_embed"] = text["u"][n:], text["text_embed"][n:]
        if "groups" in batch:  # (2N,) image/group ids, passed on for the losses' false-negative mask
            out["groups"] = batch["groups"]
        return out


def _embed_dim(clip: nn.Module) -> int:
    projection = clip.text_projection if hasattr(clip, "text_projection") else clip.text.text_projection
    if isinstance(projection, nn.Linear):
        return projection.out_features
    if projection is not None:
        return projection.shape[1]
    return clip.transformer.width if hasattr(clip, "transformer") else clip.text.width  # no projection


def build_saclip(cfg: SAClipConfig | Mapping[str, Any], load_pretrained: bool = True) -> SAClip:
    """SA-CLIP from a config (``SAClipConfig`` or a plain dict of its fields)."""
    if not isinstance(cfg, SAClipConfig):
        cfg = SAClipConfig.from_dict(cfg)
    clip, model_cfg = build_clip(cfg, load_pretrained=load_pretrained)
    return SAClip(cfg, clip, model_cfg=model_cfg)
