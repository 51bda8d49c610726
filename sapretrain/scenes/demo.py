"""The embedded default dataset: synthetic two-object scenes, plus any extra manifests.

Needs nothing from the network: scenes are rendered by ``sapretrain.scenes.synthetic`` into
``root`` (``data/`` of the working directory). A checkout adds its CC-licensed COCO photos
(``tests/fixtures/coco``, with ATTRIBUTION.md) through ``tools/make_shards.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sapretrain.scenes import synthetic

DEMO_DATA = Path("data")


def build_demo_manifest(scenes: int = 4000, workers: int = 1, progress: bool = True, root: Path = DEMO_DATA,
                        extra: tuple[str | Path, ...] = ()) -> str:
    """Render the synthetic training scenes and write one manifest with them and the ``extra``
    local manifests (their relative image paths rebased).

    Idempotent: rendered scenes are kept, and the manifest is rewritten byte-identically.
    """
    root = Path(root)
    for manifest in extra:
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"{manifest}: extra manifest for the embedded default not found")
    synth_manifest = synthetic.write_synthetic(root / "synthetic" / "train", "train", scenes, workers, progress=progress)
    out = root / "demo_manifest.jsonl"
    lines = []
    for manifest in (Path(synth_manifest), *map(Path, extra)):
        lines += [_rebase(line, manifest.parent, out.parent) for line in manifest.read_text().splitlines() if line]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return str(out)


def _rebase(line: str, src_dir: Path, dst_dir: Path) -> str:
    """Make a line's relative image path relative to ``dst_dir`` instead of ``src_dir``."""
    sample = json.loads(line)
    image = sample["image"]
    if "://" not in image and not os.path.isabs(image):
        sample["image"] = os.path.relpath(src_dir / image, dst_dir)
    return json.dumps(sample, ensure_ascii=False)
