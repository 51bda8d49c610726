"""Files that ship inside the package: the configs (training, shards, curation lexicons and
prompts, the DoTA description hierarchy) under ``sapretrain/configs``.

A checkout has ``configs/`` at its root as a link to the same folder, so ``configs/paper.yaml``
works there; from any other directory (an installed wheel, a Docker image) a config path that does
not exist is looked up in the package by the part after ``configs/``::

    resolve_config("configs/paper.yaml")   # ./configs/paper.yaml if present, else the shipped one
    config_path("curation/negatives.yaml") # the shipped file
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePosixPath

PREFIX = "configs/"


def config_dir() -> Path:
    """The shipped configs folder (a real directory: the package is installed unzipped)."""
    return Path(str(resources.files("sapretrain") / "configs"))


def config_path(relative: str) -> Path:
    """A shipped config by its path under ``configs/``, e.g. ``curation/rois.yaml``."""
    path = config_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative}: no such config in the package ({config_dir()})")
    return path


def resolve_config(path: str | Path) -> str:
    """``path`` itself when it exists or is a URL; else the shipped config it names (``configs/X``
    or ``X`` relative to the configs folder); else ``path`` unchanged, for the caller's error."""
    text = str(path)
    if "://" in text or Path(text).is_absolute() or Path(text).exists():
        return text
    relative = PurePosixPath(Path(text).as_posix())
    parts = relative.parts
    if parts and parts[0] == PREFIX.rstrip("/"):
        relative = PurePosixPath(*parts[1:]) if len(parts) > 1 else PurePosixPath(".")
    shipped = config_dir() / str(relative)
    return str(shipped) if shipped.is_file() else text


def model_config_dir() -> Path:
    """The open_clip model JSONs shipped with the package (``sa-tiny``)."""
    return Path(str(resources.files("sapretrain") / "model" / "configs"))


def register_model_configs() -> None:
    """Make the shipped model JSONs known to open_clip (``create_model``, ``get_tokenizer``), once.

    Called where a model name is resolved (the model builder, the shard tokenizer), never at
    import time."""
    import open_clip

    if open_clip.get_model_config("sa-tiny") is None:
        open_clip.add_model_config(model_config_dir())
