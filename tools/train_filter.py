#!/usr/bin/env python
"""``sapretrain train-filter`` from a checkout: the command and its help live in sapretrain/cli/train_filter.py."""
from sapretrain.cli.train_filter import main

if __name__ == "__main__":
    raise SystemExit(main())
