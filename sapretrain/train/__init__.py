"""Training: the config tree, the loop (trainer.py), checkpoints and training plots."""
