#!/usr/bin/env python
"""``sapretrain evaluate`` from a checkout: the command and its help live in sapretrain/cli/evaluate.py."""
from sapretrain.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
