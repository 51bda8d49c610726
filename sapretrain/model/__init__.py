"""SA-CLIP model: open_clip CLIP + SVO text head + ROI/box vision head (DESIGN.md §1, docs in saclip.py).

    from sapretrain.data.batch import build_preprocess, collate_records
    from sapretrain.model import SAClipConfig, build_saclip
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False))
    out = model(collate_records(records, build_preprocess(model)))   # u, v, u_neg, ...

Importing this package registers the model configs shipped in ``configs/`` (``sa-tiny``) with
open_clip, so ``open_clip.create_model("sa-tiny")`` works too.
"""
from sapretrain.model.checkpoint import export_open_clip, load_saclip, save_saclip
from sapretrain.model.saclip import (
    PARTS,
    SAClip,
    SAClipConfig,
    box_features,
    build_clip,
    build_saclip,
    masked_mean,
    register_model_configs,
    resolve_model_name,
)

register_model_configs()

__all__ = [
    "PARTS",
    "SAClip",
    "SAClipConfig",
    "box_features",
    "build_clip",
    "build_saclip",
    "export_open_clip",
    "load_saclip",
    "masked_mean",
    "register_model_configs",
    "resolve_model_name",
    "save_saclip",
]
