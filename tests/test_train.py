"""The trainer: feature-cached accumulation, two-process runs of the real entry point, exact resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from sapretrain.losses import LossConfig, SAClipLoss
from sapretrain.model.saclip import SAClipConfig, build_saclip
from sapretrain.train.trainer import merge_microbatches, split_microbatches, train_step

PRETRAIN = str(PROJECT_ROOT / "launch" / "pretrain.py")


def random_batch(pairs: int, seed: int = 0, size: int = 64, length: int = 77) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    text = torch.zeros(n, length, dtype=torch.long)
    neg = torch.zeros(n, length, dtype=torch.long)
    spans = torch.zeros(n, 3, length, dtype=torch.bool)
    for i in range(n):
        words = torch.randint(1, 49000, (10,), generator=g)
        text[i, 0], text[i, 1:11], text[i, 11] = 49406, words, 49407
        neg[i] = text[i]
        neg[i, 5] = (words[4] + 7) % 49000 + 1  # the relation token differs
        spans[i, 0, 1:3] = spans[i, 1, 5] = spans[i, 2, 7:10] = True
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "rois": torch.randn(n, 2, 3, size, size, generator=g),
        "boxes": torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.1, 0.9, 0.7]]).repeat(n, 1, 1),
        "text": text, "spans": spans, "neg_text": neg, "neg_spans": spans.clone(),
        "groups": torch.arange(n),  # every sample its own image
    }


def test_split_and_merge_keep_the_pair_layout():
    batch = {"x": torch.arange(8)}  # pairs (0,4) (1,5) (2,6) (3,7)
    micro = split_microbatches(batch, 2)
    assert [m["x"].tolist() for m in micro] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert merge_microbatches([{"x": m["x"]} for m in micro])["x"].tolist() == list(range(8))
    with pytest.raises(ValueError, match="accum_freq=3"):
        split_microbatches(batch, 3)


@pytest.mark.parametrize("learnable", [False, True])
def test_accumulated_gradients_equal_one_big_batch(learnable):
    """2 x 2 pairs accumulated with the feature cache == 4 pairs at once (float64, tol 1e-9)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=True)).double()
    loss_fn = SAClipLoss(LossConfig(clip=True, learnable_temperature=learnable)).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in random_batch(4).items()}

    def grads(k):
        model.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        terms = train_step(accelerator, model, loss_fn, split_microbatches(batch, k))
        named = list(model.named_parameters()) + [(f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
        return sum(terms.values()).item(), {n: p.grad.clone() for n, p in named if p.grad is not None}

    loss_once, once = grads(1)
    loss_accum, accum = grads(2)
    assert loss_accum == pytest.approx(loss_once, rel=1e-12)
    assert once.keys() == accum.keys() and "clip.logit_scale" in once
    assert not any(n.startswith("clip.visual.") for n in once)  # the locked tower gets nothing
    for name in once:
        torch.testing.assert_close(accum[name], once[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    """32 records of synthetic scenes (64 px) in 8 shards."""
    return synthetic_shards(tmp_path_factory.mktemp("train-data"), scenes=64, shard_size=4)


def overrides(shards, out, steps=6, **extra):
    values = {
        "model.name": "sa-tiny", "model.pretrained": "null", "model.lock_image": "false",
        "data.shards": str(shards), "data.batch_pairs": 8, "data.workers": 1, "data.shuffle_buffer": 16,
        "optim.steps": steps, "optim.warmup_steps": 2, "optim.lr": 1e-3,
        "run.precision": "no", "run.log_every": 1, "run.checkpoint_every": 2, "run.trackers": "[]",
        "run.output_dir": str(out), **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def two_process_cmd():
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", PRETRAIN]


def cpu_env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def losses(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


def test_two_processes_train_checkpoint_and_resume_after_sigkill(train_shards, tmp_path):
    config = str(PROJECT_ROOT / "configs" / "demo.yaml")
    reference = tmp_path / "reference"
    run = subprocess.run(two_process_cmd() + ["--config", config] + overrides(train_shards, reference),
                         env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 6/6" in run.stdout
    ref = losses(reference)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and all(v == v for v in ref.values())
    # keep_checkpoints=3 of steps 2, 4, 6
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    assert {"rank-0.pt", "rank-1.pt", "state.pt", "DONE"} <= {p.name for p in (reference / "checkpoints/step-00000006").iterdir()}

    killed = tmp_path / "killed"
    cmd = two_process_cmd() + ["--config", config, "--resume", "auto"] + overrides(train_shards, killed)
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints/step-00000002/DONE").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints/step-00000002/DONE").exists()
    assert not (killed / "checkpoints/step-00000006/DONE").exists(), "killed too late to test a resume"
    resumed = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = losses(killed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_non_finite_loss_stops_with_the_step(train_shards, tmp_path):
    run = subprocess.run(
        [sys.executable, PRETRAIN, "--config", str(PROJECT_ROOT / "configs" / "demo.yaml")]
        + overrides(train_shards, tmp_path / "nan", steps=20, **{"optim.lr": 1e12, "optim.warmup_steps": 0, "optim.grad_clip": "null"}),
        env=cpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode != 0
    assert "non-finite loss at step" in run.stderr


def test_streams_shards_from_s3_and_checkpoints_to_s3(train_shards, tmp_path, s3_env, s3_server):
    fs = s3_env
    fs.mkdir("train-test")
    fs.put(str(train_shards), "train-test/shards", recursive=True)
    env = {**cpu_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}
    cmd = [sys.executable, PRETRAIN, "--config", str(PROJECT_ROOT / "configs" / "demo.yaml"), "--resume", "auto"]
    args = overrides("s3://train-test/shards", "s3://train-test/runs/s3run", steps=2)
    run = subprocess.run(cmd + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert fs.exists("train-test/runs/s3run/checkpoints/step-00000002/DONE")
    assert fs.exists("train-test/runs/s3run/config.yaml")
    assert sorted(losses(tmp_path / "runs" / "s3run")) == [1, 2]  # logs stay on local disk
    # Resuming a finished run from object storage trains nothing more.
    again = subprocess.run(cmd + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed from s3://train-test/runs/s3run/checkpoints/step-00000002" in again.stdout


def test_gradient_checkpointing_gives_the_same_gradients():
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_model

    batch = random_batch(2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = load_config(TrainConfig, None, ["model.name=sa-tiny", "model.pretrained=null", "model.lock_image=false",
                                              f"run.grad_checkpointing={str(checkpointing).lower()}"])
        model = build_model(cfg)
        assert not model.clip.logit_scale.requires_grad  # no CLIP loss: no gradient, no DDP hang
        loss = sum(SAClipLoss(cfg.loss)(model(batch)).values())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_continues_with_the_next_epoch(train_shards, tmp_path):
    """4 batches per epoch: resumed from the step-4 checkpoint, epochs 1 and 2 follow (steps 5-10)."""
    import shutil

    cmd = [sys.executable, PRETRAIN, "--config", str(PROJECT_ROOT / "configs" / "demo.yaml"), "--resume", "auto"]
    reference = tmp_path / "reference"
    args = overrides(train_shards, reference, steps=10, **{"run.keep_checkpoints": 5})
    assert subprocess.run(cmd + args, env=cpu_env(), capture_output=True, timeout=600).returncode == 0
    ref = losses(reference)

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in (6, 8, 10):  # as if killed right after the step-4 checkpoint
        shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    args = overrides(train_shards, resumed, steps=10, **{"run.keep_checkpoints": 5})
    run = subprocess.run(cmd + args, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "at step 4 (epoch 0, batch 4)" in run.stdout
    got = losses(resumed)
    assert sorted(got) == list(range(1, 11))
    for step in range(5, 11):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("terms", [
    "loss.clip=true loss.contrastive_text=false loss.contrastive_image=false loss.triplet=false",
    "loss.contrastive_text=true loss.contrastive_image=false loss.triplet=false",
    "loss.contrastive_image=true loss.contrastive_text=false loss.triplet=false",
    "loss.triplet=true loss.contrastive_text=false loss.contrastive_image=false",
    "loss.clip=true",
])
def test_every_trainable_parameter_gets_a_gradient(terms):
    """DDP (find_unused_parameters=False) hangs or fails on a trainable parameter without gradient."""
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_model

    cfg = load_config(TrainConfig, None, ["model.name=sa-tiny", "model.pretrained=null", "model.lock_image=false"] + terms.split())
    model = build_model(cfg)
    sum(SAClipLoss(cfg.loss)(model(random_batch(2))).values()).backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cuda", [False, True])
def test_optimizer_is_fused_where_a_gpu_is(monkeypatch, cuda):
    """AdamW is built as one fused kernel on a GPU machine and as the default one on CPU."""
    from sapretrain.config import load_config
    from sapretrain.train.config import TrainConfig
    from sapretrain.train.trainer import build_optimizer

    cfg = load_config(TrainConfig, None, ["model.name=sa-tiny", "model.pretrained=null", "model.lock_image=true"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None, lock_image=True))
    assert build_optimizer(cfg, model, SAClipLoss(cfg.loss)).defaults["fused"] is cuda
