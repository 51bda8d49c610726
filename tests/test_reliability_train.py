"""Training under hostile conditions (issue 13): an object-store outage, a torn metrics line, a
full disk during an atomic write, a half-deleted checkpoint, out-of-range config values.

Each test writes its hostile input itself. The outage test runs the real entry point against a
moto S3 API on 127.0.0.1 that the test takes down and brings back.
"""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch

from conftest import PROJECT_ROOT, free_port, synthetic_shards
from sapretrain import storage
from sapretrain.config import ConfigError, load_config

PRETRAIN = str(PROJECT_ROOT / "launch" / "pretrain.py")
DEMO = str(PROJECT_ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 records of synthetic scenes (64 px) in 8 shards of 4."""
    return synthetic_shards(tmp_path_factory.mktemp("reliability-data"), scenes=64, shard_size=4)


# ----------------------------------------------------------------- transient storage errors


def _botocore_errors():
    from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError,
                                     NoCredentialsError, ReadTimeoutError)

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                 ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
                 ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
                 client_error("InternalError", 500), client_error("ServiceUnavailable", 503),
                 client_error("SlowDown", 503), client_error("503", 503)]
    permanent = [client_error("NoSuchKey", 404), client_error("AccessDenied", 403), NoCredentialsError()]
    return transient, permanent


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def test_transient_storage_errors_are_told_from_permanent_ones():
    import aiohttp
    from fsspec.exceptions import FSTimeoutError

    boto_transient, boto_permanent = _botocore_errors()
    transient = boto_transient + [
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ConnectionResetError(), TimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"), OSError(errno.EHOSTUNREACH, "no route"),
        aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut short"),
        aiohttp.ClientResponseError(None, (), status=502), FSTimeoutError(),
        _chained(OSError(errno.EBUSY, "Service Unavailable"), boto_transient[4]),  # how s3fs reports a 503
        _chained(OSError(errno.EIO, "wrapped"), ConnectionResetError()),
    ]
    permanent = boto_permanent + [
        FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad"), tarfile.ReadError("bad tar"),
        OSError(errno.EIO, "disk"), EOFError(), aiohttp.ClientResponseError(None, (), status=404),
        _chained(FileNotFoundError("404 after a retry"), ConnectionResetError()),  # the last word counts
        _chained(OSError(errno.ENOENT, "not found"), boto_permanent[0]),
    ]
    assert [e for e in transient if not storage.is_transient(e)] == []
    assert [e for e in permanent if storage.is_transient(e)] == []


class FlakyFile(io.BytesIO):
    """A file whose reads fail with ``error`` once ``fail_at`` bytes of it have been read."""

    def __init__(self, data: bytes, fail_at: int | None, error: BaseException):
        super().__init__(data)
        self.fail_at, self.error = fail_at, error

    def read(self, size=-1):
        if self.fail_at is not None and self.tell() + (size if size >= 0 else 1 << 62) > self.fail_at:
            raise self.error
        return super().read(size)


def test_a_read_cut_by_transient_errors_continues_at_the_byte_it_reached():
    data = bytes(range(256)) * 400  # 100 KiB
    opens = []

    def open_file():  # the 1st and 2nd connections break part-way, the 3rd holds
        opens.append(1)
        fail_at = {1: 30_000, 2: 70_000}.get(len(opens))
        return FlakyFile(data, fail_at, ConnectionResetError("reset by peer"))

    reader = storage.RetryingReader(open_file, "mem://flaky", seconds=10)
    out = b"".join(iter(lambda: reader.read(10_240), b""))
    assert out == data and len(opens) == 3

    # A tar read through it in stream mode (as the loader does) gets every member.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(5):
            payload = os.urandom(20_000)
            info = tarfile.TarInfo(f"{i:03d}.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw, opens[:] = buf.getvalue(), []
    reader = storage.RetryingReader(lambda: (opens.append(1), FlakyFile(raw, 45_000 if len(opens) == 1 else None,
                                                                         TimeoutError()))[1], "mem://tar", 10)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        names = [m.name for m in tar if tar.extractfile(m).read()]
    assert names == [f"{i:03d}.bin" for i in range(5)] and len(opens) == 2


def test_an_outage_longer_than_the_budget_raises_storage_unavailable_in_bounded_time():
    attempts = []

    def refused():
        attempts.append(time.monotonic())
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")

    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=r"s3://b/shard-000003.tar: storage unreachable.*"
                                                         r"ConnectionRefusedError") as caught:
        storage.retry_transient(refused, "s3://b/shard-000003.tar", seconds=1.0)
    assert 1.0 <= time.monotonic() - start < 3.0
    assert 3 <= len(attempts) <= 8  # backed off, not a busy loop
    assert not isinstance(caught.value, OSError)  # so no "skip unreadable content" handler catches it
    # Permanent errors are not retried at all.
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.retry_transient(missing, "s3://b/gone.tar", seconds=10)
    assert calls == [1]


def _loader_batches(cfg, limit=None):
    from sapretrain.data.loader import build_loader

    loader = build_loader(cfg, _preprocess, 0, 1, context_length=77)
    out = []
    for batch in loader:
        out.append(batch["text"].clone())
        if limit and len(out) >= limit:
            break
    return out, loader.stats()


def _preprocess(image):
    import numpy as np

    return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


def test_loader_waits_out_a_short_outage_and_stops_on_a_long_one(shards, monkeypatch):
    """In-process (workers=0): a shard whose connection breaks mid-read gives the same batches;
    one that stays unreachable stops the loader with StorageUnavailable, nothing skipped."""
    from sapretrain.data import loader as loader_mod
    from sapretrain.data.loader import LoaderConfig

    cfg = LoaderConfig(shards=str(shards), batch_pairs=8, workers=0, shuffle_buffer=8, image_size=32,
                       storage_retry_seconds=1.0)
    intact, intact_stats = _loader_batches(cfg)
    assert len(intact) == 4 and intact_stats["bad_shards"] == {}

    victim = str(shards / "shard-000005.tar")
    state = {"breaks": 2, "down": False}

    def flaky_open(url, seconds):
        def open_file():
            f = open(url, "rb")
            if url != victim:
                return f
            if state["down"]:
                f.close()
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
            if state["breaks"]:
                state["breaks"] -= 1
                data = f.read()
                f.close()
                return FlakyFile(data, 5_000, ConnectionResetError("Connection reset by peer"))
            return f

        return storage.RetryingReader(open_file, url, seconds)

    monkeypatch.setattr(loader_mod, "open_shard", flaky_open)
    recovered, stats = _loader_batches(cfg)
    assert state["breaks"] == 0  # the outage happened
    assert stats["bad_shards"] == {} and stats["missing_records"] == 0 and stats["reread_records"] == 0
    assert len(recovered) == len(intact) and all(torch.equal(a, b) for a, b in zip(recovered, intact))

    state["down"] = True
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="shard-000005.tar: storage unreachable"):
        _loader_batches(cfg)
    assert time.monotonic() - start < 30


class FlakyS3:
    """A moto S3 API on 127.0.0.1 that goes away on cue.

    ``plan`` maps the number of shard opens served (HEAD of a ``*.tar``) to an outage starting at
    the next one: ``("503", seconds)`` answers 503 Service Unavailable for that long, ``("down",
    None)`` stops the server (connection refused) until ``start()``. One request per connection
    (HTTP/1.0), so no kept-alive connection outlives a stop.
    """

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

        class OneShot(MotoRequestHandler):
            protocol_version = "HTTP/1.0"

        self.handler, self.backend = OneShot, DomainDispatcherApplication(create_backend_app)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.plan: dict[int, tuple[str, float | None]] = {}
        self.opens, self.failed, self.until = 0, 0, 0.0
        self.lock = threading.Lock()
        self.server = None

    def __call__(self, environ, start_response):
        is_open = environ["REQUEST_METHOD"] == "HEAD" and environ.get("PATH_INFO", "").endswith(".tar")
        with self.lock:
            if is_open and time.monotonic() >= self.until:
                event = self.plan.pop(self.opens, None)
                if event is not None:
                    mode, seconds = event
                    self.until = time.monotonic() + (seconds if mode == "503" else 1e9)
                    if mode == "down":
                        threading.Thread(target=self.stop, daemon=True).start()
                else:
                    self.opens += 1
            failing = time.monotonic() < self.until
            self.failed += failing
        if failing:
            body = b"" if environ["REQUEST_METHOD"] == "HEAD" else (
                b"<Error><Code>ServiceUnavailable</Code><Message>down for the test</Message></Error>")
            start_response("503 Service Unavailable", [("Content-Type", "application/xml"),
                                                       ("Content-Length", str(len(body)))])
            return [body]
        return self.backend(environ, start_response)

    def start(self) -> None:
        from werkzeug.serving import make_server

        self.until = 0.0
        self.server = make_server("127.0.0.1", self.port, self, threaded=True, request_handler=self.handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()  # connections are refused from now on


@pytest.fixture
def flaky_s3(monkeypatch):
    server = FlakyS3()
    server.start()
    for key, value in s3_env_vars(server.endpoint).items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def s3_env_vars(endpoint: str) -> dict[str, str]:
    # One botocore attempt per call: the outage is then waited out by storage.retry_transient
    # alone, in test time (botocore's own retries would add several seconds per attempt).
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}


def train_args(shards: str, out, steps: int, **extra) -> list[str]:
    values = {
        "model.name": "sa-tiny", "model.pretrained": "null", "model.lock_image": "false",
        "data.shards": shards, "data.batch_pairs": 8, "data.workers": 1, "data.shuffle_buffer": 4,
        "optim.steps": steps, "optim.warmup_steps": 2, "optim.lr": 1e-3,
        "run.precision": "no", "run.log_every": 1, "run.checkpoint_every": 1, "run.keep_checkpoints": 2,
        "run.trackers": "[]", "run.output_dir": str(out), **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_pretrain(args: list[str], env: dict[str, str], timeout: int = 300, resume: bool = True):
    cmd = [sys.executable, PRETRAIN, "--config", DEMO] + (["--resume", "auto"] if resume else []) + args
    return subprocess.run(cmd, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)


def step_losses(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


@pytest.mark.slow
def test_s3_outage_stops_the_run_and_resume_gives_the_uninterrupted_curve(shards, tmp_path, flaky_s3):
    """8 steps over 2 epochs of 8 shards from S3. The outage run has a 1 s outage (503s, within
    the 3 s budget) at its 3rd shard open, then the server goes down for good at its 14th (the 6th
    of epoch 1, so the stop falls mid-epoch, after step 6): the run must wait out the first, stop
    with a clear error on the second (exit != 0, no shard skipped), and ``--resume auto`` once the
    server is back must give the uninterrupted run's curve."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("outage-test")
    fs.put(str(shards), "outage-test/shards", recursive=True)
    env = s3_env_vars(flaky_s3.endpoint)
    remote = "s3://outage-test/shards"
    budget = {"data.storage_retry_seconds": 3}

    reference = tmp_path / "reference"
    run = run_pretrain(train_args(remote, reference, 8, **budget), env)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = step_losses(reference)
    assert sorted(ref) == list(range(1, 9))
    reference_opens = flaky_s3.opens
    assert reference_opens >= 16 and flaky_s3.failed == 0  # both epochs read every shard

    flaky_s3.opens, flaky_s3.plan = 0, {2: ("503", 1.0), 13: ("down", None)}
    out = tmp_path / "outage"
    started = time.monotonic()
    stopped = run_pretrain(train_args(remote, out, 8, **budget), env)
    assert stopped.returncode != 0
    assert flaky_s3.server is None and flaky_s3.failed >= 2  # both outages happened
    assert "retrying for up to 3 s" in stopped.stderr  # the short one was waited out ...
    message = [line for line in stopped.stderr.splitlines() if line.startswith("training stopped after step")]
    assert len(message) == 1, stopped.stderr[-3000:]  # ... the long one stopped the run, in one clear line
    assert "s3://outage-test/shards/shard-0000" in message[0] and "storage unreachable" in message[0]
    assert "No data was skipped" in message[0] and "--resume auto" in message[0]
    assert "Traceback" not in stopped.stderr
    assert "skipped and counted" not in stopped.stderr and "reading its" not in stopped.stderr  # no skip, no top-up
    assert time.monotonic() - started < 240
    done = sorted(p.parent.name for p in (out / "checkpoints").glob("step-*/DONE"))
    assert done and done[-1] < "step-00000008", done  # stopped mid-run, after some checkpoints
    stopped_at = int(message[0].split("after step ")[1].split(":")[0])
    assert 0 < stopped_at < 8 and done[-1] == f"step-{stopped_at:08d}"

    flaky_s3.start()  # the storage is back
    resumed = run_pretrain(train_args(remote, out, 8, **budget), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{stopped_at:08d}" in resumed.stdout
    got = step_losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


# ----------------------------------------------------------------- checkpoints and atomic writes


def make_checkpoint(root, step: int, done: bool = True):
    from sapretrain.train.checkpoint import checkpoint_dir

    path = checkpoint_dir(str(root), step)
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/state.pt", "wb") as f:
        f.write(b"weights")
    if done:
        open(f"{path}/DONE", "wb").close()
    return path


def step_dirs(root) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir())


@pytest.mark.parametrize("keep, left", [(0, [2, 4, 6, 8]), (1, [8]), (3, [4, 6, 8])])
def test_pruning_never_deletes_the_newest_and_zero_keeps_all(tmp_path, keep, left):
    from sapretrain.train.checkpoint import latest_checkpoint, prune

    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    prune(str(tmp_path), keep)
    assert step_dirs(tmp_path) == [f"step-{s:08d}" for s in left]
    assert latest_checkpoint(str(tmp_path)).endswith("step-00000008")


def test_keep_checkpoints_below_zero_is_rejected_by_the_config():
    from sapretrain.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"run.keep_checkpoints=-1: must be >= 1 .* or 0 to keep all"):
        load_config(TrainConfig, DEMO, ["run.keep_checkpoints=-1"])


def test_checkpoint_dirs_without_done_are_removed_when_older_and_never_loaded(tmp_path):
    from sapretrain.train.checkpoint import complete_checkpoints, latest_checkpoint, prune
    from sapretrain.train.trainer import resolve_resume

    make_checkpoint(tmp_path, 2)
    torn_prune = make_checkpoint(tmp_path, 3, done=False)  # a prune interrupted after DONE went
    make_checkpoint(tmp_path, 4)
    in_progress = make_checkpoint(tmp_path, 6, done=False)  # newer than every complete one: maybe being written
    assert latest_checkpoint(str(tmp_path)).endswith("step-00000004")
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 4]
    with pytest.raises(SystemExit, match="no DONE"):
        resolve_resume(in_progress, str(tmp_path))
    removed = prune(str(tmp_path), keep=3)
    assert removed == [torn_prune]
    assert step_dirs(tmp_path) == ["step-00000002", "step-00000004", "step-00000006"]


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import builtins

    target = tmp_path / "ckpt" / "state.pt"
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # a short write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if ".tmp." in str(path) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes_atomic(str(target), b"x" * 1_000_000)
    monkeypatch.undo()
    assert list((tmp_path / "ckpt").iterdir()) == []  # neither the file nor a temp copy

    # commit(): a failed rename removes the finished temporary file too.
    tmp = storage.local_temp_for(str(target))
    with open(tmp, "wb") as f:
        f.write(b"payload")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        storage.commit(tmp, str(target))
    monkeypatch.undo()
    assert list((tmp_path / "ckpt").iterdir()) == []


# ----------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_does_not_break_resume(tmp_path, capsys):
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import MetricsLog

    cfg = load_config(TrainConfig, DEMO, [f"run.output_dir={tmp_path}"])
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    # Steps 1-5 logged, the write of step 6 cut short by a full disk.
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "loss": 0.1')

    class Rank0:
        is_main_process = True

    MetricsLog(cfg, Rank0(), start_step=4)
    assert path.read_text().splitlines() == lines[:4]
    assert "dropped 1 line(s) that do not parse" in capsys.readouterr().out

    # A last line that parses but lost its newline is kept (and ended), a line of another shape dropped.
    path.write_text("\n".join(lines[:3]) + "\n[1, 2]\n" + lines[3])
    MetricsLog(cfg, Rank0(), start_step=4)
    assert path.read_text() == "\n".join(lines[:4]) + "\n"


# ----------------------------------------------------------------- config ranges


@pytest.mark.parametrize("override, key", [
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0"),
    ("optim.steps=0", "optim.steps=0"),
    ("optim.steps=-5", "optim.steps=-5"),
    ("run.checkpoint_every=0", "run.checkpoint_every=0"),
    ("run.log_every=0", "run.log_every=0"),
    ("optim.accum_freq=0", "optim.accum_freq=0"),
    ("optim.lr=0", "optim.lr=0.0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("optim.lr=.nan", "optim.lr=nan"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
    ("optim.eps=0", "optim.eps=0.0"),
    ("data.batch_pairs=0", "data.batch_pairs=0"),
    ("data.shards=", "data.shards=''"),
    ("data.workers=-1", "data.workers=-1"),
    ("data.storage_retry_seconds=-1", "data.storage_retry_seconds=-1.0"),
    ("optim.accum_freq=3", "data.batch_pairs=64"),  # 64 pairs do not split into 3 micro-batches
    ("run.precision=fp32", "run.precision='fp32'"),
    ("loss.temperature=.nan", "loss.temperature=nan"),
    ("loss.margin=-0.2", "loss.margin=-0.2"),
    ("loss.w_triplet=-1", "loss.w_triplet=-1.0"),
])
def test_out_of_range_config_values_fail_as_the_config_loads(override, key):
    from sapretrain.train.config import TrainConfig

    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, DEMO, [override])
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


def test_grad_clip_zero_or_null_means_no_clipping_and_defaults_are_valid():
    from sapretrain.train.config import TrainConfig

    assert load_config(TrainConfig, DEMO, ["optim.grad_clip=0"]).optim.grad_clip == 0
    assert load_config(TrainConfig, DEMO, ["optim.grad_clip=null"]).optim.grad_clip is None
    assert TrainConfig().optim.steps > 0
    for name in sorted(os.listdir(PROJECT_ROOT / "configs")):
        if name.startswith(("demo", "paper")):
            load_config(TrainConfig, PROJECT_ROOT / "configs" / name)  # every shipped config still loads


def test_the_entry_point_rejects_a_bad_value_before_any_set_up(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_entry", PRETRAIN)
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    status = pretrain.main(["--config", DEMO, f"run.output_dir={tmp_path / 'run'}", "optim.grad_clip=-1"])
    assert status == 2
    assert "config error: optim.grad_clip=-1.0: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was set up


def test_batch_that_does_not_split_over_ranks_and_micro_batches_fails_before_the_model_is_built(tmp_path):
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import check_world_size

    cfg = load_config(TrainConfig, DEMO, ["data.batch_pairs=12", "optim.accum_freq=4"])
    check_world_size(cfg, 1)
    check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"data.batch_pairs=12 must be a multiple of the world size 2 times "
                                          r"optim.accum_freq=4.*data.batch_pairs=16"):
        check_world_size(cfg, 2)
