"""The training config: one typed tree per experiment, loaded from configs/*.yaml.

    accelerate launch launch/pretrain.py --config configs/paper.yaml optim.lr=3e-4 data.batch_pairs=256
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"  # open_clip model name, or a path to a model JSON config
    pretrained: str | None = "openai"  # open_clip tag, a local weights path, or null for random init
    lock_image: bool = True  # LiT: frozen vision tower (paper App. A)


@dataclass
class DataConfig:
    shards: str = "data/shards/demo"  # shard directory, brace pattern or fsspec URL
    batch_pairs: int = 512  # anchor/positive pairs per optimizer step (2x image-text samples)
    workers: int = 4  # loader processes per rank


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 500
    steps: int = 30_000


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    precision: str = "bf16"  # no | fp16 | bf16


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
