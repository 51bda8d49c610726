"""Training: configs now; the loop, checkpoints and distribution land with the trainer issue."""
