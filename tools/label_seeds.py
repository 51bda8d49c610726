#!/usr/bin/env python
"""``sapretrain label-seeds`` from a checkout: the command and its help live in sapretrain/cli/label_seeds.py."""
from sapretrain.cli.label_seeds import main

if __name__ == "__main__":
    raise SystemExit(main())
