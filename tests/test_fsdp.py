"""FSDP2 training and sharded checkpoints (issue 17), on 2 CPU processes (gloo).

What runs here: the trainer's FSDP code path for real (``shard_model``'s ``fully_shard`` over the
trainable model with the locked tower and the logit scale left whole, Accelerate's FSDP2
``prepare``, the feature-cached accumulation under ``no_sync``, the gradient averaging of the
unsharded parameters, clipping over DTensor and plain gradients, the clamp, and
torch.distributed.checkpoint saving each rank's shards and loading them back, into 2 ranks or into
one plain process). Accelerate turns ``distributed_type: FSDP`` on only for GPU-type distributed
types (with ``ACCELERATE_USE_CPU`` it stays MULTI_CPU), so the launched script sets the state to
FSDP after the Accelerator is built, with the plugin made from the ``FSDP_*`` variables that
``accelerate launch`` derives from launch/accelerate/fsdp.yaml: what ``accelerate launch
--config_file launch/accelerate/fsdp.yaml`` does on GPUs.

What only a GPU run shows: NCCL collectives and CUDA streams, bf16 mixed precision
(``MixedPrecisionPolicy``), fused AdamW over DTensors, the memory actually saved, speed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, synthetic_shards
from conftest import run_ranks as launch_ranks

DEMO = str(PROJECT_ROOT / "configs" / "demo.yaml")
ACCELERATE_CONFIGS = sorted((PROJECT_ROOT / "launch" / "accelerate").glob("*.yaml"))
STEPS = 4

# The trainer's command line, with the Accelerator switched to FSDP when SAPRETRAIN_TEST_FSDP=1
# (see the module docstring).
DRIVER = """
import os, sys
from sapretrain.cli.train import main
from sapretrain.train import trainer

if os.environ.get("SAPRETRAIN_TEST_FSDP") == "1":
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    build = trainer.build_accelerator

    def build_fsdp(cfg):
        accelerator = build(cfg)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
        # Both shared states: a later AcceleratorState() copies PartialState's type back.
        accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        trainer.check_distribution(cfg, accelerator)
        return accelerator

    trainer.build_accelerator = build_fsdp
sys.exit(main(sys.argv[1:]))
"""


def launch_env(config: Path) -> dict[str, str]:
    """The variables ``accelerate launch --config_file config`` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    # Port 0: a free one (accelerate refuses a busy 29500, which another test may hold).
    args = launch_command_parser().parse_args(["--config_file", str(config), "--main_process_port", "0", "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 synthetic scenes (64 px) in 8 shards of 4: 4 batches of 8 pairs per epoch."""
    return synthetic_shards(tmp_path_factory.mktemp("fsdp-data"), scenes=32, shard_size=4)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Validation shards (one batch of 8 pairs)."""
    return synthetic_shards(tmp_path_factory.mktemp("fsdp-held-out"), scenes=16, shard_size=4)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp-driver") / "train_fsdp.py"
    path.write_text(DRIVER)
    return path


def train_args(shards, out, steps=STEPS, **extra) -> list[str]:
    # The locked (random-init) tower, CLIP's logit scale trained (loss.clip), learnable loss
    # temperatures (the loss module's own parameters), clipping (0.1: active from step 1) and
    # 2 micro-batches per step.
    values = {
        "model.name": "sa-tiny", "model.pretrained": "null", "model.lock_image": "true",
        "loss.clip": "true", "loss.learnable_temperature": "true", "optim.grad_clip": 0.1,
        "optim.accum_freq": 2, "data.shards": str(shards), "data.batch_pairs": 8, "data.workers": 1,
        "data.shuffle_buffer": 16, "optim.steps": steps, "optim.warmup_steps": 2, "optim.lr": 1e-3,
        "run.precision": "no", "run.log_every": 1, "run.checkpoint_every": 2, "run.keep_checkpoints": 0,
        "run.trackers": "[]", "run.output_dir": str(out), **extra,
    }
    return ["--config", DEMO, "--resume", "auto"] + [f"{k}={v}" for k, v in values.items()]


def validation(held_out: Path) -> dict[str, object]:
    return {"eval.every": 2, "eval.shards": str(held_out), "eval.batches": 1, "eval.workers": 0}


def run_ranks(driver: Path, world: int, args: list[str], fsdp: bool) -> list[subprocess.CompletedProcess]:
    env = {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    if fsdp:
        fsdp_vars = {k: v for k, v in launch_env(PROJECT_ROOT / "launch/accelerate/fsdp.yaml").items() if "FSDP" in k}
        env.update(fsdp_vars, SAPRETRAIN_TEST_FSDP="1")
    return launch_ranks(str(driver), world, args, env, timeout=240)


def ok(runs) -> None:
    assert [r.returncode for r in runs] == [0] * len(runs), "\n".join(r.stderr[-3000:] for r in runs)


def losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows if "loss" in r}


def validations(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/") and k != "val/seconds"}
            for r in rows if "val/loss" in r}


def close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])) for k in a)


@pytest.fixture(scope="module")
def runs(shards, held_out, driver, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps on 2 processes under DDP and under FSDP (checkpoints and validations after
    steps 2 and 4)."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    for name in ("ddp", "fsdp"):
        ok(run_ranks(driver, 2, train_args(shards, root / name, **validation(held_out)), fsdp=name == "fsdp"))
    return {"ddp": root / "ddp", "fsdp": root / "fsdp"}


def test_fsdp_trains_and_validates_like_ddp(runs):
    """The same global batches: the same loss terms, step by step (float32, up to reduction order),
    and the same validation numbers through the sharded model."""
    want, got = losses(runs["ddp"]), losses(runs["fsdp"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert len(got[1]) >= 5  # loss + contrastive u / v + triplet + clip
    assert all(close(want[s], got[s]) for s in want), (want, got)
    assert got[STEPS]["loss"] != got[1]["loss"]  # it trained
    want, got = validations(runs["ddp"]), validations(runs["fsdp"])
    assert sorted(got) == sorted(want) == [2, 4] and got[2]["val/pairs"] == 8
    assert all(close(want[s], got[s]) for s in want), (want, got)


def test_the_checkpoint_is_per_rank_shards_and_consolidates_to_ddp_weights(runs, tmp_path):
    from sapretrain.model.checkpoint import load_saclip
    from sapretrain.train.checkpoint import consolidate, load_tensor_file

    step2 = runs["fsdp"] / "checkpoints/step-00000002"
    files = sorted(p.name for p in (step2 / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files
    assert {p.name for p in step2.iterdir()} == {"dcp", "state.pt", "rank-0.pt", "rank-1.pt", "DONE"}
    state = load_tensor_file(str(step2 / "state.pt"))
    assert state["format"] == "dcp" and state["world_size"] == 2 and state["position"]["step"] == 2
    assert "model" not in state and "optimizer" not in state and "loss" not in state
    assert state["model_excluded"] and all(k.startswith("clip.visual.") for k in state["model_excluded"])
    rank_sizes = [(step2 / "dcp" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    assert min(rank_sizes) > 0.2 * max(rank_sizes), rank_sizes  # each rank wrote its share

    # Consolidated (2 shards -> 1 file): the weights DDP trained, without the locked tower.
    full = load_tensor_file(consolidate(str(step2), str(tmp_path / "model.pt")))
    ddp = load_tensor_file(str(runs["ddp"] / "checkpoints/step-00000002/state.pt"))
    assert full["model"].keys() == ddp["model"].keys() and full["model_excluded"] == ddp["model_excluded"]
    assert ddp["loss"] and full["loss"].keys() == ddp["loss"].keys()  # the learnable temperatures
    for part in ("model", "loss"):
        for key, value in ddp[part].items():
            torch.testing.assert_close(full[part][key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert full["config"] == state["config"] and "optimizer" not in full

    # What the evaluators read: the consolidated file, or the sharded checkpoint itself.
    for source in (tmp_path / "model.pt", step2 / "state.pt"):
        model = load_saclip(str(source))
        for key, value in model.state_dict().items():
            if key in ddp["model"]:
                torch.testing.assert_close(value, ddp["model"][key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_resumed_fsdp_run_continues_exactly(runs, shards, held_out, driver, tmp_path):
    """Resumed on 2 ranks from the step-2 shards, steps 3-4 are the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000004")
    done = run_ranks(driver, 2, train_args(shards, resumed, **validation(held_out)), fsdp=True)
    ok(done)
    assert "resumed from" in done[0].stdout and "at step 2" in done[0].stdout
    got, again = losses(runs["fsdp"]), losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert all(close(got[s], again[s], 1e-5) for s in (3, 4)), (got, again)
    assert (resumed / "checkpoints/step-00000004/dcp/.metadata").exists()


def test_a_plain_one_process_run_loads_the_two_rank_shards(runs, shards):
    """2 -> 1: a sharded checkpoint resumes a run without FSDP (one process, as ``--resume`` on a
    single device would): every weight, the optimizer state per parameter name, the schedule."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sapretrain.config import load_config
    from sapretrain.losses import SAClipLoss
    from sapretrain.model.checkpoint import read_dcp
    from sapretrain.train import trainer
    from sapretrain.train.config import TrainConfig

    step2 = runs["fsdp"] / "checkpoints/step-00000002"
    argv = train_args(shards, runs["fsdp"])
    cfg = load_config(TrainConfig, DEMO, argv[4:])
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert not trainer.is_sharded(accelerator)
    set_seed(cfg.run.seed)
    model = trainer.build_model(cfg)
    loss_fn = SAClipLoss(cfg.loss)
    optimizer = trainer.build_optimizer(cfg, model, loss_fn)
    scheduler = trainer.warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.optim.steps)
    model, optimizer = trainer.distribute(cfg, accelerator, model, optimizer)
    pos, data_state, world = trainer.load_checkpoint(str(step2), accelerator, model, loss_fn, optimizer, scheduler)
    assert (pos.step, world) == (2, 2) and data_state is not None

    saved = read_dcp(str(step2 / "dcp"))
    net = accelerator.unwrap_model(model)
    names = {id(p): n for n, p in net.named_parameters()} | {id(p): f"loss.{n}" for n, p in loss_fn.named_parameters()}
    loaded = net.state_dict()
    for key, value in saved["model"].items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "loss"]
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            fqn = name if name.startswith("loss.") else f"model.{name}"
            want = saved["optimizer"][f"state.{fqn}.exp_avg_sq"]
            torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], want, atol=0, rtol=0, msg=name)
            assert group["lr"] == saved["optimizer"][f"param_groups.{fqn}.lr"]
    assert scheduler.last_epoch == 2 and len(scheduler.base_lrs) == len(optimizer.param_groups)

    # A step from there runs (the gradient of every trainable parameter reaches the optimizer).
    batch = next(iter(trainer.build_loader(cfg.data, trainer.build_preprocess(net), 0, 1,
                                           context_length=net.clip.context_length)))
    terms = trainer.optimizer_step(cfg, accelerator, model, loss_fn, optimizer, scheduler, batch, 3)
    assert torch.isfinite(sum(terms.values()))
    assert all(int(optimizer.state[p]["step"]) == 3 for g in optimizer.param_groups for p in g["params"])


def test_sharded_checkpoints_on_object_storage(runs, s3_env):
    """DCP through fsspec (``s3://``, a real S3 API on loopback): written by save_sharded, read
    back whole (read_dcp) and in place (load_sharded); a run's sharded checkpoint on S3 loads as a
    model (what the evaluators do with an ``s3://`` run)."""
    from sapretrain.model.checkpoint import load_saclip, read_dcp
    from sapretrain.train.checkpoint import load_sharded, save_sharded

    fs = s3_env
    fs.mkdir("fsdp-test")
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"state.w.step": torch.tensor(3.0)}}
    save_sharded(state, "s3://fsdp-test/one/dcp")
    assert fs.exists("fsdp-test/one/dcp/.metadata")
    back = read_dcp("s3://fsdp-test/one/dcp")
    torch.testing.assert_close(back["model"]["w"], state["model"]["w"])
    target = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"state.w.step": torch.tensor(0.0)}}
    load_sharded(target, "s3://fsdp-test/one/dcp")
    assert target["model"]["w"].sum() == 15 and target["optimizer"]["state.w.step"] == 3

    local = runs["fsdp"] / "checkpoints/step-00000002"
    fs.put(str(local), "fsdp-test/run/step-00000002", recursive=True)
    remote = load_saclip("s3://fsdp-test/run/step-00000002/state.pt").state_dict()
    for key, value in load_saclip(str(local / "state.pt")).state_dict().items():
        torch.testing.assert_close(remote[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_trainable_vision_tower_is_sharded_too(shards, driver, tmp_path):
    """``model.lock_image=false``: every block of both towers is an FSDP unit; nothing is left
    out of the checkpoint."""
    from sapretrain.train.checkpoint import load_tensor_file

    out = tmp_path / "unlocked"
    ok(run_ranks(driver, 2, train_args(shards, out, steps=1, **{"model.lock_image": "false"}), fsdp=True))
    assert list(losses(out)) == [1]
    state = load_tensor_file(str(out / "checkpoints/step-00000001/state.pt"))
    assert state["format"] == "dcp" and state["model_excluded"] == []


def test_an_fsdp_run_does_not_resume_a_ddp_checkpoint(runs):
    """A full state.pt into already sharded parameters: refused, pointing to DDP."""
    from accelerate.utils import DistributedType

    from sapretrain.train.trainer import load_checkpoint

    class Accelerator:
        distributed_type = DistributedType.FSDP

    with pytest.raises(SystemExit, match="resume it under DDP"):
        load_checkpoint(str(runs["ddp"] / "checkpoints/step-00000002"), Accelerator(), None, None, None, None)


def test_the_accelerate_configs_parse_and_name_existing_options():
    """Every launch/accelerate/*.yaml loads as accelerate's config, each fsdp_config key is a launch
    option, and fsdp.yaml gives an FSDP2 plugin wrapping the text tower's blocks of our models."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    assert {p.name for p in ACCELERATE_CONFIGS} >= {"1gpu.yaml", "8gpu.yaml", "multinode.yaml", "fsdp.yaml"}
    options = set(vars(launch_command_parser().parse_args(["train.py"])))
    for path in ACCELERATE_CONFIGS:
        config = load_config_from_file(str(path))  # unknown top-level keys raise here
        assert config.num_processes >= 1, path
        unknown = sorted(set(config.fsdp_config or {}) - options)
        assert not unknown, f"{path.name}: {unknown} are not accelerate launch options"
        launch_env(path)  # accelerate launch's own checks of the combination

    env = launch_env(PROJECT_ROOT / "launch/accelerate/fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k.startswith("FSDP_")})
    try:
        plugin = FullyShardedDataParallelPlugin()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["ResidualAttentionBlock"]
    assert "SHARDED" in str(plugin.state_dict_type)

    from sapretrain.model.saclip import SAClipConfig, build_saclip

    model = build_saclip(SAClipConfig(name="sa-tiny", pretrained=None))
    block = get_module_class_from_name(model, "ResidualAttentionBlock")
    assert block is not None and isinstance(model.clip.transformer.resblocks[0], block)


def test_an_fsdp_run_refuses_what_it_cannot_do(tmp_path):
    """FSDP1, DeepSpeed and the rank-0 spatial probe under FSDP: a ConfigError naming the fix."""
    from accelerate.utils import DistributedType

    from sapretrain.config import ConfigError
    from sapretrain.train.config import EvalConfig, TrainConfig
    from sapretrain.train.trainer import check_distribution

    class Plugin:
        fsdp_version = 2
        activation_checkpointing = False
        cpu_ram_efficient_loading = False

    class State:
        fsdp_plugin = Plugin()

    class Accelerator:
        state = State()
        distributed_type = DistributedType.FSDP

    probe = TrainConfig(eval=EvalConfig(every=10, shards=str(tmp_path), spatial_probe=8))
    with pytest.raises(ConfigError, match="eval.spatial_probe=0"):
        check_distribution(probe, Accelerator())
    check_distribution(TrainConfig(), Accelerator())  # FSDP2 without the probe: fine
    Plugin.activation_checkpointing = True
    with pytest.raises(ConfigError, match="run.grad_checkpointing=true"):
        check_distribution(TrainConfig(), Accelerator())
    Plugin.activation_checkpointing = False
    Plugin.fsdp_version = 1
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_distribution(TrainConfig(), Accelerator())
    Accelerator.distributed_type = DistributedType.DEEPSPEED
    with pytest.raises(ConfigError, match="launch/accelerate/fsdp.yaml"):
        check_distribution(TrainConfig(), Accelerator())
