#!/usr/bin/env python
"""``sapretrain extract-svo`` from a checkout: the command and its help live in sapretrain/cli/extract_svo.py."""
from sapretrain.cli.extract_svo import main

if __name__ == "__main__":
    raise SystemExit(main())
