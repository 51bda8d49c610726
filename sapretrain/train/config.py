"""The training config: one typed tree per experiment, loaded from configs/*.yaml.

    accelerate launch launch/pretrain.py --config configs/paper.yaml optim.lr=3e-4 data.batch_pairs=256

Sections: ``model`` (SAClipConfig), ``data`` (LoaderConfig), ``loss`` (LossConfig), ``optim`` and
``run`` below. Unknown keys are errors; the resolved tree is saved in the run directory and in
every checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    grad_clip: float | None = 1.0  # max global grad norm; null disables clipping
    accum_freq: int = 1  # micro-batches per step; the contrastive batch stays global (feature cache)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # local path or fsspec URL for checkpoints; logs go to a local mirror
    seed: int = 0
    precision: str = "bf16"  # no | fp16 | bf16 (autocast; the optimizer keeps fp32 weights)
    log_every: int = 10  # steps between console/tracker logs
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest kept; older ones are deleted
    save_frozen: bool = False  # also store the locked vision tower (else rebuilt from model.pretrained)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb; [] for none
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # activation checkpointing in the open_clip towers


@dataclass
class TrainConfig:
    model: SAClipConfig = field(default_factory=SAClipConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
