#!/usr/bin/env python
"""``sapretrain filter-triplets`` from a checkout: the command and its help live in sapretrain/cli/filter_triplets.py."""
from sapretrain.cli.filter_triplets import main

if __name__ == "__main__":
    raise SystemExit(main())
