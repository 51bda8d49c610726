#!/usr/bin/env python
"""``sapretrain eval-svo`` from a checkout: the command and its help live in sapretrain/cli/eval_svo.py."""
from sapretrain.cli.eval_svo import main

if __name__ == "__main__":
    raise SystemExit(main())
