"""Curation: caption sources, SVO extraction, filtering (DESIGN.md §1 Curation)."""
