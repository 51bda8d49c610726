#!/usr/bin/env python
"""``sapretrain make-shards`` from a checkout: the command and its help live in sapretrain/cli/make_shards.py."""
from sapretrain.cli.make_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
