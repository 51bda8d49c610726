#!/usr/bin/env python
"""``sapretrain train-scene-detector`` from a checkout: the command and its help live in sapretrain/cli/train_scene_detector.py."""
from sapretrain.cli.train_scene_detector import main

if __name__ == "__main__":
    raise SystemExit(main())
