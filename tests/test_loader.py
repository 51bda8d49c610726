"""The training loader: shapes, equal batches per rank, coverage, determinism, exact resume,
resampled mode, fail-fast checks, bad shards, S3 streaming."""
from __future__ import annotations

import io
import itertools
import logging
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds

from conftest import make_image, sample_line, write_manifest
from sapretrain.data.loader import LoaderConfig, build_loader
from sapretrain.shards.writer import ShardConfig, make_shards

RECORDS = 24  # 48 samples in mutual pairs
SHARD_SIZE = 4  # -> 6 shards
IMAGE = 64
PREPROCESS = open_clip.transform.image_transform(IMAGE, is_train=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 shards of 4 records (small 96x72 images, 64 px stored)."""
    root = tmp_path_factory.mktemp("loader")
    (root / "images").mkdir()
    lines = []
    for i in range(2 * RECORDS):
        make_image(root / "images" / f"{i}.jpg", size=(96, 72), subj=(5, 5, 40, 50), obj=(50, 10, 90, 60), seed=i)
        lines.append(sample_line(i, f"images/{i}.jpg", i ^ 1, size=(96, 72), subj_box=(5, 5, 40, 50), obj_box=(50, 10, 90, 60)))
    manifest = write_manifest(root / "manifest.jsonl", lines)
    out = root / "shards"
    report = make_shards(str(manifest), str(out), ShardConfig(image_size=IMAGE, roi_size=32, shard_size=SHARD_SIZE), progress=False)
    assert report.summary["records"] == RECORDS and report.shards_total == RECORDS // SHARD_SIZE
    return out


@pytest.fixture(scope="module")
def anchor_of(shards) -> dict[tuple, str]:
    """Padded anchor token ids -> record key, to name the records of a batch."""
    table = {}
    for record in wds.WebDataset(str(shards / "shard-{000000..000005}.tar"), shardshuffle=False).decode():
        tokens = record["json"]["a"]["tokens"]
        table[tuple(tokens + [0] * (77 - len(tokens)))] = record["__key__"]
    assert len(table) == RECORDS
    return table


def config(shards, **kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": str(shards), "batch_pairs": 4, "workers": 2, **kw})


def take(loader, n: int | None = None) -> list[dict]:
    """The first ``n`` batches (all of the epoch when None), closing the iteration after them."""
    it = iter(loader)
    try:
        return list(it if n is None else itertools.islice(it, n))
    finally:
        it.close()


def within(seconds: float, fn):
    """Run ``fn`` in a thread; fail instead of hanging the test session."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def anchors(batch, table) -> list[str]:
    pairs = batch["text"].shape[0] // 2
    return [table[tuple(row.tolist())] for row in batch["text"][:pairs]]


def assert_same(xs: list[dict], ys: list[dict]) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"batch {i}: {key} differs"


def test_batch_shapes_and_keys(shards):
    # A comma list of brace patterns; image_size squashes decoded images before the preprocess.
    spec = f"{shards}/shard-{{000000..000002}}.tar,{shards}/shard-{{000003..000005}}.tar"
    loader = build_loader(config(spec, workers=0, image_size=32), open_clip.transform.image_transform(32, is_train=False), 0, 1)
    assert len(loader) == RECORDS // 4
    batch = take(loader, 1)[0]
    n = 2 * 4  # anchors then partners
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {
        "image": (n, 3, 32, 32),
        "rois": (n, 2, 3, 32, 32),
        "boxes": (n, 2, 4),
        "text": (n, 77),
        "spans": (n, 3, 77),
        "neg_text": (n, 77),
        "neg_spans": (n, 3, 77),
        "groups": (n,),
    }
    assert batch["text"].dtype == torch.int64 and batch["spans"].dtype == torch.bool
    assert batch["groups"].dtype == torch.int64
    assert loader.state_dict()["batch"] == 1


def test_epoch_covers_every_record_once_with_equal_batches_per_rank(shards, anchor_of):
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(config(shards, batch_pairs=4), PREPROCESS, rank, 2)
        batches = within(60, lambda: take(loader))
        assert len(batches) == len(loader) == RECORDS // 4
        assert all(b["text"].shape[0] == 2 * 2 for b in batches)  # 2 pairs per rank
        per_rank.append([key for b in batches for key in anchors(b, anchor_of)])
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == sorted(anchor_of.values())  # every record, none twice


def test_order_is_deterministic_per_seed_and_epoch(shards, anchor_of):
    def order(**kw):
        epoch = kw.pop("epoch", 0)
        loader = build_loader(config(shards, **kw), PREPROCESS, 0, 1, epoch=epoch)
        return [key for b in take(loader) for key in anchors(b, anchor_of)], loader

    first, loader = order()
    again, _ = order()
    assert first == again
    other_seed, _ = order(seed=1)
    next_epoch, _ = order(epoch=1)
    assert other_seed != first and next_epoch != first
    assert sorted(other_seed) == sorted(next_epoch) == sorted(first)
    # Iterating the same loader again continues with the next epoch.
    assert [key for b in take(loader) for key in anchors(b, anchor_of)] == next_epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers, batch_pairs, k", [(2, 2, 5), (2, 2, 8), (2, 7, 1), (3, 2, 7)])
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(shards, workers, batch_pairs, k):
    # A small, streaming shuffle buffer; k not a multiple of the workers; readers with unequal shares.
    cfg = config(shards, workers=workers, batch_pairs=batch_pairs, shuffle_buffer=3)
    full = take(build_loader(cfg, PREPROCESS, 0, 1))
    assert len(full) == RECORDS // batch_pairs

    interrupted = build_loader(cfg, PREPROCESS, 0, 1)
    assert_same(take(interrupted, k), full[:k])
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == (0, k)

    resumed = build_loader(cfg, PREPROCESS, 0, 1, epoch=0, start_batch=k)
    assert_same(take(resumed), full[k:])
    assert resumed.state_dict()["epoch"] == 1

    restored = build_loader(cfg, PREPROCESS, 0, 1)
    restored.load_state_dict(state)
    assert_same(take(restored), full[k:])


def test_resampled_mode_is_infinite_and_reproducible(shards):
    cfg = config(shards, resampled=True, shuffle_buffer=8)  # 6 batches per reseeding chunk
    loader = build_loader(cfg, PREPROCESS, 0, 1)
    batches = within(60, lambda: take(loader, 14))  # crosses two chunk boundaries
    assert len(batches) == 14
    assert (loader.state_dict()["epoch"], loader.state_dict()["batch"]) == (2, 2)
    assert_same(take(build_loader(cfg, PREPROCESS, 0, 1), 14), batches)
    other = take(build_loader(config(shards, resampled=True, shuffle_buffer=8, seed=1), PREPROCESS, 0, 1), 2)
    assert not torch.equal(other[0]["text"], batches[0]["text"])

    resumed = build_loader(cfg, PREPROCESS, 0, 1, epoch=1, start_batch=2)
    assert_same(take(resumed, 6), batches[8:14])


def test_layout_errors_fail_fast(shards, tmp_path):
    with pytest.raises(ValueError, match=r"6 shards for 2 rank\(s\) x 4 worker\(s\) = 8 readers.*data.workers"):
        build_loader(config(shards, workers=4), PREPROCESS, 0, 2)
    with pytest.raises(ValueError, match="batch_pairs=3 must be a positive multiple of the world size 2"):
        build_loader(config(shards, batch_pairs=3), PREPROCESS, 0, 2)
    bare = tmp_path / "no-sizes"
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, bare)
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        build_loader(config(bare), PREPROCESS, 0, 1)
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        build_loader(config(f"{bare}/shard-{{000000..000005}}.tar"), PREPROCESS, 0, 1)


def corrupt_copy(shards: Path, root: Path) -> Path:
    """The shards with shard 2 cut short mid-record and one anchor image of shard 4 garbled."""
    out = root / "corrupt"
    shutil.copytree(shards, out)
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) * 55 // 100])
    src = out / "shard-000004.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    garbled = False
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (member, payload) in enumerate(members):
            if member.name.endswith(".a.jpg") and i > 10 and not garbled:  # the second record's
                payload, garbled = b"\xff\xd8 not a jpeg" + payload[100:200], True
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return out


def test_bad_shards_are_skipped_and_counted_ranks_stay_equal_and_resume_stays_exact(shards, tmp_path):
    bad = corrupt_copy(shards, tmp_path)
    for rank in (0, 1):
        loader = build_loader(config(bad, batch_pairs=2), PREPROCESS, rank, 2)
        assert len(within(60, lambda: take(loader))) == len(loader) == 12

    cfg = config(bad, batch_pairs=2)
    loader = build_loader(cfg, PREPROCESS, 0, 1)
    full = within(60, lambda: take(loader))
    assert len(full) == len(loader) == 12  # topped up from a second pass, no hang, no short epoch
    stats = loader.stats()
    assert stats["bad_shards"][str(bad / "shard-000002.tar")] == "truncated_shard"
    assert stats["bad_shards"][str(bad / "shard-000004.tar")] == "bad_image"
    assert stats["dropped"] == {"bad_image": 1}
    assert stats["missing_records"] >= 2 and stats["reread_records"] >= 1
    assert stats["batches"] == 12 and stats["records"] == 24

    # Mid-epoch resume from this rank's state is exact even though records failed to decode.
    for k in (3, 7):
        interrupted = build_loader(cfg, PREPROCESS, 0, 1)
        assert_same(within(60, lambda: take(interrupted, k)), full[:k])
        restored = build_loader(cfg, PREPROCESS, 0, 1)
        restored.load_state_dict(interrupted.state_dict())
        assert_same(within(60, lambda: take(restored)), full[k:])


def test_bad_shard_is_logged_once(shards, tmp_path, caplog):
    bad = corrupt_copy(shards, tmp_path)
    with caplog.at_level(logging.WARNING, logger="sapretrain.data.loader"):
        within(60, lambda: take(build_loader(config(bad, workers=0), PREPROCESS, 0, 1)))
    truncated = [r for r in caplog.records if "shard-000002.tar" in r.getMessage()]
    assert len(truncated) == 1 and "truncated_shard" in truncated[0].getMessage()
    assert any("epoch 0" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_a_reader_without_usable_records_raises_instead_of_hanging(shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(shards / "sizes.json", broken)
    for tar in shards.glob("*.tar"):
        (broken / tar.name).write_bytes(tar.read_bytes()[:700])  # not even one whole record
    with pytest.raises(RuntimeError, match="yields a usable record"):
        within(60, lambda: take(build_loader(config(broken), PREPROCESS, 0, 1)))


def test_s3_streaming_gives_the_local_batches(shards, s3_env):
    fs = s3_env
    fs.mkdir("loader-test")
    fs.put(str(shards), "loader-test/shards", recursive=True)
    local = take(build_loader(config(shards), PREPROCESS, 0, 1))
    remote = within(60, lambda: take(build_loader(config("s3://loader-test/shards"), PREPROCESS, 0, 1)))
    assert_same(remote, local)
