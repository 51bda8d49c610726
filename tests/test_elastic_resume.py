"""Elastic resume (issue 17): a data position written by R ranks resumes on R' != R ranks (or
another worker count) with no record of the epoch repeated or skipped; the same-layout resume
stays byte-exact, also inside a re-planned epoch; the trainer resumes 2 -> 1 and 1 -> 2
processes (gloo) from a mid-epoch checkpoint.

Records are named by their anchor caption's tokens (unique per record in these shards).
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds

from conftest import PROJECT_ROOT, partner_shards
from conftest import run_ranks as launch_ranks
from sapretrain.data.loader import LoaderConfig, Slice, build_loader, seeded, shuffle_records, unread

RECORDS, SHARD_SIZE, IMAGE = 24, 4, 64  # 6 shards
PREPROCESS = open_clip.transform.image_transform(IMAGE, is_train=False)
PRETRAIN = str(PROJECT_ROOT / "launch" / "pretrain.py")
DEMO = str(PROJECT_ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return partner_shards(tmp_path_factory.mktemp("elastic"), RECORDS, SHARD_SIZE, IMAGE)


@pytest.fixture(scope="module")
def key_of(shards) -> dict[tuple, str]:
    table = {}
    for record in wds.WebDataset(str(shards / "shard-{000000..000005}.tar"), shardshuffle=False).decode():
        tokens = record["json"]["a"]["tokens"]
        table[tuple(tokens + [0] * (77 - len(tokens)))] = record["__key__"]
    assert len(table) == RECORDS
    return table


def keys(batches, table) -> list[str]:
    out = []
    for batch in batches:
        pairs = batch["text"].shape[0] // 2
        out += [table[tuple(row.tolist())] for row in batch["text"][:pairs]]
    return out


def take(loader, n=None) -> list[dict]:
    it = iter(loader)
    try:
        return list(it if n is None else itertools.islice(it, n))
    finally:
        it.close()


def loaders(shards, world, workers, batch_pairs, buffer, seed=0):
    cfg = LoaderConfig(shards=str(shards), batch_pairs=batch_pairs, workers=workers, shuffle_buffer=buffer, seed=seed)
    return [build_loader(cfg, PREPROCESS, rank, world) for rank in range(world)]


def epoch_set(shards, batch_pairs, buffer, table, seed=0) -> list[str]:
    """The records an uninterrupted epoch trains on (one rank: the same set as any world size)."""
    return sorted(keys(take(loaders(shards, 1, 1, batch_pairs, buffer, seed)[0]), table))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("old, new, batch_pairs, k, buffer", [
    ((2, 2), (1, 2), 4, 2, 3),   # 2 -> 1 ranks
    ((1, 2), (2, 2), 4, 3, 3),   # 1 -> 2 ranks
    ((2, 1), (3, 2), 6, 1, 5),   # 2 -> 3 ranks, other worker count
    ((1, 1), (2, 3), 2, 5, 100),  # a buffer larger than a reader's share
    ((3, 1), (1, 1), 6, 2, 0),   # no shuffle buffer
])
def test_a_position_resumes_under_another_world_size_with_no_record_repeated_or_skipped(
        shards, key_of, old, new, batch_pairs, k, buffer):
    batches = RECORDS // batch_pairs
    before = loaders(shards, *old, batch_pairs, buffer)
    seen = [keys(take(loader, k), key_of) for loader in before]
    states = [loader.state_dict() for loader in before]
    after = loaders(shards, *new, batch_pairs, buffer)
    assert all(loader.needs_every_rank(states[0]) for loader in after)
    for rank, loader in enumerate(after):
        loader.load_state_dict(states[min(rank, len(states) - 1)], every_rank=states)
    rest = [take(loader) for loader in after]
    assert [len(r) for r in rest] == [batches - k] * new[0]  # equal batches per rank, the epoch's count
    assert all(b["text"].shape[0] == 2 * batch_pairs // new[0] for r in rest for b in r)
    every = [key for s in seen for key in s] + [key for r in rest for key in keys(r, key_of)]
    assert len(every) == len(set(every)), "a record was repeated"
    assert sorted(every) == epoch_set(shards, batch_pairs, buffer, key_of)  # none skipped
    assert all(loader.state_dict()["epoch"] == 1 and loader.state_dict()["segments"] == [] for loader in after)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_inside_a_replanned_epoch_the_same_layout_resumes_exactly_and_the_next_epoch_is_the_plain_one(shards, key_of):
    """2 -> 1 -> 3 ranks within one epoch, then a same-layout resume in the third segment (byte-
    identical batches); the epoch after is that of an uninterrupted 3-rank run."""
    bp, buffer = 6, 4  # 4 batches per epoch
    first = loaders(shards, 2, 1, bp, buffer)
    seen = [key for loader in first for key in keys(take(loader, 1), key_of)]
    states = [loader.state_dict() for loader in first]
    (second,) = loaders(shards, 1, 2, bp, buffer)
    second.load_state_dict(states[0], every_rank=states)
    seen += keys(take(second, 1), key_of)
    states = [second.state_dict()]
    assert len(states[0]["segments"]) == 1 and states[0]["start"] == 1
    third = loaders(shards, 3, 2, bp, buffer)
    for loader in third:
        loader.load_state_dict(states[0], every_rank=states)
    head = [take(loader, 1) for loader in third]
    mid = [loader.state_dict() for loader in third]
    tail = [take(loader) for loader in third]
    seen += keys([b for h in head for b in h] + [b for t in tail for b in t], key_of)
    assert len(seen) == len(set(seen)) and sorted(seen) == epoch_set(shards, bp, buffer, key_of)

    again = loaders(shards, 3, 2, bp, buffer)
    for loader, state in zip(again, mid):
        assert not loader.needs_every_rank(state)
        loader.load_state_dict(state)
    for got, want in zip((take(loader) for loader in again), tail):
        assert len(got) == len(want) == 1  # batch 3 of 4
        for x, y in zip(got, want):
            assert all(torch.equal(x[key], y[key]) for key in x)
    plain = loaders(shards, 3, 2, bp, buffer)
    for loader in plain:
        loader._seek(1, 0)
    for got, want in zip((take(loader) for loader in third), (take(loader) for loader in plain)):
        assert keys(got, key_of) == keys(want, key_of)


def test_unread_replays_the_shuffle_buffer_exactly():
    """What the buffer had not given out after n records is the complement of its first n outputs."""
    slices = [Slice("a", 2, 9), Slice("b", 0, 3, keep=None), Slice("c", 10, 20, keep=(11, 13, 14, 19))]
    names = [(sl.url, i) for sl in slices for i in (sl.keep or range(sl.start, sl.stop))]
    for buffer, n in itertools.product((0, 3, 50), (0, 1, 5, 13, len(names))):
        out = list(itertools.islice(shuffle_records(iter(names), buffer, seeded(7, "buffer")), n))
        left = unread(slices, n, buffer, seeded(7, "buffer"))
        got = [(sl.url, i) for sl in left for i in (sl.keep or range(sl.start, sl.stop))]
        assert sorted(got) == sorted(set(names) - set(out)), (buffer, n)
        assert len(got) == len(set(got))


# ----------------------------------------------------------------- the trainer, 2 -> 1 and 1 -> 2


def train_args(shards, out, steps=6, **extra) -> list[str]:
    values = {
        "model.name": "sa-tiny", "model.pretrained": "null", "model.lock_image": "false",
        "data.shards": str(shards), "data.batch_pairs": 4, "data.workers": 1, "data.shuffle_buffer": 8,
        "optim.steps": steps, "optim.warmup_steps": 2, "optim.lr": 1e-3,
        "run.precision": "no", "run.log_every": 1, "run.checkpoint_every": 1, "run.keep_checkpoints": 0,
        "run.trackers": "[]", "run.output_dir": str(out), **extra,
    }
    return ["--config", DEMO, "--resume", "auto"] + [f"{k}={v}" for k, v in values.items()]


def run_ranks(world: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    return launch_ranks(PRETRAIN, world, args)


def data_state(out: Path, step: int, rank: int) -> dict:
    from sapretrain.train.checkpoint import load_tensor_file

    return load_tensor_file(str(out / f"checkpoints/step-{step:08d}/rank-{rank}.pt"))["data"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("old, new", [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)])
def test_the_trainer_resumes_a_mid_epoch_checkpoint_under_another_world_size(shards, key_of, tmp_path, old, new):
    """6 batches of 4 pairs per epoch. A run on ``old`` processes checkpoints after step 2; resumed
    from it on ``new`` processes, steps 3-6 finish the epoch with the records steps 1-2 did not
    use (checked by replaying the checkpointed positions through the loader), then epoch 1."""
    first = tmp_path / "first"
    runs = run_ranks(old, train_args(shards, first, steps=2))
    assert [r.returncode for r in runs] == [0] * old, runs[0].stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    runs = run_ranks(new, train_args(shards, resumed, steps=7))
    assert [r.returncode for r in runs] == [0] * new, runs[0].stderr[-3000:]
    assert "resumed from" in runs[0].stdout and "elastic resume" in runs[0].stdout
    assert f"of {old} process(es)" in runs[0].stdout
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    states = [data_state(resumed, 6, r) for r in range(new)]
    assert all((s["epoch"], s["batch"], s["start"]) == (0, 6, 2) and len(s["segments"]) == 1 for s in states)
    assert all((s["epoch"], s["batch"], s["segments"]) == (1, 1, []) for s in (data_state(resumed, 7, r)
                                                                            for r in range(new)))

    # The records: what the old ranks took for steps 1-2, then what the new ranks' loaders give.
    cfg = LoaderConfig(shards=str(shards), batch_pairs=4, workers=1, shuffle_buffer=8)
    before = [build_loader(cfg, PREPROCESS, r, old) for r in range(old)]
    seen = [key for loader in before for key in keys(take(loader, 2), key_of)]
    saved = [data_state(first, 2, r) for r in range(old)]
    assert [loader.state_dict() for loader in before] == saved  # the trainer's positions are the loader's
    after = [build_loader(cfg, PREPROCESS, r, new) for r in range(new)]
    for r, loader in enumerate(after):
        loader.load_state_dict(saved[min(r, old - 1)], every_rank=saved)
    rest = [take(loader, 4) for loader in after]  # steps 3-6
    assert [len(x) for x in rest] == [4] * new
    seen += [key for x in rest for key in keys(x, key_of)]
    assert len(seen) == len(set(seen)) == RECORDS and sorted(seen) == sorted(key_of.values())
    assert [loader.state_dict() for loader in after] == states
