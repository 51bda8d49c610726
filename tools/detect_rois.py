#!/usr/bin/env python
"""``sapretrain detect-rois`` from a checkout: the command and its help live in sapretrain/cli/detect_rois.py."""
from sapretrain.cli.detect_rois import main

if __name__ == "__main__":
    raise SystemExit(main())
