#!/usr/bin/env python
"""``sapretrain cache-features`` from a checkout: the command and its help live in sapretrain/cli/cache_features.py."""
from sapretrain.cli.cache_features import main

if __name__ == "__main__":
    raise SystemExit(main())
