#!/usr/bin/env python
"""``sapretrain make-positives`` from a checkout: the command and its help live in sapretrain/cli/make_positives.py."""
from sapretrain.cli.make_positives import main

if __name__ == "__main__":
    raise SystemExit(main())
