"""sapretrain: distributed WebDataset pretraining of SA-CLIP.

    import sapretrain
    model = sapretrain.load("runs/demo/saclip")          # see sapretrain/api.py, docs/api.md
    model.score("photo.jpg", "a cat under a table")

``import sapretrain`` is cheap and changes nothing: the API (and torch) load on first use of
``sapretrain.load`` / ``SAClipPipeline`` / ``TextEmbeddings`` / ``ImageEmbeddings`` / ``NoTripletError``.
"""

__version__ = "0.1.0"

_API = ("load", "SAClipPipeline", "TextEmbeddings", "ImageEmbeddings", "NoTripletError")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from sapretrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'sapretrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
