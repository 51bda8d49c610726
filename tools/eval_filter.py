#!/usr/bin/env python
"""``sapretrain eval-filter`` from a checkout: the command and its help live in sapretrain/cli/eval_filter.py."""
from sapretrain.cli.eval_filter import main

if __name__ == "__main__":
    raise SystemExit(main())
