"""Persistent DataLoader workers (data.persistent_workers, issue 17): one set of worker processes
serves epoch after epoch, with the batches, the resume positions and the counts of a DataLoader
started per epoch (persistent_workers=false); a position changed from outside stops them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import PROJECT_ROOT, partner_shards
from sapretrain.data import loader as loader_module
from sapretrain.data.loader import LoaderConfig, build_loader
from test_loader import corrupt_copy

RECORDS, SHARD_SIZE = 24, 4  # 6 shards
PREPROCESS = open_clip.transform.image_transform(32, is_train=False)

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return partner_shards(tmp_path_factory.mktemp("persistent"), RECORDS, SHARD_SIZE, 64)


def config(shards, **kw) -> LoaderConfig:
    # batch_pairs 5: 4 batches per epoch, not a multiple of 3 workers; 7: 3 batches, not one of 2;
    # 12: 2 batches for 3 workers (one has none in each epoch).
    return LoaderConfig(**{"shards": str(shards), "batch_pairs": 5, "workers": 3, "shuffle_buffer": 3, **kw})


def epochs(loader, n: int) -> list[list[dict]]:
    """``n`` epochs' batches, one ``for batch in loader`` per epoch as the trainer iterates."""
    return [list(loader) for _ in range(n)]


def batches(loader, n: int) -> list[dict]:
    """The next ``n`` batches, iterating again at each epoch's end and leaving the iteration after
    the n-th (as the trainer does at its last step)."""
    out: list[dict] = []
    while len(out) < n:
        it = iter(loader)
        try:
            for batch in it:
                out.append(batch)
                if len(out) == n:
                    break
        finally:
            it.close()
    return out


def assert_same(xs: list[dict], ys: list[dict], keys=None) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.keys() == y.keys()
        for key in keys or x:
            assert torch.equal(x[key], y[key]), f"batch {i}: {key} differs"


def pid_image(image) -> torch.Tensor:
    """A preprocess whose 'image' is the id of the process that made it."""
    return torch.full((3, 2, 2), float(os.getpid()))


def pids(batches: list[dict]) -> set[int]:
    return {int(p) for b in batches for p in b["image"][:, 0, 0, 0].tolist()}


def gone(pid: int, seconds: float = 20) -> bool:
    """Whether process ``pid`` ended (and was reaped) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("workers, batch_pairs, resampled",
                         [(1, 5, False), (2, 7, False), (3, 5, False), (3, 12, False), (3, 5, True)])
def test_persistent_workers_give_the_batches_of_per_epoch_workers(shards, workers, batch_pairs, resampled):
    kw = dict(workers=workers, batch_pairs=batch_pairs, resampled=resampled)
    per_epoch = build_loader(config(shards, persistent_workers=False, **kw), PREPROCESS, 0, 1)
    persistent = build_loader(config(shards, **kw), PREPROCESS, 0, 1)
    n = 3 * len(persistent) + 1  # into a fourth epoch
    if resampled:  # one iteration for ever: epochs are chunks between reseeds
        reference, got = batches(per_epoch, n), batches(persistent, n)
    else:
        reference, got = sum(epochs(per_epoch, 3), []), sum(epochs(persistent, 3), [])
        assert (persistent.epoch, persistent.batch) == (3, 0)
        reference.append(batches(per_epoch, 1)[0])
        got.append(batches(persistent, 1)[0])
    assert len(got) == n == 3 * (RECORDS // batch_pairs) + 1
    assert_same(got, reference)
    assert persistent.state_dict() == per_epoch.state_dict()
    assert persistent.stats() == per_epoch.stats()


def test_the_same_worker_processes_serve_every_epoch_until_close(shards):
    persistent = build_loader(config(shards), pid_image, 0, 1)
    seen = [pids(epoch) for epoch in epochs(persistent, 3)]
    assert len(seen[0]) == 3 and os.getpid() not in seen[0]
    assert seen[0] == seen[1] == seen[2]
    persistent.close()
    assert all(gone(pid) for pid in seen[0])
    persistent.close()  # idempotent
    again = pids(list(persistent))  # new workers, at the position
    assert len(again) == 3 and not again & seen[0] and persistent.epoch == 4

    per_epoch = build_loader(config(shards, persistent_workers=False), pid_image, 0, 1)
    seen = [pids(epoch) for epoch in epochs(per_epoch, 3)]
    assert all(len(s) == 3 for s in seen) and not seen[0] & seen[1] and not seen[1] & seen[2]

    in_process = build_loader(config(shards, workers=0), pid_image, 0, 1)
    assert [pids(epoch) for epoch in epochs(in_process, 2)] == [{os.getpid()}] * 2


@pytest.mark.parametrize("k", [6, 4])  # mid-epoch 1; after the last batch of epoch 0
def test_resume_and_continuing_after_leaving_the_iteration_are_exact(shards, k):
    cfg = config(shards)
    full = batches(build_loader(cfg, PREPROCESS, 0, 1), 12)  # 3 epochs of 4

    interrupted = build_loader(cfg, PREPROCESS, 0, 1)
    assert_same(batches(interrupted, k), full[:k])
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == ((1, 2) if k == 6 else (0, 4))
    # Left after batch k, with the next ones prefetched: the same loader goes on with batch k.
    assert_same(batches(interrupted, 12 - k), full[k:])

    restored = build_loader(cfg, PREPROCESS, 0, 1)
    restored.load_state_dict(state)
    assert_same(batches(restored, 12 - k), full[k:])

    # The position at an epoch's start as the trainer's loop writes it (the epoch's iteration ended).
    ended = build_loader(cfg, PREPROCESS, 0, 1)
    list(ended)
    assert (ended.state_dict()["epoch"], ended.state_dict()["batch"]) == (1, 0)
    restored = build_loader(cfg, PREPROCESS, 0, 1)
    restored.load_state_dict(ended.state_dict())
    assert_same(batches(restored, 8), full[4:])


def test_load_state_dict_stops_the_workers_and_drops_their_prefetched_batches(shards):
    cfg = config(shards, workers=2)
    reference = batches(build_loader(config(shards, workers=2, persistent_workers=False), pid_image, 0, 1), 10)
    early = build_loader(cfg, pid_image, 0, 1)
    batches(early, 2)
    state = early.state_dict()

    loader = build_loader(cfg, pid_image, 0, 1)
    first = batches(loader, 6)  # into epoch 1: its next batches are prefetched
    assert_same(first, reference[:6], keys=["text", "spans", "groups"])
    old = pids(first)
    loader.load_state_dict(state)
    assert all(gone(pid) for pid in old)
    again = batches(loader, 8)
    assert_same(again, reference[2:], keys=["text", "spans", "groups"])
    assert not pids(again) & old

    # An iteration suspended when the position changes ends; the next one starts there.
    it = iter(loader)
    next(it)
    loader.load_state_dict(state)
    with pytest.raises(StopIteration):
        next(it)
    assert_same(batches(loader, 3), reference[2:5], keys=["text", "spans", "groups"])


def test_skipped_records_are_counted_once_per_epoch(shards, tmp_path):
    bad = corrupt_copy(shards, tmp_path)
    kw = dict(batch_pairs=2, workers=2)
    per_epoch = build_loader(config(bad, persistent_workers=False, **kw), PREPROCESS, 0, 1)
    persistent = build_loader(config(bad, **kw), PREPROCESS, 0, 1)
    stats = []
    for _ in range(2):
        assert_same(list(persistent), list(per_epoch))
        assert persistent.stats() == per_epoch.stats()
        stats.append(persistent.stats())
    assert stats[0]["dropped"] == {"bad_image": 1} and stats[1]["dropped"] == {"bad_image": 2}
    assert stats[1]["missing_records"] == 2 * stats[0]["missing_records"] > 0
    assert stats[1]["batches"] == 24

    # Leaving the iteration mid-epoch and going on does not count the epoch's problems twice.
    split = build_loader(config(bad, **kw), PREPROCESS, 0, 1)
    batches(split, 5)
    batches(split, 7)
    assert split.stats() == stats[0]


def test_elastic_resume_then_later_epochs_from_the_same_workers(shards):
    old = build_loader(config(shards, workers=2), PREPROCESS, 0, 1)
    batches(old, 2)
    state = old.state_dict()
    runs = []
    for persistent in (True, False):
        loader = build_loader(config(shards, workers=3, persistent_workers=persistent), PREPROCESS, 0, 1)
        assert loader.needs_every_rank(state)
        loader.load_state_dict(state, every_rank=[state])
        runs.append(batches(loader, 2 + 4 + 4))  # the re-planned epoch 0, then epochs 1 and 2
    assert_same(runs[0], runs[1])
    uninterrupted = batches(build_loader(config(shards, workers=3), PREPROCESS, 0, 1), 12)
    assert_same(runs[0][2:], uninterrupted[4:])


class Tracked:
    """A shard stream that records whether it was closed."""

    def __init__(self, stream):
        self.stream, self.closed = stream, False

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.closed = True
        self.stream.close()


def test_a_finished_epoch_frees_its_shard_streams(shards, monkeypatch):
    # Resampled: a reader stops mid-shard at its quota, with records in its shuffle buffer; a
    # worker's endless stream must not keep that epoch's pipeline (open shard, buffer) for the run.
    opened: list[Tracked] = []
    real = loader_module.open_shard
    monkeypatch.setattr(loader_module, "open_shard", lambda url, *a: opened.append(Tracked(real(url, *a))) or opened[-1])
    loader = build_loader(config(shards, workers=1, resampled=True, shuffle_buffer=6), PREPROCESS, 0, 1)
    stream = iter(loader_module._RankStream(loader, 0, 0, [0], {}, persistent=True))  # in this process
    infos = [next(stream)[1] for _ in range(len(loader))]
    assert {info["epoch"] for info in infos} == {0}
    first = len(opened)
    assert next(stream)[1]["epoch"] == 1
    assert first > 0 and all(s.closed for s in opened[:first])


def test_workers_still_running_at_interpreter_exit_are_stopped_cleanly(shards):
    # A loader alive at exit (a global here; in the trainer, one held by a traceback) whose workers
    # are prefetching the next epoch: stopped before multiprocessing's exit handler would terminate
    # them (torch's SIGCHLD check then reports a failure and workers may be left unjoined).
    code = f"""
import atexit, multiprocessing, multiprocessing.util, os
atexit.register(lambda: print("left", len(multiprocessing.active_children())))  # runs just before mp's
import torch
from sapretrain.data import loader as loader_module
from sapretrain.data.loader import LoaderConfig, build_loader
def pid_image(image):
    return torch.full((3, 2, 2), float(os.getpid()))
loader = build_loader(LoaderConfig(shards={str(shards)!r}, batch_pairs=5, workers=2), pid_image, 0, 1)
print(*{{int(p) for b in loader for p in b["image"][:, 0, 0, 0].tolist()}}, flush=True)
"""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    workers, left = done.stdout.splitlines()
    assert left == "left 0"
    assert len(workers.split()) == 2 and all(gone(int(pid), 5) for pid in workers.split())
