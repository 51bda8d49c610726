"""The embedded default dataset: synthetic two-object scenes plus the CC-licensed COCO photos.

Needs nothing from the network: scenes are rendered by ``sapretrain.data.synthetic`` and the
photos ship in ``tests/fixtures/coco`` (with ATTRIBUTION.md). Paths are relative to the project
root so the commands work from any directory of a checkout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sapretrain.data import synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COCO_FIXTURE_MANIFEST = PROJECT_ROOT / "tests" / "fixtures" / "coco" / "manifest.jsonl"
DEMO_DATA = PROJECT_ROOT / "data"


def build_demo_manifest(scenes: int = 4000, workers: int = 1, progress: bool = True, root: Path = DEMO_DATA) -> str:
    """Render the synthetic training scenes and write one manifest with them and the COCO photos.

    Idempotent: rendered scenes are kept, and the manifest is rewritten byte-identically.
    """
    if not COCO_FIXTURE_MANIFEST.exists():
        raise FileNotFoundError(f"{COCO_FIXTURE_MANIFEST} not found: the embedded default needs a project checkout")
    synth_manifest = synthetic.write_synthetic(root / "synthetic" / "train", "train", scenes, workers, progress=progress)
    out = root / "demo_manifest.jsonl"
    lines = []
    for manifest in (Path(synth_manifest), COCO_FIXTURE_MANIFEST):
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
