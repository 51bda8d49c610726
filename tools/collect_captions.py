#!/usr/bin/env python
"""``sapretrain collect-captions`` from a checkout: the command and its help live in sapretrain/cli/collect_captions.py."""
from sapretrain.cli.collect_captions import main

if __name__ == "__main__":
    raise SystemExit(main())
