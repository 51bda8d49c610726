"""sapretrain: distributed WebDataset pretraining of SA-CLIP."""

__version__ = "0.1.0"
