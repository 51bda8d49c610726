#!/usr/bin/env python
"""``sapretrain train`` from a checkout: the command and its help live in sapretrain/cli/train.py.

    accelerate launch launch/pretrain.py --config configs/NAME.yaml [key=value ...] [--resume auto]
"""
from sapretrain.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
