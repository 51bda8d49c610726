#!/usr/bin/env python
"""``sapretrain check-shards`` from a checkout: the command and its help live in sapretrain/cli/check_shards.py."""
from sapretrain.cli.check_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
