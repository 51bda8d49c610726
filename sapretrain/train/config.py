"""The training config: one typed tree per experiment, loaded from configs/*.yaml.

    accelerate launch launch/pretrain.py --config configs/paper.yaml optim.lr=3e-4 data.batch_pairs=256

Sections: ``model`` (SAClipConfig), ``data`` (LoaderConfig), ``loss`` (LossConfig), ``optim``,
``run`` and ``eval`` (validation on held-out shards during training, docs/training.md) below.
Unknown keys are errors, and so are values out of range (each dataclass's ``__post_init__``: the
error names the key and the value, before any set-up); the resolved tree is
saved in the run directory and in every checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sapretrain.config import require
from sapretrain.data.loader import LoaderConfig
from sapretrain.losses import LossConfig
from sapretrain.model.saclip import SAClipConfig


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 500  # linear warmup, then cosine decay to 0 at `steps`
    steps: int = 30_000  # optimizer steps
    grad_clip: float | None = 1.0  # max global grad norm (> 0); null or 0 disables clipping
    accum_freq: int = 1  # micro-batches per step; the contrastive batch stays global (feature cache)

    def __post_init__(self):
        require(_finite(self.lr) and self.lr > 0, "optim.lr", self.lr, "must be a finite number > 0")
        require(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
                "must be a finite number >= 0")
        require(len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "optim.betas",
                list(self.betas), "must be two numbers in [0, 1)")
        require(_finite(self.eps) and self.eps > 0, "optim.eps", self.eps, "must be a finite number > 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.steps > 0, "optim.steps", self.steps, "must be > 0 (optimizer steps to train)")
        # A negative max-norm would flip every gradient's sign in clip_grad_norm_: training diverges silently.
        require(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip >= 0), "optim.grad_clip",
                self.grad_clip, "must be > 0 (max gradient norm), or null / 0 for no clipping")
        require(self.accum_freq >= 1, "optim.accum_freq", self.accum_freq, "must be >= 1 (micro-batches per step)")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # local path or fsspec URL for checkpoints; logs go to a local mirror
    seed: int = 0
    precision: str = "bf16"  # no | fp16 | bf16 (autocast; the optimizer keeps fp32 weights)
    log_every: int = 10  # steps between console/tracker logs
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest kept, older ones deleted (the last is never deleted); 0: keep all
    save_frozen: bool = False  # also store the locked vision tower (else rebuilt from model.pretrained)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb; [] for none
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # activation checkpointing in the open_clip towers

    def __post_init__(self):
        require(bool(str(self.output_dir).strip()), "run.output_dir", self.output_dir, "must not be empty")
        require(self.precision in PRECISIONS, "run.precision", self.precision, f"must be one of {list(PRECISIONS)}")
        require(self.log_every > 0, "run.log_every", self.log_every, "must be > 0 (steps between logs)")
        require(self.checkpoint_every > 0, "run.checkpoint_every", self.checkpoint_every,
                "must be > 0 (steps between checkpoints; one is always written at the end)")
        require(self.keep_checkpoints >= 0, "run.keep_checkpoints", self.keep_checkpoints,
                "must be >= 1 (newest checkpoints kept), or 0 to keep all")


PRECISIONS = ("no", "fp16", "bf16")
SPATIAL_PROBE_MIN = 8  # scenes: one per relation configuration of the synthetic scenes at least


@dataclass
class EvalConfig:
    """Validation during training (sapretrain/train/validate.py, docs/training.md).

    The validation set is the first ``batches x batch_pairs`` records of ``shards`` in their listed
    order (the same set for any number of processes); every rank reads its share and the numbers
    are reduced over all of them.
    """

    every: int = 0  # steps between validations (and one at the last step); 0: off
    shards: str = ""  # held-out shards, in the forms data.shards takes (never the training shards)
    features: str | None = None  # feature shards of eval.shards (tools/cache_features.py): no vision tower pass
    batches: int = 4  # global batches per validation: bounds its cost (fewer if the shards hold fewer)
    batch_pairs: int | None = None  # pairs per global validation batch; null: data.batch_pairs
    workers: int = 2  # DataLoader workers per rank for the validation reads (0: in the training process)
    spatial_probe: int = 0  # held-apart synthetic scenes for the relation probe with gold boxes; 0: off

    def __post_init__(self):
        require(self.every >= 0, "eval.every", self.every, "must be >= 0 (steps between validations; 0: off)")
        require(self.every == 0 or bool(str(self.shards).strip() or self.features), "eval.shards", self.shards,
                "must name the held-out shards (a directory, brace pattern or comma list) when eval.every > 0")
        require(self.batches > 0, "eval.batches", self.batches, "must be > 0 (global batches per validation)")
        require(self.batch_pairs is None or self.batch_pairs > 0, "eval.batch_pairs", self.batch_pairs,
                "must be > 0 (pairs per global validation batch), or null for data.batch_pairs")
        require(self.workers >= 0, "eval.workers", self.workers, "must be >= 0 (0: read in the training process)")
        require(self.spatial_probe == 0 or self.spatial_probe >= SPATIAL_PROBE_MIN, "eval.spatial_probe",
                self.spatial_probe, f"must be 0 (off) or >= {SPATIAL_PROBE_MIN} scenes")


@dataclass
class TrainConfig:
    model: SAClipConfig = field(default_factory=SAClipConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # Each rank's share (batch_pairs / world size, checked at start-up) splits into accum_freq
        # micro-batches; on one rank that is this.
        require(self.data.batch_pairs % self.optim.accum_freq == 0, "data.batch_pairs", self.data.batch_pairs,
                f"must be divisible by optim.accum_freq={self.optim.accum_freq} (equal micro-batches)")
        # Held-out means not trained on: the same spec would report training-set numbers as validation.
        if self.eval.every:
            for key, held_out, trained in (("shards", self.eval.shards, self.data.shards),
                                           ("features", self.eval.features, self.data.features)):
                require(not held_out or _spec(held_out) != _spec(trained), f"eval.{key}", held_out,
                        f"must not be the training data (data.{key}): validation needs held-out shards")


def _spec(spec: str | None) -> str:
    return ",".join(part.strip().rstrip("/") for part in str(spec or "").split(","))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
