"""Datasets: manifests, the synthetic default, streaming loaders."""
