"""Synthetic two-object scenes (rendered offline, with exact boxes and relations) and the
embedded default dataset built from them."""
