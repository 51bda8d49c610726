#!/usr/bin/env python
"""``sapretrain make-negatives`` from a checkout: the command and its help live in sapretrain/cli/make_negatives.py."""
from sapretrain.cli.make_negatives import main

if __name__ == "__main__":
    raise SystemExit(main())
