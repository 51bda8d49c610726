"""Quickstart: build a tiny SA-CLIP, save it, export it, load it back, encode and score.

    python examples/quickstart.py [OUTPUT_DIR]

Runs offline on a CPU in seconds (random-init ``sa-tiny``, so the scores mean nothing; with a
trained run use ``sapretrain.load("runs/demo/saclip")``). Its output is in docs/api.md.
"""
import sys
import tempfile
from pathlib import Path

import torch

import sapretrain
from sapretrain.boxes import default_matcher
from sapretrain.export import main as export
from sapretrain.model import SAClipConfig, build_saclip, save_saclip
from sapretrain.scenes.synthetic import render_scene


def run(out: Path) -> None:
    torch.manual_seed(0)
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False))
    save_saclip(model, str(out / "sa-tiny.pt"))

    # Export: Hub folder (model.safetensors, config.json, README.md) and open_clip/.
    export([str(out / "sa-tiny.pt"), "--output", str(out / "export"), "name=sa-tiny-quickstart"])
    pipe = sapretrain.load(str(out / "export"))
    print(pipe)

    # Text: the SVO extractor finds the parts, the model embeds them.
    text = pipe.encode_text(["a cat under a table"])
    print("parts:", " | ".join(text.triplets[0][p]["text"] for p in ("subj", "rel", "obj")))
    print("u:", tuple(text.u.shape), "text_embed:", tuple(text.text_embed.shape))

    # The export gives the checkpoint's embeddings.
    direct = sapretrain.load(str(out / "sa-tiny.pt")).encode_text(["a cat under a table"])
    print(f"exported folder gives the same embeddings: max |diff| {(direct.u - text.u).abs().max().item():g}")

    # Images: boxes given, found by a detector, or the whole frame.
    scene = render_scene("eval", 3)
    print("scene caption:", scene.caption, "| negative:", scene.negative["caption"])
    given = pipe.encode_image(scene.image, boxes=scene.boxes)
    print("box source:", given.box_source[0], {k: [round(v) for v in b] for k, b in given.boxes[0].items()})
    whole = pipe.encode_image(scene.image, captions=scene.caption)
    print("box source:", whole.box_source[0], f"({whole.box_detail[0]})")

    noun = default_matcher().noun  # the box-choice rule's nouns ("large shiny ball" -> "ball")

    def detector(images, classes):  # stands in for YOLO weights (detector="yolov8n.pt"): any callable works
        return [[{"name": noun(scene.triplet[p]["text"]), "box": scene.boxes[p], "score": 0.9} for p in ("obj", "subj")]
                for _ in images]

    found = sapretrain.load(str(out / "export"), detector=detector).encode_image(scene.image, captions=scene.caption)
    print("box source:", found.box_source[0], {k: [round(v) for v in b] for k, b in found.boxes[0].items()})

    scores = pipe.score_batch([scene.image] * 2, [scene.caption, scene.negative["caption"]],
                              boxes=[scene.boxes] * 2)
    print(f"score(own caption) {scores[0]:.4f}  score(opposite relation) {scores[1]:.4f}  (random weights)")
    print("model card:", (out / "export" / "README.md").read_text().splitlines()[1:4])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        run(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
