"""Shard records → training batches: the streaming loader and batch collation."""
