"""Pretrain SA-CLIP on WebDataset shards with Accelerate.

    accelerate launch -m sapretrain.cli.train --config configs/NAME.yaml [key=value ...] [--resume auto]

One process per GPU (accelerate launch, torchrun or SLURM); on CPU for tests and the demo:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m sapretrain.cli.train --config configs/demo.yaml
(`--cpu --num_processes 2` silently starts ONE process.)
"""
from __future__ import annotations

import argparse
import sys

from sapretrain.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config, e.g. configs/demo.yaml")
    parser.add_argument("--resume", default=None, help="a checkpoint directory, or 'auto' for the latest in run.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import train

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        train(cfg, resume=args.resume)  # a value checked against the world size raises ConfigError too
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
