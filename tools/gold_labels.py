#!/usr/bin/env python
"""``sapretrain gold-labels`` from a checkout: the command and its help live in sapretrain/cli/gold_labels.py."""
from sapretrain.cli.gold_labels import main

if __name__ == "__main__":
    raise SystemExit(main())
