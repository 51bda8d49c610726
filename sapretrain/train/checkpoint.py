"""Training checkpoints: atomic, keep-last-k, local or fsspec storage, ``weights_only`` loading.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00001000/`` holding
``state.pt`` (trainable weights, loss parameters, optimizer, scheduler, grad scaler, step, data
position, config), ``rank-<rank>.pt`` (each rank's RNG states and exact loader position) and,
written last, ``DONE``. Only a
directory with ``DONE`` counts, so a run killed while saving resumes from the previous one. The
model's weights in ``state.pt`` are written and read by ``sapretrain.model.checkpoint``
(``training_weights``; ``load_saclip`` rebuilds the model of a ``state.pt``).

A **sharded** checkpoint (FSDP runs, ``"format": "dcp"`` in ``state.pt``) keeps the same layout,
but ``state.pt`` holds no weights and no optimizer state: those are in ``dcp/``, a
``torch.distributed.checkpoint`` directory (one ``__<rank>_0.distcp`` file per rank, written by
that rank from its own shards, and a ``.metadata`` index), with the keys ``model.<name>`` (the
state dict ``training_weights`` would store), ``loss.<name>`` and ``optimizer.*`` (flat, per
parameter name: ``optimizer.state.model.<name>.exp_avg``, not per group index). Loading reshards
to any world size, with or without FSDP. ``load_saclip`` (and so every evaluator) reads a sharded
checkpoint's model directly; ``consolidate`` turns one into a single plain ``state.pt``-format
file (weights, loss, config; no optimizer) to copy or export.

``prune`` keeps the newest ``run.keep_checkpoints`` complete ones (0: all; the newest is never
deleted) and removes directories without ``DONE`` that are older than the newest complete one
(left by a save or a prune that was interrupted); a newer one without ``DONE`` may be a save in
progress and is left alone.
"""
from __future__ import annotations

import io
import random
import re
import warnings
from typing import Any

import numpy as np
import torch

from sapretrain import storage
from sapretrain.model import checkpoint as model_ckpt

STEP_DIR = re.compile(r"step-(\d{8})$")
# state.pt's "format" for a sharded checkpoint (absent: a full state.pt), and its DCP directory
SHARDED_FORMAT, SHARDED_DIR = model_ckpt.SHARDED_FORMAT, model_ckpt.SHARDED_DIR


def checkpoint_dir(output_dir: str, step: int) -> str:
    return f"{output_dir.rstrip('/')}/checkpoints/step-{step:08d}"


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, dir)`` of every complete checkpoint, oldest first."""
    return [(step, url) for step, url, done in _step_dirs(output_dir) if done]


def _step_dirs(output_dir: str) -> list[tuple[int, str, bool]]:
    """``(step, dir, has DONE)`` of every ``step-*`` directory, oldest first."""
    fs, path = storage.url_to_fs(f"{output_dir.rstrip('/')}/checkpoints")
    if not storage.retry_transient(lambda: fs.exists(path), path):
        return []
    found = []
    for entry in storage.retry_transient(lambda: fs.ls(path, detail=False), path):
        match = STEP_DIR.search(entry.rstrip("/"))
        if match:
            done = storage.retry_transient(lambda: fs.exists(f"{entry.rstrip('/')}/DONE"), entry)
            found.append((int(match.group(1)), checkpoint_dir(output_dir, int(match.group(1))), done))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(url: str) -> str:
    """A complete checkpoint directory: ``url`` itself, or the latest complete one of the run ``url``."""
    fs, path = storage.url_to_fs(url)
    if fs.exists(f"{path.rstrip('/')}/state.pt"):
        if not fs.exists(f"{path.rstrip('/')}/DONE"):
            raise ValueError(f"{url}: incomplete checkpoint (no DONE marker; the run was killed while saving)")
        return url.rstrip("/")
    found = latest_checkpoint(url)
    if found is None:
        raise FileNotFoundError(f"{url}: neither a checkpoint (state.pt) nor a run with complete checkpoints")
    return found


def save_tensor_file(obj: Any, url: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(url, buf.getvalue())


def load_tensor_file(url: str) -> Any:
    # weights_only: a checkpoint can hold tensors and plain containers, never code.
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune(output_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0``: keep all; the
    newest is always kept), and the incomplete directories older than the newest complete one.
    Returns the directories removed."""
    dirs = _step_dirs(output_dir)
    complete = [(step, url) for step, url, done in dirs if done]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = complete[: max(0, len(complete) - keep)] if keep > 0 else []
    doomed += [(step, url) for step, url, done in dirs if not done and step < newest]
    for _, url in sorted(doomed):
        fs, path = storage.url_to_fs(url)
        # DONE first: a half-deleted checkpoint must not look complete.
        if storage.retry_transient(lambda: fs.exists(f"{path}/DONE"), url):
            fs.rm(f"{path}/DONE")
        fs.rm(path, recursive=True)
    return [url for _, url in sorted(doomed)]


# ----- sharded checkpoints (torch.distributed.checkpoint)


def _dcp_writer(url: str):
    from torch.distributed.checkpoint import FileSystemWriter

    if not storage.is_url(url):
        return FileSystemWriter(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, sync_files=False)  # object stores have no fsync: an object exists once closed


def _alone() -> bool:
    """No process group: one process reads or writes the whole checkpoint."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save_sharded(state: dict[str, Any], url: str) -> None:
    """Every rank writes its own shards of ``state`` (DTensors: the local shard; plain tensors that
    are the same on every rank: once) into the directory ``url``; a collective over all ranks."""
    import torch.distributed.checkpoint as dcp

    alone = _alone()
    with warnings.catch_warnings():
        if alone:  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, storage_writer=_dcp_writer(url), no_dist=alone)


def load_sharded(state: dict[str, Any], url: str) -> None:
    """Fill ``state`` in place from the directory ``url``, each tensor with its own sharding (any
    world size); a collective over all ranks, or one process without a process group."""
    import torch.distributed.checkpoint as dcp

    alone = _alone()
    try:
        with warnings.catch_warnings():
            if alone:  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=model_ckpt.dcp_reader(url), no_dist=alone)
    except Exception as e:  # DCP wraps every rank's error in a CheckpointException
        raise SystemExit(f"{url}: cannot load the sharded checkpoint into this run's model and optimizer (another "
                         f"model config, or unreadable: {type(e).__name__}: {str(e)[:500]})") from None


def is_sharded(state: dict[str, Any]) -> bool:
    """A ``state.pt`` whose weights and optimizer are in ``dcp/``."""
    return state.get("format") == SHARDED_FORMAT


def consolidate(checkpoint: str, output: str | None = None) -> str:
    """A sharded checkpoint as one full ``state.pt`` file (weights, loss parameters, config,
    position; no optimizer state), readable by ``load_saclip`` and ``tools/evaluate.py``. One
    process, no GPU; ``output`` defaults to ``<checkpoint>/model.pt``. Returns its path.

        python -c "from sapretrain.train.checkpoint import consolidate; print(consolidate('runs/x/checkpoints/step-00030000'))"
    """
    url = checkpoint.rstrip("/")
    state = load_tensor_file(f"{url}/state.pt")
    if not is_sharded(state):
        raise ValueError(f"{url}: not a sharded checkpoint (its state.pt holds the weights already)")
    if not storage.exists(f"{url}/DONE"):
        raise ValueError(f"{url}: incomplete checkpoint (no DONE marker; the run was killed while saving)")
    tensors = model_ckpt.read_dcp(f"{url}/{SHARDED_DIR}")  # {"model": {...}, "loss": {...}, "optimizer": {...}}
    full = {k: v for k, v in state.items() if k not in ("format", "scheduler", "scaler")}
    full["model"], full["loss"] = tensors["model"], tensors.get("loss", {})
    output = output or f"{url}/model.pt"
    save_tensor_file(full, output)
    return output
