"""Shard format (schema), writer and checker."""
