"""SA-CLIP model checkpoints, and export of the CLIP part for plain open_clip.

A model checkpoint is one ``torch.save``d dict of plain containers and tensors, so it loads with
``torch.load(weights_only=True)``:

    {"format": "sapretrain.saclip", "version": 1,
     "config": {...SAClipConfig fields...},
     "model_cfg": {...open_clip JSON config of the CLIP...},   # rebuilds models named by a JSON path
     "includes_frozen": bool, "excluded": [state_dict keys left out],
     "state_dict": {...}}

Frozen vision weights (LiT) are left out by default: they are ``pretrained``'s weights unchanged,
and loading rebuilds them from ``pretrained`` (ViT-B-32: 88M of the 151M parameters). A model
without ``pretrained`` (random init) always stores them, since nothing could rebuild them.

Paths are local or fsspec URLs; files are written whole (readers never see half a checkpoint).
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import torch

from sapretrain import storage
from sapretrain.model.saclip import SAClip, SAClipConfig, build_saclip, resolve_model_name

FORMAT = "sapretrain.saclip"
VERSION = 1

log = logging.getLogger(__name__)


def frozen_keys(model: SAClip) -> list[str]:
    """State-dict keys that training never changes: frozen parameters, and the buffers of a frozen tower."""
    keys = {n for n, p in model.named_parameters() if not p.requires_grad}
    if model.vision_frozen:
        keys |= {f"clip.visual.{n}" for n, _ in model.clip.visual.named_buffers()}
    return sorted(k for k in model.state_dict() if k in keys)


def save_saclip(model: SAClip, path: str, include_frozen: bool = False) -> None:
    state = model.state_dict()
    excluded = [] if include_frozen or not model.cfg.pretrained else frozen_keys(model)
    if not include_frozen and not model.cfg.pretrained and frozen_keys(model):
        log.info("storing the frozen vision weights: pretrained is None, so loading could not rebuild them")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(model.cfg),
        "model_cfg": model.model_cfg,
        "includes_frozen": not excluded,
        "excluded": excluded,
        "state_dict": {k: v.detach().cpu() for k, v in state.items() if k not in set(excluded)},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes_atomic(str(path), buf.getvalue())


def _registered_config(cfg: SAClipConfig, model_cfg: dict | None) -> SAClipConfig:
    """``cfg`` with a model name open_clip knows; a JSON config missing here is rebuilt from ``model_cfg``."""
    try:
        resolve_model_name(cfg.name)
        return cfg
    except (FileNotFoundError, ValueError):
        if not model_cfg:
            raise
    stem = Path(cfg.name).stem if cfg.name.endswith(".json") else cfg.name
    with tempfile.TemporaryDirectory() as tmp:  # open_clip keeps the parsed config after the file is gone
        config_file = Path(tmp) / f"{stem}.json"
        config_file.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(config_file)
    return replace(cfg, name=stem)


def load_saclip(path: str, map_location="cpu") -> SAClip:
    """Rebuild the model of a ``save_saclip`` file; returned in eval mode."""
    payload = torch.load(io.BytesIO(storage.read_bytes(str(path))), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an SA-CLIP checkpoint (format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')}, this code reads {VERSION}")
    cfg = _registered_config(SAClipConfig.from_dict(payload["config"]), payload.get("model_cfg"))
    model = build_saclip(cfg, load_pretrained=not payload["includes_frozen"])
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    missing = sorted(set(missing) - set(payload["excluded"]))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def export_open_clip(model: SAClip, path: str) -> str:
    """Write the CLIP part as a plain state_dict; returns the model name to load it with.

        name = export_open_clip(model, "clip.pt")
        clip = open_clip.create_model(name, pretrained="clip.pt")

    The name is the config's (``sa-tiny`` needs ``import sapretrain.model``; a JSON path's stem
    needs ``open_clip.add_model_config(path)``), with ``-quickgelu`` when QuickGELU was forced by
    the pretrained tag (``ViT-B-32`` + ``openai`` exports as ``ViT-B-32-quickgelu``).
    """
    state = {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(str(path), buf.getvalue())

    name = resolve_model_name(model.cfg.name)
    base_cfg = open_clip.get_model_config(name) or {}
    if (model.model_cfg or {}).get("quick_gelu") and not base_cfg.get("quick_gelu"):
        quick = f"{name}-quickgelu"
        if open_clip.get_model_config(quick) is None:
            log.warning("%s was built with QuickGELU: load the export with force_quick_gelu=True", name)
            return name
        return quick
    return name
