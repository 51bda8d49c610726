#!/usr/bin/env python
"""``sapretrain make-samples`` from a checkout: the command and its help live in sapretrain/cli/make_samples.py."""
from sapretrain.cli.make_samples import main

if __name__ == "__main__":
    raise SystemExit(main())
