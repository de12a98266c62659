"""Two processes over gloo (real DDP on CPU, started by `accelerate launch`) train one run: the LoRA
is identical on both ranks and equal to a one-process run with the same global batch, and only
the main process writes outputs.

Noise and sigmas are drawn per sample from (seed, epoch, sample index), so how the global batch
is split across processes does not change what is trained.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxtune.config import load_config
from fluxtune.train import train

WORKER = Path(__file__).parent / "workers" / "train_rank.py"


def settings(model, photos, out, cache, batch_size, **extra):
    # 3 photos x 4 repeats = 12 samples: 3 global batches of 4 per epoch, on 1 or 2 processes alike;
    # 4 steps cross into a second epoch. Square crops unless a test asks for buckets.
    items = {"output_dir": out, "model.path": model, "data.path": photos, "data.resolution": 64,
             "data.repeats": 4, "data.cache_dir": cache, "train.max_steps": 4, "train.batch_size": batch_size,
             "train.seed": 3, "train.save_every": 2, "lora.rank": 4, "lora.alpha": 8, "optim.lr": 0.01,
             "log.backend": "none", "data.buckets": "false", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def launch_two(args, env_extra=None, check=True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER)]
    proc = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def same_on_both_ranks(out):
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    return rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# (batch per process, accumulation steps) on 1 process, and on 2 per seed (a launch costs ~20 s):
# each a global batch of 4
ONE_PROCESS, TWO_PROCESSES = [(4, 1), (1, 4)], {3: (2, 1), 11: (1, 2)}
# 3 photos x 3 repeats = 9 samples, uneven for a global batch of 4. With buckets: 6 at 80x48 and 3
# at 64x64, one global batch filled by repeating in each; without: one bucket, 3 repeated. Either
# way 3 steps an epoch, so 12 steps train 4 epochs.
# Seed 11 also turns every caption feature on: each sample's caption then comes from its (epoch,
# index), which must not depend on the split either.
CAPTION_FEATURES = {"data.trigger_word": "zxq", "data.caption_dropout": 0.3, "data.shuffle_tags": "true",
                    "data.keep_tags": 1}
SPLIT_RUNS = {3: {"data.buckets": "true"}, 11: {"data.buckets": "false", **CAPTION_FEATURES}}


def split_settings(model, photos, out, cache, seed, batch, accum):
    return settings(model, photos, out, cache, batch, **SPLIT_RUNS[seed], **{
        "train.seed": seed, "train.grad_accum": accum, "data.repeats": 3, "train.max_steps": 12,
        "train.save_every": 6})


# Float sums in another order, amplified by Adam (an element whose gradient is near zero moves by up
# to lr per step whatever its sign): runs that see the same batches agree to ~2e-5 of the LoRA's
# norm (single elements up to ~1e-3 of its largest); a different data order is ~0.6 away.
SAME_LORA = 1e-4


def lora_distance(other: dict, one: dict) -> float:
    """Norm of the difference of two LoRAs over all their tensors, relative to the norm of `one`."""
    diff = sum(float((other[k] - one[k]).pow(2).sum()) for k in one)
    return (diff / sum(float(v.pow(2).sum()) for v in one.values())) ** 0.5


def test_every_split_of_the_global_batch_trains_the_same_lora_over_four_epochs(tiny_models, photos, tmp_path):
    """1 x batch 4 == 1 x batch 1 x accum 4 == 2 x batch 2 (seed 3, uneven buckets) and == 2 x batch 1
    x accum 2 (seed 11, no buckets, caption features on): the loss of every step and the final LoRA. The data order is cut
    into global batches first, then split, so nothing depends on how it is split; the same runs
    with each process shuffling on its own (a mutation in the worker) must not match."""
    model, cache = tiny_models("flux2-klein"), tmp_path / "cache"
    outs = {}  # first, so the two processes build the cache together
    for seed, split in TWO_PROCESSES.items():
        outs[seed] = tmp_path / f"two-{seed}-{split}"
        launch_two(split_settings(model, photos, outs[seed], cache, seed, *split))
    single = {(seed, split): train(load_config(None, split_settings(model, photos, tmp_path / f"one-{seed}-{split}",
                                                                    cache, seed, *split)))
              for seed in SPLIT_RUNS for split in ONE_PROCESS}
    mutant = tmp_path / "mutant"
    launch_two(split_settings(model, photos, mutant, cache, 3, 2, 1), env_extra={"SHUFFLE_PER_RANK": "1"})

    for seed in SPLIT_RUNS:
        reference = single[seed, ONE_PROCESS[0]]
        one = load_file(reference.lora_path)
        assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # it trained
        losses = [r["loss"] for r in metrics(reference.output_dir)]
        assert len(losses) == 12 and len(set(losses)) == 12
        runs = {split: single[seed, split].output_dir for split in ONE_PROCESS[1:]}
        runs[TWO_PROCESSES[seed], 2] = outs[seed]
        assert same_on_both_ranks(outs[seed])
        for split, out in runs.items():
            other = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
            assert other.keys() == one.keys()
            assert lora_distance(other, one) <= SAME_LORA, (seed, split)
            assert [r["loss"] for r in metrics(out)] == pytest.approx(losses, rel=1e-4, abs=1e-6), (seed, split)

    # The mutation is caught: the same comparison fails for it.
    wrong = load_file(mutant / "lora" / "pytorch_lora_weights.safetensors")
    one = load_file(single[3, ONE_PROCESS[0]].lora_path)
    assert lora_distance(wrong, one) > 100 * SAME_LORA
    assert [r["loss"] for r in metrics(mutant)] != pytest.approx([r["loss"] for r in metrics(single[3, ONE_PROCESS[0]].output_dir)],
                                                                 rel=1e-4, abs=1e-6)

    # A fresh cache, built by both processes at once: each encoded its own share, none twice.
    out = outs[3]
    counts = [json.loads((out / f"rank{r}-cache.json").read_text()) for r in (0, 1)]
    assert sorted(c["latents_encoded"] for c in counts) == [1, 2]
    assert sum(c["texts_encoded"] for c in counts) == 3
    # Uneven buckets, every epoch finished together (a rank short of batches would hang the other):
    # each bucket's last global batch of 4 filled by repeating, 3 steps an epoch.
    buckets = json.loads((out / "buckets.json").read_text())
    assert buckets["processes"] == 2 and buckets["global_batch"] == 4 and buckets["steps_per_epoch"] == 3
    assert {size: b["repeated"] for size, b in buckets["buckets"].items()} == {"64x64": 1, "80x48": 2}
    # One writer: one metrics row per step, one set of checkpoints; every rank holds the whole base.
    assert [r["step"] for r in metrics(out)] == list(range(1, 13))
    assert sorted(p.name for p in (out / "state").iterdir() if p.name.startswith("step-")) == ["step-000006", "step-000012"]
    base = json.loads((out / "rank1-base.json").read_text())
    assert base["held"] == base["total"]


def test_sharded_base_trains_like_one_process_and_every_rank_joins_sampling_and_eval(tiny_models, photos, tmp_path):
    """train.sharding=fsdp: each rank holds half of every frozen weight, the LoRA stays whole and its
    gradients are averaged. With checkpointing, in-training samples and eval (forward passes every
    rank must join) the run finishes, and equals one process with the same global batch."""
    model = tiny_models("flux2-klein")
    cache = tmp_path / "cache"
    extra = {"train.gradient_checkpointing": "true", "eval.fraction": 0.25, "eval.every": 2,
             "sample.every": 2, "sample.steps": 2, "sample.prompts": "[a photo]", "data.repeats": 4}
    single = train(load_config(None, settings(model, photos, tmp_path / "single", cache, batch_size=4, **extra)))

    out = tmp_path / "fsdp"
    launch_two(settings(model, photos, out, cache, batch_size=2, **extra, **{"train.sharding": "fsdp"}))
    assert same_on_both_ranks(out)
    for rank in (0, 1):  # each holds half of the frozen weights (dim 0 split, odd rows padded)
        base = json.loads((out / f"rank{rank}-base.json").read_text())
        assert 0.45 * base["total"] < base["held"] < 0.55 * base["total"], base
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    one = load_file(single.lora_path)
    assert saved.keys() == one.keys()
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3
    # The sharded gradient average sums in another order than one process does (differences ~1e-8);
    # Adam divides by the root of the squared gradient, so an element whose gradient is near zero
    # can turn that into ~1e-4 of its weight (seen: 6e-5 on one of 128, weights up to 0.2). The
    # loss of every step must still agree to float noise.
    for key in one:
        torch.testing.assert_close(saved[key], one[key], atol=1e-4, rtol=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single_losses = [r["loss"] for r in map(json.loads, (single.output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(single_losses, rel=1e-6, abs=1e-6)
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    single_rows = [json.loads(line) for line in (single.output_dir / "metrics.jsonl").read_text().splitlines()]
    single_evals = {r["step"]: r["eval/loss"] for r in single_rows if "eval/loss" in r}
    assert evals.keys() == single_evals.keys() == {2, 4}
    for step in evals:
        assert abs(evals[step] - single_evals[step]) < 1e-4
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000002.png", "step-000004.png"]


def test_a_signal_to_one_process_stops_all_and_the_sharded_run_resumes_bit_for_bit(tiny_models, photos, tmp_path):
    """bf16 base shards with fp32 LoRA kept whole. Rank 1 alone gets a NaN loss at step 3: both
    ranks still run backward (whose collectives would otherwise wait forever; plain data parallel
    hangs the same way), both see the NaN gradient, skip that step and stay equal. SIGTERM reaches
    rank 1 alone, during step 2: both ranks stop after step 2 (none waits forever for the other)
    and the main one writes the checkpoint; resumed to 4 steps (the NaN again at step 3), the LoRA
    equals the uninterrupted run exactly, on both ranks."""
    model, cache = tiny_models("flux2-klein"), tmp_path / "cache"
    extra = {"train.sharding": "fsdp", "train.mixed_precision": "bf16", "train.gradient_checkpointing": "true",
             "train.save_every": 10}
    straight = tmp_path / "straight"
    launch_two(settings(model, photos, straight, cache, batch_size=2, **extra), env_extra={"NAN_ON_RANK": "1"})
    assert [r["skipped_steps"] for r in metrics(straight)] == [0, 0, 1, 1]
    resumed = tmp_path / "resumed"
    args = settings(model, photos, resumed, cache, batch_size=2, **extra)
    stopped = launch_two(args, env_extra={"SIGTERM_ON_RANK": "1"}, check=False)
    assert stopped.returncode != 0 and "stopped on" in stopped.stdout + stopped.stderr
    assert sorted(p.name for p in (resumed / "state").iterdir() if p.name.startswith("step-")) == ["step-000002"]
    # The resumed processes' first loss is step 3's.
    launch_two(args + ["train.resume=latest"], env_extra={"NAN_ON_RANK": "1", "FAULT_AT_CALL": "1"})
    assert [r["skipped_steps"] for r in metrics(resumed)] == [0, 0, 1, 1]
    assert same_on_both_ranks(straight) and same_on_both_ranks(resumed)
    a, b = load_file(straight / "rank0.safetensors"), load_file(resumed / "rank0.safetensors")
    assert all(v.dtype == torch.float32 for v in a.values())
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ROOT = Path(__file__).parent.parent


def test_shipped_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert [f.name for f in files] == ["ddp-multinode.yaml", "ddp.yaml"]
    for file in files:
        config = ClusterConfig.from_yaml_file(str(file))  # unknown keys raise
        assert config.distributed_type == DistributedType.MULTI_GPU and config.mixed_precision == "bf16"


def test_slurm_script_launches_one_process_per_gpu_on_every_node():
    env = {**os.environ, "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "h100:4", "MASTER_ADDR": "node07",
           "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), "configs/flux2-dev.yaml",
                           "train.max_steps=10"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout
    for part in ["--num_machines 3", "--num_processes 12", "--machine_rank $SLURM_NODEID",
                 "--main_process_ip node07", "--main_process_port 29500", "-m fluxtune.cli train configs/flux2-dev.yaml train.max_steps=10"]:
        assert part in line, part
    missing = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), "c.yaml"],
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "SLURM_JOB_NUM_NODES" in missing.stderr


def test_accelerate_sharding_modes_are_refused_with_advice():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fluxtune.errors import UserError
    from fluxtune.models.sharding import refuse_accelerate_sharding

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match="configs/accelerate/ddp.yaml.*train.sharding=fsdp"):
            refuse_accelerate_sharding(SimpleNamespace(distributed_type=kind))
    refuse_accelerate_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


def test_sharding_refuses_settings_that_move_the_weights_it_splits():
    base = ["output_dir=o", "model.path=m", "data.path=d", "train.sharding=fsdp"]
    for extra, key in [("train.blocks_to_swap=2", "train.blocks_to_swap"), ("model.quantize=nf4", "model.quantize"),
                       ("train.compile=true", "train.compile")]:
        with pytest.raises(ValueError, match=key):
            load_config(None, base + [extra])
    assert load_config(None, base).train.sharding == "fsdp"
