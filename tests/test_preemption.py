"""Preemption (issue 17): on SIGUSR1 / SIGTERM the trainer checkpoints at a step every rank agrees
on and exits with REQUEUE_EXIT_CODE; --resume auto continues with nothing lost or repeated; the
SLURM script turns that into ``scontrol requeue`` (tested with fake SLURM commands on PATH).

The ranks are started directly (RANK / WORLD_SIZE / MASTER_ADDR in the environment, as ``srun``
with one task per GPU does), so each rank's own exit status is seen; the signal goes to their
whole process group, DataLoader workers included, as SLURM signals every process of a step.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, free_port, synthetic_shards
from sapretrain.train.trainer import REQUEUE_EXIT_CODE

PRETRAIN = str(PROJECT_ROOT / "launch" / "pretrain.py")
DEMO = str(PROJECT_ROOT / "configs" / "demo.yaml")
SBATCH = PROJECT_ROOT / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 records of synthetic scenes (64 px) in 8 shards of 4: 4 batches of 8 pairs per epoch."""
    return synthetic_shards(tmp_path_factory.mktemp("preemption-data"), scenes=64, shard_size=4)


def train_args(shards, out, **extra) -> list[str]:
    values = {
        "model.name": "sa-tiny", "model.pretrained": "null", "model.lock_image": "false",
        "data.shards": str(shards), "data.batch_pairs": 8, "data.workers": 1, "data.shuffle_buffer": 16,
        "optim.steps": STEPS, "optim.warmup_steps": 2, "optim.lr": 1e-3,
        "run.precision": "no", "run.log_every": 1, "run.checkpoint_every": 100, "run.trackers": "[]",
        "run.output_dir": str(out), **extra,
    }
    return ["--config", DEMO, "--resume", "auto"] + [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Whatever a failing test left running (a rank waiting for its peer forever) is killed."""
    started.clear()
    yield
    import psutil

    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(proc.pid)
                for child in tree.children(recursive=True):  # ranks, their workers (torchrun: own sessions)
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                tree.kill()
            proc.wait()


started: list[subprocess.Popen] = []


def start_ranks(world: int, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """``world`` trainer processes in one new process group (rank 0 leads it)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        extra = {"process_group": 0 if rank == 0 else procs[0].pid}
        procs.append(subprocess.Popen(
            [sys.executable, PRETRAIN] + args, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=open(logs / f"rank{rank}.out", "w"), stderr=open(logs / f"rank{rank}.err", "w"), **extra))
        started.append(procs[-1])
    return procs


def finish(procs, timeout: float = 120) -> list[int]:
    deadline = time.time() + timeout
    return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]


def read(logs: Path, rank: int, stream: str = "out") -> str:
    return (logs / f"rank{rank}.{stream}").read_text()


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


def wait_for_step(out: Path, step: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.strip()):
            return
        assert all(p.poll() is None for p in procs), "a rank ended before the signal"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


def data_states(out: Path, step: int, world: int) -> list[dict]:
    from sapretrain.train.checkpoint import load_tensor_file

    return [load_tensor_file(str(out / f"checkpoints/step-{step:08d}/rank-{r}.pt"))["data"] for r in range(world)]


@pytest.mark.slow
def test_sigusr1_stops_two_ranks_at_one_step_and_resume_continues_exactly(shards, tmp_path):
    """10 steps on 2 ranks (2.5 epochs). SIGUSR1 to both ranks' process group after step 2: both
    exit 75 with a checkpoint at the same step N; --resume auto then gives the uninterrupted run's
    losses at every step and, at N and at the end, the same data positions (nothing lost or
    repeated)."""
    reference = tmp_path / "reference"
    procs = start_ranks(2, train_args(shards, reference, **{"run.checkpoint_every": 1, "run.keep_checkpoints": 0}),
                        tmp_path / "logs-ref")
    assert finish(procs) == [0, 0], read(tmp_path / "logs-ref", 0, "err")[-3000:]
    ref = losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))

    out, logs = tmp_path / "preempted", tmp_path / "logs-stop"
    procs = start_ranks(2, train_args(shards, out), logs)
    wait_for_step(out, 2, procs)
    os.killpg(procs[0].pid, signal.SIGUSR1)  # both ranks and their DataLoader workers
    codes = finish(procs)
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], read(logs, 0, "err")[-3000:] + read(logs, 1, "err")[-3000:]
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+): checkpoint (\S+); exit status 75", read(logs, 0))
    assert len(stops) == 1, read(logs, 0)
    stop = int(stops[0][0])
    assert 2 < stop < STEPS and stops[0][1] == str(out / f"checkpoints/step-{stop:08d}")
    done = sorted(p.parent.name for p in (out / "checkpoints").glob("step-*/DONE"))
    assert done == [f"step-{stop:08d}"]  # checkpoint_every=100: the stop wrote the only one
    assert {"rank-0.pt", "rank-1.pt", "state.pt"} <= {p.name for p in (out / f"checkpoints/step-{stop:08d}").iterdir()}
    assert sorted(losses(out)) == list(range(1, stop + 1))
    assert data_states(out, stop, 2) == data_states(reference, stop, 2)

    logs = tmp_path / "logs-resume"
    procs = start_ranks(2, train_args(shards, out), logs)
    assert finish(procs) == [0, 0], read(logs, 0, "err")[-3000:]
    assert f"resumed from {out}/checkpoints/step-{stop:08d} at step {stop}" in read(logs, 0)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    assert data_states(out, STEPS, 2) == data_states(reference, STEPS, 2)
    ref_state = torch.load(reference / f"checkpoints/step-{STEPS:08d}/state.pt", weights_only=True)
    got_state = torch.load(out / f"checkpoints/step-{STEPS:08d}/state.pt", weights_only=True)
    for name, value in ref_state["model"].items():
        torch.testing.assert_close(got_state["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_sigterm_stops_one_process_after_its_step_with_the_requeue_status(shards, tmp_path):
    out, logs = tmp_path / "one", tmp_path / "logs"
    procs = start_ranks(1, train_args(shards, out), logs)
    wait_for_step(out, 1, procs)
    procs[0].send_signal(signal.SIGTERM)
    assert finish(procs) == [REQUEUE_EXIT_CODE], read(logs, 0, "err")[-3000:]
    stop = int(re.search(r"stopped by SIGTERM after step (\d+)", read(logs, 0)).group(1))
    assert 1 <= stop < STEPS
    assert (out / f"checkpoints/step-{stop:08d}/DONE").exists()
    assert max(losses(out)) == stop


def test_a_signal_to_one_rank_stops_both_at_the_same_step(shards, tmp_path):
    """SIGTERM to rank 1 only: rank 0 learns it through the per-step flag reduction."""
    out, logs = tmp_path / "one-rank", tmp_path / "logs"
    procs = start_ranks(2, train_args(shards, out), logs)
    wait_for_step(out, 1, procs)
    procs[1].send_signal(signal.SIGTERM)
    assert finish(procs) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], read(logs, 1, "err")[-3000:]
    stop = int(re.search(r"stopped by a signal to another rank after step (\d+)", read(logs, 0)).group(1))
    assert 1 <= stop < STEPS and max(losses(out)) == stop
    assert [p.parent.name for p in (out / "checkpoints").glob("step-*/DONE")] == [f"step-{stop:08d}"]
    assert [s["batch"] for s in data_states(out, stop, 2)] == [stop % 4] * 2  # 4 batches per epoch


def test_under_accelerate_launch_the_launcher_ignores_sigusr1_and_the_ranks_stop(shards, tmp_path):
    """The chain pretrain.sbatch runs: the launcher starts with SIGUSR1 ignored (``trap '' USR1``),
    the signal goes to every process of the tree (as SLURM's cgroup-based signalling of a step does:
    torchrun starts each rank in a session of its own, out of reach of a process-group signal); the
    ranks checkpoint and exit 75, which the launcher reports as a failure (status 1: why the script
    also requeues a non-zero end after its signal)."""
    import psutil

    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), PRETRAIN] + train_args(shards, out)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "out", "w"), stderr=open(tmp_path / "err", "w"),
                            process_group=0, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    started.append(proc)
    wait_for_step(out, 2, [proc])
    launcher = psutil.Process(proc.pid)
    for process in [launcher] + launcher.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGUSR1)
    code = proc.wait(timeout=120)
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert code == 1, stderr[-3000:]
    stop = int(re.search(r"stopped by SIGUSR1 after step (\d+): .*exit status 75", stdout).group(1))
    assert 2 < stop < STEPS and (out / f"checkpoints/step-{stop:08d}/DONE").exists()
    assert re.search(r"exitcode\s*:\s*75", stderr), stderr[-3000:]  # torchrun's report of the ranks


# ----------------------------------------------------------------- the SLURM script, fake SLURM


FAKE_SRUN = """#!/bin/bash
# Fake srun: records its command line; mode from $FAKE_MODE.
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid"
case "$FAKE_MODE" in
  preempt) trap 'echo 1 > "$FAKE_DIR/srun.signalled"; exit 1' USR1  # the launcher's status for a rank's 75
           while :; do sleep 0.05; done ;;
  requeue_code) exit 75 ;;
  done) exit 0 ;;
  crash) exit 3 ;;
esac
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/calls"
kill -USR1 "$(cat "$FAKE_DIR/srun.pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
[ "$1 $2" = "show hostnames" ] && echo node-a
exit 0
"""


def run_sbatch(tmp_path: Path, mode: str, signal_it: bool) -> tuple[int, str, str]:
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir(exist_ok=True)
    fake.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake), "FAKE_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-a", "SLURM_NNODES": "1"}
    proc = subprocess.Popen(["bash", str(SBATCH), "configs/paper.yaml", "optim.steps=7"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_it:
        deadline = time.time() + 20
        while not (fake / "srun.pid").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal=B:USR1@180 does
    out, err = proc.communicate(timeout=30)
    calls = (fake / "calls").read_text() if (fake / "calls").exists() else ""
    return proc.returncode, calls, err


def test_sbatch_asks_for_the_signal_and_forwards_it_then_requeues(tmp_path):
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M) and "#SBATCH --requeue" in text
    code, calls, err = run_sbatch(tmp_path, "preempt", signal_it=True)
    assert code == 0, err
    assert (tmp_path / "fake" / "srun.signalled").exists()
    assert calls.splitlines() == ["scontrol show hostnames node-a", "scancel --signal=USR1 4242",
                                  "scontrol requeue 4242"], calls
    args = (tmp_path / "fake" / "srun.args").read_text()
    assert "trap '' USR1; exec accelerate launch" in args  # the launcher ignores the forwarded signal
    assert "--resume auto optim.steps=7" in args


@pytest.mark.parametrize("mode, code, requeued", [("requeue_code", 0, True), ("done", 0, False), ("crash", 3, False)])
def test_sbatch_requeues_on_the_requeue_status_only(tmp_path, mode, code, requeued):
    got, calls, err = run_sbatch(tmp_path, mode, signal_it=False)
    assert got == code, err
    assert ("scontrol requeue 4242" in calls) == requeued, calls
