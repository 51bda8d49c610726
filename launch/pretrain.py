#!/usr/bin/env python
"""Pretrain SA-CLIP on WebDataset shards with Accelerate.

    accelerate launch launch/pretrain.py --config configs/NAME.yaml [key=value ...]

At this stage the entry point resolves and validates the config (unknown keys and bad types are
errors) and writes it to ``run.output_dir``; the training loop lands with the trainer issue.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sapretrain.config import ConfigError, dump_config, load_config, save_config
from sapretrain.train.config import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config, e.g. configs/demo.yaml")
    parser.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in run.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print(dump_config(cfg), end="")
    print(f"resolved config saved to {out / 'config.yaml'}", file=sys.stderr)
    print("the training loop is not built yet: it lands with the trainer issue (#4)", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
