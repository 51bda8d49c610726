"""The Python API (sapretrain/api.py) on a tiny random-init SA-CLIP: the extractor's parts, boxes
given / found / whole frame, scores, determinism, and clear errors for bad input.

No trained model exists in tests, so no test asserts that a score prefers the right caption; the
numbers asserted are shapes, equalities with the evaluation code path, and what each input gives.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sapretrain
from sapretrain.api import NoTripletError, SAClipPipeline
from sapretrain.boxes import default_matcher
from sapretrain.eval.encode import Encoder, EvalSample
from sapretrain.model import SAClipConfig, build_saclip, save_saclip
from sapretrain.scenes.synthetic import render_scene

D = 64  # sa-tiny embed_dim


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "sa.pt"
    save_saclip(build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=False)), str(path))
    return path


@pytest.fixture(scope="module")
def pipe(model_file):
    return sapretrain.load(str(model_file))


def scene_with_distinct_nouns(pipe, start: int = 0):
    """A synthetic scene whose subject and object nouns differ (one detection per noun is then
    unambiguous) and whose first extracted triplet has the gold subject and object."""
    matcher = default_matcher()
    for index in range(start, start + 50):
        scene = render_scene("eval", index)
        nouns = [matcher.noun(scene.triplet[p]["text"]) for p in ("subj", "obj")]
        first = pipe.triplet_of(scene.caption)
        if nouns[0] != nouns[1] and first is not None and all(first[p]["text"] == scene.triplet[p]["text"] for p in ("subj", "obj")):
            return scene, nouns
    raise AssertionError("no scene with distinct nouns")


class FakeDetector:
    """Returns fixed detections; records the classes it was asked for."""

    def __init__(self, detections):
        self.detections = detections
        self.calls = []

    def __call__(self, images, classes=None):
        self.calls.append((len(images), list(classes or [])))
        return [list(self.detections) for _ in images]


def test_import_sapretrain_is_cheap_and_has_no_side_effects():
    code = ("import sys, sapretrain; assert 'torch' not in sys.modules, 'torch imported'; "
            "import open_clip, sapretrain.model; "
            "print(open_clip.get_model_config('sa-tiny') is None, callable(sapretrain.load))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]  # sa-tiny not registered by the import; API reachable
    assert sapretrain.SAClipPipeline is SAClipPipeline
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sapretrain.nope


def test_encode_text_uses_the_extractors_parts(pipe):
    out = pipe.encode_text("a cat under a table")
    triplet = out.triplets[0]
    assert [triplet[p]["text"] for p in ("subj", "rel", "obj")] == ["cat", "under", "table"]
    assert out.u.shape == (1, 2 * D) and out.text_embed.shape == (1, D) and out.r_svo.shape == (1, D)
    torch.testing.assert_close(out.u.norm(dim=-1), torch.ones(1))
    # The same numbers as the evaluation path given the same spans; deterministic.
    ref = Encoder(pipe.model).texts([EvalSample(caption="a cat under a table", triplet=triplet)])
    torch.testing.assert_close(out.u, ref, rtol=0, atol=0)
    torch.testing.assert_close(pipe.encode_text(["a cat under a table"]).u, out.u, rtol=0, atol=0)
    # Different relations give different embeddings (the spans move the SVO half).
    other = pipe.encode_text(["a cat on a table"])
    assert other.triplets[0]["rel"]["text"] == "on" and not torch.allclose(other.u, out.u)


def test_caption_without_triplet_errors_or_falls_back_to_global(pipe):
    with pytest.raises(NoTripletError, match="no subject-relation-object triplet.*missing_triplet='global'"):
        pipe.encode_text(["a cat under a table", "hello there"])
    out = pipe.encode_text(["hello there", "a cat under a table"], missing_triplet="global")
    assert out.triplets[0] is None and out.triplets[1] is not None
    torch.testing.assert_close(out.u[0, :D], out.text_embed[0], rtol=0, atol=0)
    assert (out.u[0, D:] == 0).all() and (out.r_svo[0] == 0).all()
    full = pipe.encode_text(["a cat under a table"])
    torch.testing.assert_close(out.u[1], full.u[0], rtol=0, atol=1e-6)  # other rows unchanged (float batch effects)
    with pytest.raises(ValueError, match="missing_triplet"):
        pipe.encode_text(["hello"], missing_triplet="ignore")
    # A plain CLIP reads no triplet at all.
    clip = sapretrain.load("openclip:sa-tiny")
    assert clip.encode_text(["hello there"]).u.shape == (1, 2 * D)


def test_bad_text_input_is_named(pipe):
    for bad in ("", "   ", None, 3):
        with pytest.raises(ValueError, match="caption 0"):
            pipe.encode_text([bad])
    with pytest.raises(ValueError, match="no captions"):
        pipe.encode_text([])
    with pytest.raises(ValueError, match="2 triplets for 1 captions"):
        pipe.encode_text(["a cat"], triplets=[None, None])
    with pytest.raises(ValueError, match="subj span"):
        pipe.encode_text(["a cat under a table"], triplets=[{"subj": {"start": 0, "end": 99},
                                                              "rel": {"start": 6, "end": 11},
                                                              "obj": {"start": 14, "end": 19}}])


def test_encode_image_boxes_given_found_or_whole_frame(pipe, tmp_path):
    scene, nouns = scene_with_distinct_nouns(pipe)
    ref = Encoder(pipe.model).images([EvalSample(scene.image, scene.boxes)])

    given = pipe.encode_image(scene.image, boxes=scene.boxes)
    assert given.box_source == ["given"] and given.boxes == [scene.boxes]
    assert given.v.shape == (1, 2 * D)
    torch.testing.assert_close(given.v, ref, rtol=0, atol=0)

    # The detector's subject and object detections, listed object first: the nouns decide, not the order.
    detector = FakeDetector([{"name": nouns[1], "box": scene.boxes["obj"], "score": 0.9},
                             {"name": nouns[0], "box": scene.boxes["subj"], "score": 0.8}])
    finder = SAClipPipeline(pipe.model, detector=detector, nlp=pipe.nlp)
    found = finder.encode_image([scene.image, scene.image], captions=[scene.caption, scene.caption])
    assert found.box_source == ["detector", "detector"]
    assert detector.calls == [(2, sorted(nouns))]  # one detector pass for the batch, the nouns as classes
    for box in found.boxes:
        for part in ("subj", "obj"):
            assert box[part] == pytest.approx(scene.boxes[part], abs=0.01)  # clipped and rounded to 0.01 px
    torch.testing.assert_close(found.v[0], ref[0], atol=1e-5, rtol=0)

    # No detector, no caption, or no matching detection: the whole frame, and why.
    whole = pipe.encode_image([scene.image], captions=[scene.caption])
    assert whole.box_source == ["whole_frame"] and whole.box_detail == ["no detector configured"]
    assert whole.boxes[0] == {p: [0.0, 0.0, float(scene.width), float(scene.height)] for p in ("subj", "obj")}
    assert not torch.allclose(whole.v, ref)
    assert finder.encode_image([scene.image]).box_detail == ["no caption to find the subject and object of"]
    nothing = SAClipPipeline(pipe.model, detector=FakeDetector([{"name": "zebra", "box": [0, 0, 50, 50]}]),
                             nlp=pipe.nlp).encode_image([scene.image], captions=[scene.caption])
    assert nothing.box_source == ["whole_frame"] and nothing.box_detail[0].startswith("detector: no_box")

    # A path reads like the PIL image.
    path = tmp_path / "scene.png"
    scene.image.save(path)
    torch.testing.assert_close(pipe.encode_image(str(path), boxes=scene.boxes).v, given.v, rtol=0, atol=0)


def test_bad_image_input_is_named(pipe, tmp_path):
    scene = render_scene("eval", 0)
    with pytest.raises(FileNotFoundError, match="image 0"):
        pipe.encode_image(str(tmp_path / "missing.png"))
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.encode_image(str(tmp_path / "not.png"))
    with pytest.raises(ValueError, match="expected a PIL image or a path, got int"):
        pipe.encode_image([scene.image, 3])
    with pytest.raises(ValueError, match="obj box .* no area inside the 320x240 image"):
        pipe.encode_image(scene.image, boxes={"subj": [0, 0, 10, 10], "obj": [400, 300, 500, 400]})
    with pytest.raises(ValueError, match="subj box .* four numbers"):
        pipe.encode_image(scene.image, boxes={"subj": [0, 0, 10], "obj": [0, 0, 10, 10]})
    with pytest.raises(ValueError, match="expected .*'subj'"):
        pipe.encode_image(scene.image, boxes={"subject": [0, 0, 10, 10]})
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        pipe.encode_image(scene.image, captions=["a", "b"])
    with pytest.raises(ValueError, match="2 images for 1 captions"):
        pipe.score_batch([scene.image, scene.image], ["a cat under a table"])


def test_score_is_the_cosine_of_v_and_u(pipe):
    scene = render_scene("eval", 3)
    own, negative = scene.caption, scene.negative["caption"]
    scores = pipe.score_batch([scene.image, scene.image], [own, negative], boxes=[scene.boxes, scene.boxes])
    assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())
    text = pipe.encode_text([own, negative])
    image = pipe.encode_image([scene.image, scene.image], boxes=[scene.boxes, scene.boxes])
    torch.testing.assert_close(scores, (image.v * text.u).sum(-1), rtol=0, atol=1e-6)
    assert scores[0] != scores[1]  # the relation word changes the score
    assert pipe.score(scene.image, own, boxes=scene.boxes) == pytest.approx(float(scores[0]), abs=1e-6)
    assert pipe.score(scene.image, own, boxes=scene.boxes) == pipe.score(scene.image, own, boxes=scene.boxes)


def test_from_pretrained_sources(model_file, tmp_path):
    clip = SAClipPipeline.from_pretrained("openclip:sa-tiny")
    assert not clip.uses_boxes and not clip.uses_triplets and "plain CLIP" in repr(clip)
    image = clip.encode_image(render_scene("eval", 0).image)
    assert image.box_source == ["not_used"] and image.boxes == [None]
    with pytest.raises(FileNotFoundError, match="openclip:MODEL"):
        sapretrain.load(str(tmp_path / "nothing"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        sapretrain.load(str(tmp_path / "junk.pt"))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an SA-CLIP config"):
        sapretrain.load(str(tmp_path / "export"))


def test_quickstart_example_runs(tmp_path, capsys, monkeypatch):
    import runpy

    from conftest import PROJECT_ROOT

    example = str(PROJECT_ROOT / "examples" / "quickstart.py")
    monkeypatch.setattr(sys, "argv", [example, str(tmp_path / "quickstart")])
    runpy.run_path(example, run_name="__main__")
    out = capsys.readouterr().out
    assert "parts: cat | under | table" in out
    assert "exported folder gives the same embeddings: max |diff| 0" in out
    assert "box source: detector" in out and "box source: whole_frame" in out
    assert (tmp_path / "quickstart" / "export" / "model.safetensors").is_file()
