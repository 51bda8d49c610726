"""SA-CLIP model: open_clip CLIP + SVO text head + ROI/box vision head (DESIGN.md §1, docs in saclip.py).

    from sapretrain.data.batch import build_preprocess, collate_records
    from sapretrain.model import SAClipConfig, build_saclip
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False))
    out = model(collate_records(records, build_preprocess(model)))   # u, v, u_neg, ...

Importing this package changes nothing outside it. The model configs shipped in ``configs/``
(``sa-tiny``) are registered with open_clip when a model is built or a name resolved
(``register_model_configs``, once); call it yourself before ``open_clip.create_model("sa-tiny")``.
Weights are saved and loaded through ``sapretrain.model.checkpoint`` only.
"""
from sapretrain.model.checkpoint import (
    export_open_clip,
    export_open_clip_dir,
    load_pretrained,
    load_saclip,
    save_pretrained,
    save_saclip,
)
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

__all__ = [
    "PARTS",
    "SAClip",
    "SAClipConfig",
    "box_features",
    "build_clip",
    "build_saclip",
    "export_open_clip",
    "export_open_clip_dir",
    "load_pretrained",
    "load_saclip",
    "masked_mean",
    "register_model_configs",
    "resolve_model_name",
    "save_pretrained",
    "save_saclip",
]
