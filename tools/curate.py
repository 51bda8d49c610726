#!/usr/bin/env python
"""``sapretrain curate`` from a checkout: the command and its help live in sapretrain/cli/curate.py."""
from sapretrain.cli.curate import main

if __name__ == "__main__":
    raise SystemExit(main())
