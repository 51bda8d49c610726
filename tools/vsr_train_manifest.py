#!/usr/bin/env python
"""``sapretrain vsr-train-manifest`` from a checkout: the command and its help live in sapretrain/cli/vsr_train_manifest.py."""
from sapretrain.cli.vsr_train_manifest import main

if __name__ == "__main__":
    raise SystemExit(main())
