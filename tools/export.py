#!/usr/bin/env python
"""``sapretrain export`` from a checkout: the command and its help live in sapretrain/export.py."""
from sapretrain.export import main

if __name__ == "__main__":
    raise SystemExit(main())
