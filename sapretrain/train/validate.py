"""Validation during training: held-out shards every ``eval.every`` steps (docs/training.md).

    validation = build_validation(cfg, accelerator.unwrap_model(model), accelerator)  # None: off
    ...
    if validation is not None and validation.due(step):
        values = validation.run(model, loss_fn)     # {"val/loss": ..., "val/seconds": ...}

The validation set is the first ``eval.batches x eval.batch_pairs`` records of ``eval.shards`` in
their listed order: the training loader (same decoding, preprocessing, bad-record handling) over
that prefix, unshuffled, one pass, every rank reading a contiguous share. Numbers are over the
whole set, whatever the number of processes (a 2-process run gives a 1-process run's numbers):

- the loss terms, named as in training with a ``val/`` prefix, with the whole set as one
  contrastive batch (each rank's features against every rank's, the loss's own gather): with
  ``eval.batches: 1`` and ``eval.batch_pairs`` = ``data.batch_pairs`` that is the training loss's
  definition on held-out data; more batches mean more negatives, so the contrastive terms sit
  higher than the training ones. Float32, whatever ``run.precision`` (the forward is autocast);
- ``val/relation_accuracy``: fraction of samples (anchors and partners) whose image prefers its
  caption over its negative caption (opposite relation), ``cos(v, u) > cos(v, u_neg)``;
- ``val/image_to_text_r1`` / ``val/text_to_image_r1``: retrieval among all samples of the set
  (``v . u``): a row is right when its best column shows the same image (``groups``, so another
  caption of the same photo counts, as in COCO retrieval); a tie with another image is wrong;
- ``val/spatial_probe_accuracy`` (``eval.spatial_probe`` scenes, off by default): the demo's
  relation probe (sapretrain/eval/spatial.py) on held-apart synthetic scenes with gold boxes,
  rendered once at start-up, on rank 0 with the unwrapped model;
- ``val/pairs`` and ``val/seconds`` (wall time of the whole validation, for the trainer to keep
  out of its step rate).

The model runs through its distributed wrapper (DDP, FSDP) under ``torch.no_grad`` in eval mode,
and is put back in the mode it was in; the RNG states are restored afterwards, so a run with
validation trains exactly like one without.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from sapretrain.config import ConfigError
from sapretrain.data.batch import batch_to, build_preprocess
from sapretrain.data.loader import Loader, LoaderConfig, Shard, list_shards
from sapretrain.distributed import gather
from sapretrain.train import checkpoint as ckpt
from sapretrain.train.config import EvalConfig, TrainConfig

PREFIX = "val/"
# Per-sample model features the loss terms and the metrics read; logit_scale (0-dim) comes along.
FEATURES = ("u", "v", "u_neg", "text_embed", "image_embed", "groups")
ROW_CHUNK = 4096  # retrieval rows scored at once: bounds the (rows, samples) similarity block


# ----- the validation set


def held_out_shards(spec: str, records: int) -> list[Shard]:
    """The shards of ``spec`` cut to their first ``records`` records, in listed order."""
    shards, left = [], records
    for shard in list_shards(spec):
        if left == 0:
            break
        take = min(shard.records, left)
        if take:
            shards.append(Shard(shard.url, take))
        left -= take
    return shards


@dataclass
class Validation:
    """One run's validation: the held-out set, how to read it, and when."""

    cfg: EvalConfig
    loader_cfg: LoaderConfig
    shards: list[Shard]
    preprocess: Callable | None
    accelerator: Any
    context_length: int
    last_step: int
    probe: "SpatialProbe | None" = None

    @property
    def pairs(self) -> int:
        return sum(s.records for s in self.shards)

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0 or step == self.last_step

    def loader(self) -> Loader:
        """A fresh loader at the start of the set: the same batches at every validation.

        Built from the cut shard list itself (``build_loader`` lists whole shards, and asks for a
        shard per reader, which a prefix cut inside one shard need not have: here readers may
        share a shard, each reading its own records of it)."""
        a = self.accelerator
        return Loader(self.loader_cfg, self.preprocess, a.process_index, a.num_processes, self.shards,
                      self.context_length)

    def run(self, model, loss_fn) -> dict[str, float]:
        return validate(model, loss_fn, self.accelerator, self.loader(), self.probe)


def build_validation(cfg: TrainConfig, model, accelerator, log_line: Callable = print) -> Validation | None:
    """The validation of ``cfg.eval`` for ``model`` (the unwrapped SAClip), checked now, before
    training: None when ``eval.every`` is 0."""
    ev = cfg.eval
    if not ev.every:
        return None
    pairs = ev.batch_pairs or cfg.data.batch_pairs
    world = accelerator.num_processes
    if pairs % world:
        raise ConfigError(f"eval.batch_pairs={pairs} must be a multiple of the world size {world} (each rank "
                          f"validates pairs / world size of every batch): use e.g. "
                          f"eval.batch_pairs={max(1, round(pairs / world)) * world}")
    spec = ev.features or ev.shards
    shards = held_out_shards(spec, ev.batches * pairs)
    found = sum(s.records for s in shards)
    batches = found // pairs
    if batches == 0:
        raise ConfigError(f"eval.shards: {spec} holds {found} records, fewer than one validation batch of "
                          f"eval.batch_pairs={pairs}")
    if batches < ev.batches:
        log_line(f"eval: {spec} holds {found} records: validating on {batches} of eval.batches={ev.batches} batches")
    shards = held_out_shards(spec, batches * pairs)
    if ev.features:
        from sapretrain.features import FeatureMismatch, check_features

        try:
            check_features(ev.features, model, cfg.data.image_size)
        except (FeatureMismatch, FileNotFoundError) as e:
            raise SystemExit(f"eval.features: {e}") from None
        preprocess = None
    else:
        preprocess = build_preprocess(model)
    # Unshuffled, one reader stream per worker: every rank reads a contiguous part of the prefix
    # (a shard may be split between readers), so the set is the same for any world size. No worker
    # without a batch to make. One epoch per validation, each a new Loader: no persistent workers
    # (they would decode batches of a next epoch nobody reads).
    loader_cfg = replace(cfg.data, shards=ev.shards or spec, features=ev.features, batch_pairs=pairs,
                         workers=min(ev.workers, batches), shuffle_shards=False, shuffle_buffer=0, resampled=False,
                         persistent_workers=False)
    probe = SpatialProbe(ev.spatial_probe) if ev.spatial_probe else None
    log_line(f"eval: every {ev.every} steps on {batches * pairs} held-out pairs ({batches} x {pairs}) of {spec}"
             + (f", spatial probe on {ev.spatial_probe} scenes (gold boxes)" if probe else ""))
    return Validation(ev, loader_cfg, shards, preprocess, accelerator, model.clip.context_length,
                      cfg.optim.steps, probe)


# ----- one validation


@torch.no_grad()
def validate(model, loss_fn, accelerator, batches: Iterable[dict], probe: "SpatialProbe | None" = None
             ) -> dict[str, float]:
    """The ``val/`` numbers of the module docstring over ``batches`` (this rank's share of the set).

    ``model`` may be wrapped (DDP, FSDP, compiled); it is called exactly as in training, so every
    rank must run this together with the same number of batches (the loader guarantees it).
    """
    start = time.perf_counter()
    was_training = model.training
    rng = ckpt.rng_state()
    model.eval()
    try:
        features = encode(model, accelerator, batches)
        terms = {k: v.float() for k, v in loss_fn(features).items()}
        values = {f"{PREFIX}{k}": accelerator.reduce(v, "mean").item() for k, v in terms.items()}
        values[f"{PREFIX}loss"] = sum(values.values())
        counts = torch.stack([
            relation_correct(features["v"], features["u"], features["u_neg"]).sum(),
            *retrieval_correct(features["v"], features["u"], features["groups"]),
            torch.tensor(features["v"].shape[0], device=features["v"].device),
        ]).double()
        correct_relation, correct_i2t, correct_t2i, samples = accelerator.reduce(counts, "sum").tolist()
        values.update({
            f"{PREFIX}relation_accuracy": correct_relation / samples,
            f"{PREFIX}image_to_text_r1": correct_i2t / samples,
            f"{PREFIX}text_to_image_r1": correct_t2i / samples,
            f"{PREFIX}pairs": int(samples) // 2,
        })
        if probe is not None and accelerator.is_main_process:
            values[f"{PREFIX}spatial_probe_accuracy"] = probe(accelerator.unwrap_model(model))
    finally:
        model.train(was_training)
        ckpt.set_rng_state(rng)
    values[f"{PREFIX}seconds"] = time.perf_counter() - start
    return values


def encode(model, accelerator, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """This rank's features of all its batches, float32, in one [anchors; partners] layout (2m, ·)."""
    anchors: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
    partners: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
    logit_scale = None
    for batch in batches:
        with accelerator.autocast():
            out = model(batch_to(batch, accelerator.device))
        n = out["u"].shape[0] // 2
        for key in FEATURES:
            x = out[key].float() if out[key].is_floating_point() else out[key]
            anchors[key].append(x[:n])
            partners[key].append(x[n:])
        logit_scale = out["logit_scale"].float()
    if logit_scale is None:
        raise ValueError("the validation set gave no batch on this rank")
    features = {k: torch.cat(anchors[k] + partners[k]) for k in FEATURES}
    features["logit_scale"] = logit_scale
    return features


def relation_correct(v: torch.Tensor, u: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """(S,) bool: the image prefers its caption over the negative one (a tie is wrong)."""
    v, u, u_neg = (F.normalize(x.float(), dim=-1) for x in (v, u, u_neg))
    return (v * u).sum(-1) > (v * u_neg).sum(-1)


def retrieval_correct(v: torch.Tensor, u: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct image->text and text->image R@1 among this rank's rows (counts, 0-dim), against
    every rank's samples as columns (gathered): a row is right when its best same-image column
    scores strictly above every other image's."""
    v, u = F.normalize(v.float(), dim=-1), F.normalize(u.float(), dim=-1)
    all_v, all_u, all_groups = gather(v), gather(u), gather(groups)  # (S, D), (S, D), (S,)
    i2t = _r1_correct(v, all_u, groups, all_groups)
    t2i = _r1_correct(u, all_v, groups, all_groups)
    return i2t, t2i


def _r1_correct(rows: torch.Tensor, columns: torch.Tensor, row_groups: torch.Tensor,
                column_groups: torch.Tensor) -> torch.Tensor:
    correct = torch.zeros((), dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], ROW_CHUNK):
        sims = rows[start:start + ROW_CHUNK] @ columns.T  # (r, S)
        same = row_groups[start:start + ROW_CHUNK, None] == column_groups[None, :]  # (r, S)
        best_same = sims.masked_fill(~same, float("-inf")).amax(dim=1)
        best_other = sims.masked_fill(same, float("-inf")).amax(dim=1)
        correct += (best_same > best_other).sum()
    return correct


# ----- the spatial probe


class SpatialProbe:
    """The demo's relation probe (sapretrain/eval/spatial.py) with gold boxes: ``scenes``
    held-apart synthetic scenes, rendered once; calling it gives the model's relation accuracy.

    It runs the plain (unwrapped) model on one rank: fine under DDP, not under FSDP (sharded
    parameters). It only means something for models trained on the synthetic scenes.
    """

    def __init__(self, scenes: int):
        from sapretrain.eval import spatial

        self.spatial = spatial
        self.set = spatial.probe_set(scenes, progress=False)
        self.boxes = {"gold": [dict(s.boxes) for s in self.set.samples]}

    def __call__(self, model) -> float:
        from sapretrain.eval.encode import Encoder

        margins = self.spatial.model_margins(Encoder(model), self.set, self.boxes)["gold"]
        return self.spatial.accuracy(margins)


# ----- the console line


def describe(step: int, steps: int, values: dict[str, float]) -> str:
    """One console line for a validation."""
    terms = " ".join(f"{k.removeprefix(PREFIX).removesuffix('_loss')} {v:.4f}" for k, v in values.items()
                     if k.endswith("_loss"))
    probe = values.get(f"{PREFIX}spatial_probe_accuracy")
    return (f"validation at step {step}/{steps}  loss {values[f'{PREFIX}loss']:.4f} ({terms})  "
            f"relation acc {values[f'{PREFIX}relation_accuracy']:.3f}  "
            f"R@1 image->text {values[f'{PREFIX}image_to_text_r1']:.3f} text->image {values[f'{PREFIX}text_to_image_r1']:.3f}"
            + (f"  spatial probe {probe:.3f}" if probe is not None else "")
            + f"  ({values[f'{PREFIX}pairs']} pairs, {values[f'{PREFIX}seconds']:.1f} s)")
