"""Tracking on clusters and the finite-loss check (issue 17, items 5 and 6a).

- run.json: one run id per output directory, the same across resumes; the trackers' init_kwargs
  (W&B resume, TensorBoard purge) built from it.
- An s3:// output (moto): logs copied to {output}/logs at checkpoints, on a preemption stop and at
  the end; a resume on a fresh node (local mirror deleted) brings them back; metrics.jsonl and the
  TensorBoard events hold every step once. A failed copy warns and training goes on.
- The finite check runs on the device each step and is read at log steps and before checkpoints:
  a NaN at a non-log step stops the run at the next of those, naming its step.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch

from conftest import synthetic_shards
from sapretrain.config import load_config
from sapretrain.train import tracking
from sapretrain.train import trainer
from sapretrain.train.checkpoint import load_tensor_file
from sapretrain.train.config import TrainConfig
from sapretrain.train.trainer import REQUEUE_EXIT_CODE, FiniteCheck, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 records of synthetic scenes (64 px) in 4 shards: 4 batches of 4 pairs per epoch."""
    return synthetic_shards(tmp_path_factory.mktemp("tracking-data"), scenes=32, shard_size=4)


def tiny(shards, out, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "model.name=sa-tiny", "model.pretrained=null", "model.lock_image=false", f"data.shards={shards}",
        "data.batch_pairs=4", "data.workers=0", "data.shuffle_buffer=8", "data.image_size=64",
        "optim.steps=8", "optim.warmup_steps=1", "optim.lr=1e-3", "run.precision=no", "run.log_every=1",
        "run.checkpoint_every=100", "run.trackers=[]", f"run.output_dir={out}", *overrides,
    ])


def at_step(monkeypatch, actions: dict):
    """Run ``actions[step](batch)`` just before optimizer step ``step`` of the trainer's loop."""
    real = trainer.optimizer_step

    def step(cfg, accelerator, model, loss_fn, optimizer, scheduler, batch, n, finite=None):
        if n in actions:
            actions[n](batch)
        return real(cfg, accelerator, model, loss_fn, optimizer, scheduler, batch, n, finite)

    monkeypatch.setattr(trainer, "optimizer_step", step)


def steps_of(metrics: bytes) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.splitlines() if b'"loss"' in line]


# ----- run id and tracker arguments


def test_run_id_is_written_once_and_read_on_every_start(tmp_path, capsys):
    first = tracking.run_identity(str(tmp_path / "out"))
    assert "tracked run out (id " in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == first
    assert first["name"] == "out" and first["id"].isalnum() and len(first["id"]) == 16
    assert tracking.run_identity(str(tmp_path / "out") + "/") == first
    assert tracking.run_identity(str(tmp_path / "other"))["id"] != first["id"]

    (tmp_path / "out" / "run.json").write_text("[]")
    with pytest.raises(SystemExit, match="no run id in it"):
        tracking.run_identity(str(tmp_path / "out"))


def test_init_kwargs_resume_the_wandb_run_and_purge_retrained_tensorboard_steps():
    run = {"id": "0123abcd", "name": "paper"}
    fresh, resumed = tracking.tracker_init_kwargs(run, 0, "runs/paper"), tracking.tracker_init_kwargs(run, 300, "runs/paper")
    assert fresh["wandb"] == {"id": "0123abcd", "resume": "allow", "name": "paper", "dir": "runs/paper"}
    assert resumed["wandb"] == fresh["wandb"]
    assert (fresh["tensorboard"], resumed["tensorboard"]) == ({"purge_step": 1}, {"purge_step": 301})
    assert tracking.remote_logs("s3://b/runs/paper/") == "s3://b/runs/paper/logs"
    assert tracking.remote_logs("runs/paper") is None


# ----- an s3:// output: logs copied, restored on a fresh node, every step once


def tensorboard_steps(directory) -> list[int]:
    """Steps of the ``loss`` scalar as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars("loss")]


def test_s3_run_keeps_its_logs_and_run_id_across_a_crash_a_requeue_and_a_fresh_node(
        shards, tmp_path, s3_env, monkeypatch, capsys):
    from accelerate import Accelerator

    fs = s3_env
    fs.mkdir("track-test")
    out = "s3://track-test/runs/r1"
    monkeypatch.chdir(tmp_path)  # the local mirror: runs/r1
    mirror = tmp_path / "runs" / "r1"
    cfg = tiny(shards, out, "run.checkpoint_every=3", "run.trackers=[tensorboard]")
    captured = []
    real_init = Accelerator.init_trackers

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        captured.append(init_kwargs)
        return real_init(self, project_name, config=config, init_kwargs=init_kwargs)

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)

    def crash(batch):
        raise RuntimeError("node lost")

    # 1. The node dies in step 5: checkpoint at step 3, steps 1-4 logged on the node.
    with monkeypatch.context() as m:
        at_step(m, {5: crash})
        with pytest.raises(RuntimeError, match="node lost"):
            train(cfg, resume="auto")
    assert steps_of((mirror / "metrics.jsonl").read_bytes()) == [1, 2, 3, 4]
    assert steps_of(fs.cat("track-test/runs/r1/logs/metrics.jsonl")) == [1, 2, 3]  # copied at the checkpoint
    assert fs.exists("track-test/runs/r1/logs/training.png")
    assert fs.glob("track-test/runs/r1/logs/sapretrain/events.out.tfevents.*")
    run = json.loads(fs.cat("track-test/runs/r1/run.json"))

    # 2. Requeued on the same node, preempted (SIGUSR1) in step 5: steps 4-5 trained again.
    with monkeypatch.context() as m:
        at_step(m, {5: lambda batch: os.kill(os.getpid(), signal.SIGUSR1)})
        with pytest.raises(SystemExit) as stop:
            train(cfg, resume="auto")
    assert stop.value.code == REQUEUE_EXIT_CODE
    assert steps_of(fs.cat("track-test/runs/r1/logs/metrics.jsonl")) == [1, 2, 3, 4, 5]
    assert tensorboard_steps(mirror / "sapretrain") == [1, 2, 3, 4, 5]  # step 4 of the crashed start purged

    # 3. A fresh node: no local mirror. The logs come back from S3, the run ends at step 8.
    shutil.rmtree(mirror)
    capsys.readouterr()
    assert train(cfg, resume="auto").step == 8
    printed = capsys.readouterr().out
    assert "restored" in printed and "from s3://track-test/runs/r1/logs (logged steps up to 5)" in printed
    assert "logs copied to s3://track-test/runs/r1/logs" in printed
    remote = fs.cat("track-test/runs/r1/logs/metrics.jsonl")
    assert steps_of(remote) == list(range(1, 9)) and remote == (mirror / "metrics.jsonl").read_bytes()
    assert all(math.isfinite(json.loads(line)["loss"]) for line in remote.splitlines())
    fs.get("track-test/runs/r1/logs/sapretrain/", str(tmp_path / "tb") + "/", recursive=True)
    assert tensorboard_steps(tmp_path / "tb") == list(range(1, 9))

    # One run id throughout: W&B would resume the same run on every start.
    assert json.loads(fs.cat("track-test/runs/r1/run.json")) == run
    assert len(captured) == 3
    assert [k["wandb"]["id"] for k in captured] == [run["id"]] * 3
    assert [k["wandb"]["resume"] for k in captured] == ["allow"] * 3
    assert [k["tensorboard"]["purge_step"] for k in captured] == [1, 4, 6]


def test_a_failed_log_copy_warns_and_training_goes_on(shards, tmp_path, s3_env, monkeypatch, capsys):
    fs = s3_env
    fs.mkdir("track-fail")
    monkeypatch.chdir(tmp_path)

    def refuse(self, fn, what):
        if what.startswith("write"):
            raise PermissionError("Access Denied")
        return fn()

    monkeypatch.setattr(tracking.LogMirror, "_retry", refuse)
    cfg = tiny(shards, "s3://track-fail/r2", "optim.steps=2", "run.checkpoint_every=1")
    assert train(cfg).step == 2
    err = capsys.readouterr().err
    assert err.count("warning: could not copy the logs runs/r2 to s3://track-fail/r2/logs: PermissionError: "
                     "Access Denied; training goes on") == 3  # two checkpoints and the end
    assert fs.exists("track-fail/r2/checkpoints/step-00000002/DONE")
    assert not fs.exists("track-fail/r2/logs/metrics.jsonl")


def test_a_missing_remote_copy_is_no_restore_and_an_unreachable_one_a_warning(tmp_path, s3_env, capsys):
    s3_env.mkdir("track-empty")
    assert tracking.LogMirror(str(tmp_path / "a"), "s3://track-empty/r/logs").restore(10) is False
    assert not (tmp_path / "a").exists()
    mirror = tracking.LogMirror(str(tmp_path / "b"), "s3://track-no-such-bucket/r/logs")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert mirror.sync() is False
    assert "warning: could not copy the logs" in capsys.readouterr().err


def test_last_step_counts_parsed_lines_up_to_the_resume_step():
    metrics = b'{"step": 1, "loss": 2}\n{"step": 2, "val/loss": 1}\n{"step": 3, "loss"\n{"step": 9}\n'
    assert tracking.last_step(metrics, 5) == 2 and tracking.last_step(metrics, 100) == 9
    assert tracking.last_step(b"", 5) == -1


# ----- the finite-loss check


class OneRank:
    num_processes = 1


def test_finite_check_keeps_the_first_bad_step_and_its_terms():
    check = FiniteCheck()
    term = lambda v: torch.tensor(v)  # noqa: E731
    check.record(1, {"a_loss": term(1.0), "b_loss": term(2.0)})
    check.raise_if_bad(OneRank(), 1)  # all finite: nothing
    check.record(2, {"a_loss": term(1.0), "b_loss": term(float("inf"))})
    check.record(3, {"a_loss": term(float("nan")), "b_loss": term(float("nan"))})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: a_loss=1, b_loss=inf \(seen at step 3"):
        check.raise_if_bad(OneRank(), 3)


def poison(batch):
    batch["image"].mul_(float("nan"))


def test_nan_at_a_non_log_step_stops_the_run_at_the_next_log_step(shards, tmp_path, monkeypatch):
    at_step(monkeypatch, {2: poison})
    cfg = tiny(shards, tmp_path / "out", "run.log_every=4")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: .*=nan.*\(seen at step 4"):
        train(cfg)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # step 4 was not logged
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_nan_is_caught_before_the_next_checkpoint(shards, tmp_path, monkeypatch):
    at_step(monkeypatch, {3: poison})
    cfg = tiny(shards, tmp_path / "out", "run.log_every=100", "run.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: .*\(seen at step 4.*no checkpoint was written from step 3 on"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002"]
    state = load_tensor_file(str(tmp_path / "out" / "checkpoints" / "step-00000002" / "state.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
