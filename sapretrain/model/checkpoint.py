"""SA-CLIP weights: the one place that saves and loads them (model files, trainer checkpoints,
exported Hub folders), and the export of the CLIP part for plain open_clip.

Three containers, one set of rules (``frozen_keys``, ``weights_to_save``, ``load_weights``):

- a **model file** (``save_saclip``): one ``torch.save``d dict of plain containers and tensors,
  loaded with ``torch.load(weights_only=True)``::

      {"format": "sapretrain.saclip", "version": 1,
       "config": {...SAClipConfig fields...},
       "model_cfg": {...open_clip JSON config of the CLIP...},   # rebuilds models named by a JSON path
       "includes_frozen": bool, "excluded": [state_dict keys left out],
       "state_dict": {...}}

- a **trainer checkpoint** ``state.pt`` (sapretrain/train/checkpoint.py) carries the same weights
  as ``training_weights`` writes them: ``model`` (the state dict without the excluded keys),
  ``model_excluded``, ``model_cfg``, next to the run's ``config`` (``config.model``,
  ``config.run.seed``) and the optimizer state; a *sharded* one (FSDP runs, ``"format": "dcp"``)
  has the same entries but ``model``, which is the ``model`` part of the torch.distributed.checkpoint
  directory ``dcp/`` beside it (``read_dcp``);
- a **Hub folder** (``save_pretrained``): ``model.safetensors`` (every tensor) and ``config.json``
  (``format``, ``version``, ``config``, ``model_cfg``, ``preprocess_cfg``, ``tokenizer`` and
  whatever the exporter adds).

Frozen weights (``frozen_keys``: parameters training never changes, and a frozen tower's
buffers) may be left out: a model file leaves them out only when ``pretrained`` can rebuild them
(ViT-B-32 LiT: 88M of the 151M parameters); a trainer checkpoint also leaves out a random-init
frozen tower, since the run's seed rebuilds it exactly (``torch.manual_seed(run.seed)`` before
``build_saclip``, as the trainer builds its model). A Hub folder always holds everything.

``load_saclip(path)`` reads any of the three. Paths are local or fsspec URLs; files are written
whole (readers never see half a checkpoint).
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch

from sapretrain import storage
from sapretrain.model.saclip import SAClip, SAClipConfig, build_saclip, resolve_model_name

FORMAT = "sapretrain.saclip"
SHARDED_FORMAT = "dcp"  # a trainer state.pt whose weights are in the DCP directory SHARDED_DIR beside it
SHARDED_DIR = "dcp"
VERSION = 1
CONFIG_FILE = "config.json"  # Hub folder
WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # open_clip's own local-dir / hf-hub layout
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A file that is not an SA-CLIP checkpoint, or whose weights do not fit its own model."""


# ----- which keys are stored


def frozen_keys(model: SAClip) -> list[str]:
    """State-dict keys that training never changes: frozen parameters, and the buffers of a frozen tower."""
    keys = {n for n, p in model.named_parameters() if not p.requires_grad}
    if model.vision_frozen:
        keys |= {f"clip.visual.{n}" for n, _ in model.clip.visual.named_buffers()}
    return sorted(k for k in model.state_dict() if k in keys)


def weights_to_save(model: SAClip, keep_frozen: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict to store (on the CPU) and the keys left out (``frozen_keys`` unless ``keep_frozen``)."""
    excluded = [] if keep_frozen else frozen_keys(model)
    skip = set(excluded)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in skip}, excluded


def load_weights(model: SAClip, state_dict: Mapping[str, torch.Tensor], excluded, source: str) -> None:
    """Load ``state_dict`` into ``model``; every key of the model must be there or in ``excluded``."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = sorted(set(missing) - set(excluded))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


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


def rebuild(config: Mapping[str, Any], model_cfg: dict | None, complete: bool, seed: int | None = None) -> SAClip:
    """The architecture of a stored model. Unless the checkpoint is ``complete``, the weights it
    left out are rebuilt: from ``pretrained``, else (random init) from ``seed``; the caller's RNG
    state is left as it was."""
    cfg = _registered_config(SAClipConfig.from_dict(config), model_cfg)
    if complete:
        return build_saclip(cfg, load_pretrained=False)
    if cfg.pretrained:
        return build_saclip(cfg, load_pretrained=True)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        else:
            log.warning("random-init frozen weights were not stored and no seed is known: they are re-drawn")
        return build_saclip(cfg, load_pretrained=False)


# ----- model files and trainer checkpoints


def save_saclip(model: SAClip, path: str, include_frozen: bool = False) -> None:
    keep = include_frozen or not model.cfg.pretrained  # a random-init model file has no seed to rebuild from
    if keep and not include_frozen and frozen_keys(model):
        log.info("storing the frozen vision weights: pretrained is None, so loading could not rebuild them")
    state, excluded = weights_to_save(model, keep_frozen=keep)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(model.cfg),
        "model_cfg": model.model_cfg,
        "includes_frozen": not excluded,
        "excluded": excluded,
        "state_dict": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes_atomic(str(path), buf.getvalue())


def training_weights(model: SAClip, include_frozen: bool) -> dict[str, Any]:
    """The model entries of a trainer ``state.pt`` (frozen keys left out unless ``include_frozen``:
    the run's config and seed rebuild them)."""
    state, excluded = weights_to_save(model, keep_frozen=include_frozen)
    return {"model": state, "model_excluded": excluded, "model_cfg": model.model_cfg}


def load_training_weights(model: SAClip, state: Mapping[str, Any], source: str) -> None:
    """Load a trainer ``state.pt``'s weights into the model the trainer built for them (resume)."""
    load_weights(model, state["model"], _excluded_of(model, state), source)


def _excluded_of(model: SAClip, state: Mapping[str, Any]) -> list[str]:
    if "model_excluded" in state:
        return list(state["model_excluded"])
    # Checkpoints written before model_excluded: frozen vision parameters and any buffer.
    return sorted(set(frozen_keys(model)) | {n for n, _ in model.named_buffers()})


def load_saclip(path: str, map_location="cpu") -> SAClip:
    """Rebuild the model of a model file, a trainer ``state.pt`` or a Hub folder; in eval mode."""
    path = str(path)
    fs, local = storage.url_to_fs(path)
    if fs.isdir(local):
        if not fs.exists(f"{local.rstrip('/')}/{CONFIG_FILE}"):
            raise CheckpointError(f"{path}: a directory without {CONFIG_FILE}, not an exported SA-CLIP folder")
        model = load_pretrained(path)
    else:
        model = _load_file(path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _load_file(path: str) -> SAClip:
    try:
        payload = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, struct.error, EOFError... for junk
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if payload.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {payload.get('version')}, this code reads {VERSION}")
        model = rebuild(payload["config"], payload.get("model_cfg"), complete=not payload["excluded"])
        load_weights(model, payload["state_dict"], payload["excluded"], path)
        return model
    if isinstance(payload, dict) and payload.get("format") == SHARDED_FORMAT and "model" not in payload:
        payload = {**payload, "model": read_dcp(f"{storage.parent(path)}/{SHARDED_DIR}")["model"]}
    if isinstance(payload, dict) and "model" in payload and isinstance(payload.get("config"), dict) \
            and "model" in payload["config"]:  # a trainer state.pt
        config = payload["config"]
        seed = (config.get("run") or {}).get("seed")
        model = rebuild(config["model"], payload.get("model_cfg"), complete=payload.get("model_excluded") == [],
                        seed=seed)
        load_weights(model, payload["model"], _excluded_of(model, payload), path)
        return model
    raise CheckpointError(f"{path}: not an SA-CLIP checkpoint (format {FORMAT!r} or a trainer state.pt)")


def dcp_reader(url: str):
    """A torch.distributed.checkpoint reader of the directory ``url`` (local, or any fsspec URL)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not storage.is_url(url):
        return FileSystemReader(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url)


def read_dcp(url: str) -> dict[str, Any]:
    """Every tensor of the torch.distributed.checkpoint directory ``url``, whole, in this process
    (no process group; any number of ranks wrote it), as the nested dict that was saved."""
    # What torch's own dcp_to_torch_save does (which reads local directories only): the planner
    # takes the keys from the metadata; the public dcp.load fills only keys it is given.
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=dcp_reader(url), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no sharded checkpoint there (its .metadata is missing)") from None
    return state


# ----- Hub folders (safetensors + config.json)


def _safetensors_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share memory (views, tied weights)
    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, metadata={"format": "pt"})


def save_pretrained(model: SAClip, folder: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.safetensors`` (every tensor) and ``config.json`` into ``folder``; returns the config.

    ``extra`` keys are added to config.json (the exporter's tokenizer, image inputs, provenance)."""
    folder = str(folder).rstrip("/")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "library_name": "sapretrain",
        "config": asdict(model.cfg),
        "model_cfg": model.model_cfg,
        "preprocess_cfg": _preprocess_cfg(model),
        "embed_dim": model.embed_dim,
        **dict(extra or {}),
    }
    storage.write_bytes_atomic(f"{folder}/{WEIGHTS_FILE}", _safetensors_bytes(model.state_dict()))
    storage.write_bytes_atomic(f"{folder}/{CONFIG_FILE}", json.dumps(config, indent=1).encode())
    return config


def read_pretrained_config(folder: str) -> dict[str, Any]:
    url = f"{str(folder).rstrip('/')}/{CONFIG_FILE}"
    try:
        config = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not an exported SA-CLIP folder)") from None
    except ValueError as e:
        raise CheckpointError(f"{url}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{url}: not an SA-CLIP config (format {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{url}: version {config.get('version')}, this code reads {VERSION}")
    return config


def load_pretrained(folder: str) -> SAClip:
    """The model of a ``save_pretrained`` folder (no pretrained weights needed: all are stored)."""
    from safetensors.torch import load

    config = read_pretrained_config(folder)
    model = rebuild(config["config"], config.get("model_cfg"), complete=True)
    if config.get("preprocess_cfg"):
        open_clip.set_model_preprocess_cfg(model.clip, _preprocess_from_json(config["preprocess_cfg"]))
    url = f"{str(folder).rstrip('/')}/{WEIGHTS_FILE}"
    try:
        state = load(storage.read_bytes(url))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}") from None
    load_weights(model, state, [], url)
    return model.eval()


def _preprocess_cfg(model: SAClip) -> dict[str, Any]:
    return json.loads(json.dumps(open_clip.get_model_preprocess_cfg(model.clip)))  # tuples -> lists


def _preprocess_from_json(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# ----- the CLIP part for plain open_clip


def export_open_clip(model: SAClip, path: str) -> str:
    """Write the CLIP part as a plain state_dict; returns the model name to load it with.

        name = export_open_clip(model, "clip.pt")
        clip = open_clip.create_model(name, pretrained="clip.pt")

    The name is the config's (``sa-tiny`` needs ``sapretrain.model.register_model_configs()``; a
    JSON path's stem needs ``open_clip.add_model_config(path)``), with ``-quickgelu`` when QuickGELU
    was forced by the pretrained tag (``ViT-B-32`` + ``openai`` exports as ``ViT-B-32-quickgelu``).
    ``export_open_clip_dir`` needs neither.
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


def export_open_clip_dir(model: SAClip, folder: str) -> str:
    """Write the CLIP part in open_clip's own folder layout (``open_clip_config.json`` with the
    model and preprocess configs, ``open_clip_model.safetensors``); returns the name that loads it:

        clip, _, preprocess = open_clip.create_model_and_transforms(export_open_clip_dir(model, "out/open_clip"))

    (``local-dir:out/open_clip``; pushed to the Hub, the same files load as ``hf-hub:USER/REPO``).
    The config carries the exact architecture (QuickGELU included), so no name needs registering.
    """
    folder = str(folder).rstrip("/")
    if not model.model_cfg:
        raise ValueError("export_open_clip_dir needs the model's open_clip config (build it with build_saclip)")
    config = {"model_cfg": model.model_cfg, "preprocess_cfg": _preprocess_cfg(model)}
    storage.write_bytes_atomic(f"{folder}/{OPEN_CLIP_WEIGHTS_FILE}", _safetensors_bytes(model.clip.state_dict()))
    storage.write_bytes_atomic(f"{folder}/{OPEN_CLIP_CONFIG_FILE}", json.dumps(config, indent=1).encode())
    return f"local-dir:{folder}"
