#!/usr/bin/env python
"""``sapretrain eval-negatives`` from a checkout: the command and its help live in sapretrain/cli/eval_negatives.py."""
from sapretrain.cli.eval_negatives import main

if __name__ == "__main__":
    raise SystemExit(main())
