"""Faults: SIGKILL mid-run and mid-write, SIGTERM, NaN steps, a full disk, broken checkpoints,
an unwritable output folder. A crash costs at most the steps since the last checkpoint; a resumed
run ends bit-identical to one that was never interrupted.
"""

import errno
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fluxtune import train as train_module
from fluxtune.training import checkpoint
from fluxtune.training.checkpoint import CheckpointError, latest_state, load_state, save_state, verify
from fluxtune.cli import main
from fluxtune.config import load_config
from fluxtune.errors import EXIT_PREEMPTED
from fluxtune.train import TrainingDiverged, train

STEPS = 12


def settings(model, photos, out, **extra):
    # 3 photos x 3 repeats in batches of 2: 4 batches an epoch, so runs cross epoch boundaries;
    # dropout and EMA make the global RNG and EMA state part of what must be restored.
    return {"output_dir": str(out), "model": {"path": str(model)},
            "data": {"path": str(photos), "resolution": 64, "repeats": 3},
            "lora": {"rank": 4, "dropout": 0.1},
            "optim": {"lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2},
            "train": {"max_steps": STEPS, "batch_size": 2, "save_every": 3, "seed": 7, "ema_decay": 0.8,
                      "resume": "latest", **extra}}


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def spawn(config_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fluxtune.cli", "train", str(config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def resume_here(config, caplog) -> str:
    """The resumed run, in this process (one thread, like the killed one): it goes through the same
    command, and a launch fewer keeps the suite fast. Returns what it logged."""
    caplog.clear()
    with caplog.at_level("INFO", logger="fluxtune"):
        assert main(["train", str(config)]) == 0, caplog.text
    return caplog.text


def wait_for_step(proc, out, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and losses(out) and max(losses(out)) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise AssertionError("training did not reach the step in time")


@pytest.fixture(scope="module")
def reference(tiny_models, photos, tmp_path_factory):
    """An uninterrupted run (in this process, one thread, like the subprocesses)."""
    out = tmp_path_factory.mktemp("reference")
    data = settings(tiny_models("flux2-klein"), photos, out)
    result = train(load_config(write_config(out / "config.yaml.in", data)))
    return data, load_file(result.lora_path), load_file(out / "lora_ema" / "pytorch_lora_weights.safetensors"), losses(out)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, caplog):
    data, lora, ema, reference_losses = reference
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", {**data, "output_dir": str(out)})
    kill_at = random.Random().randint(4, STEPS - 1)
    proc = spawn(config)
    wait_for_step(proc, out, kill_at)
    proc.kill()
    proc.wait()
    assert latest_state(out / "state") is not None  # a checkpoint survived the kill

    assert "resumed from" in resume_here(config, caplog)
    assert same_tensors(load_file(out / "lora" / "pytorch_lora_weights.safetensors"), lora), f"killed at {kill_at}"
    assert same_tensors(load_file(out / "lora_ema" / "pytorch_lora_weights.safetensors"), ema)
    assert losses(out) == reference_losses  # the same loss history, rows after the checkpoint rewritten


def test_sigterm_writes_a_checkpoint_and_exits_75_then_resumes(reference, tmp_path, caplog):
    data, lora, _, _ = reference
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", {**data, "output_dir": str(out)})
    proc = spawn(config)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, output
    stopped_at = max(losses(out))
    assert load_state(latest_state(out / "state"))[1]["step"] == stopped_at < STEPS
    assert "train.resume=latest" in output

    assert "resumed from" in resume_here(config, caplog)
    assert same_tensors(load_file(out / "lora" / "pytorch_lora_weights.safetensors"), lora)


def test_in_process_resume_with_gradient_accumulation(tiny_models, photos, tmp_path):
    """Stop after 5 of 9 steps (a run with max_steps=5 leaves its final state), extend to 9.
    (A constant schedule: a cosine one's shape depends on max_steps, so extending changes it.)"""
    base = settings(tiny_models("flux1"), photos, tmp_path / "a", grad_accum=2, max_steps=9)
    base["optim"]["scheduler"] = "constant"
    full = train(load_config(write_config(tmp_path / "a.yaml", base)))
    short = {**base, "output_dir": str(tmp_path / "b"), "train": {**base["train"], "max_steps": 5}}
    train(load_config(write_config(tmp_path / "b.yaml", short)))
    extended = train(load_config(write_config(tmp_path / "b.yaml", {**short, "train": base["train"]})))
    assert same_tensors(load_file(full.lora_path), load_file(extended.lora_path))


# ------------------------------------------------------------------ checkpoints that cannot be trusted

def write_checkpoints_forever(root):
    for step in range(1, 10_000):
        save_state(root, step, {"w": torch.full((2_000_000,), float(step))}, {"payload": step}, keep=2)


def test_sigkill_during_checkpoint_writes_never_leaves_a_valid_looking_broken_one(tmp_path):
    root = tmp_path / "state"
    torn = 0
    for _ in range(6):
        (root / "latest").unlink(missing_ok=True)
        # A forked child: a process of its own, killed for real, without importing torch again.
        proc = multiprocessing.get_context("fork").Process(target=write_checkpoints_forever, args=(root,))
        proc.start()
        deadline = time.time() + 60
        while not (root / "latest").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.5))  # 8 MB a checkpoint: most kills land mid-write
        proc.kill()
        proc.join()
        torn += any(root.glob(".tmp-*"))
        found = latest_state(root, warn=False)
        assert found is not None and not found.name.startswith(".tmp")
        tensors, meta = load_state(found)  # it verifies and holds exactly what was written
        assert torch.all(tensors["w"] == float(meta["step"])) and meta["payload"] == meta["step"]
        for folder in root.glob("step-*"):
            assert verify(folder) is None, folder  # a finished folder is only ever a whole checkpoint
    print(f"{torn} of 6 kills left a half-written checkpoint behind; none was taken for valid")


def test_truncated_and_corrupt_checkpoints_fall_back_to_the_previous_one(tmp_path, caplog):
    root = tmp_path / "state"
    for step in (1, 2, 3):
        save_state(root, step, {"w": torch.full((4,), float(step))}, {}, keep=5)
    newest = root / "step-000003" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:-5])  # truncated
    middle = root / "step-000002" / "state.json"
    middle.write_text(middle.read_text().replace("2", "9"))  # corrupted
    with caplog.at_level("WARNING", logger="fluxtune"):
        found = latest_state(root)
    assert found == root / "step-000001"
    assert "step-000003" in caplog.text and "step-000002" in caplog.text
    with pytest.raises(CheckpointError, match="checksum"):
        load_state(root / "step-000003")


def test_disk_full_during_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    root = tmp_path / "state"
    save_state(root, 1, {"w": torch.ones(3)}, {}, keep=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*step-000001 is intact"):
        save_state(root, 2, {"w": torch.ones(3)}, {}, keep=3)
    assert latest_state(root) == root / "step-000001" and not list(root.glob(".tmp-*"))


def test_nan_steps_are_skipped_and_counted(tiny_models, photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_module.batch_loss

    def nan_on_third_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "batch_loss", nan_on_third_call)
    data = settings(tiny_models("flux2-klein"), photos, tmp_path / "run", max_steps=5, resume=None)
    result = train(load_config(write_config(tmp_path / "c.yaml", data)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(t).all() for t in load_file(result.lora_path).values())


def test_nan_every_step_stops_with_the_last_good_weights(tiny_models, photos, tmp_path, monkeypatch):
    model = tiny_models("flux2-klein")
    good_settings = settings(model, photos, tmp_path / "good", max_steps=2, resume=None, ema_decay=None)
    good_settings["optim"] = {"lr": 1e-2}
    good = train(load_config(write_config(tmp_path / "g.yaml", good_settings)))
    real = train_module.batch_loss
    calls = {"n": 0}

    def nan_from_third_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(train_module, "batch_loss", nan_from_third_call)
    data = settings(model, photos, tmp_path / "bad", max_steps=20, resume=None, ema_decay=None, max_bad_steps=3)
    data["optim"] = {"lr": 1e-2}
    with pytest.raises(TrainingDiverged, match="NaN/Inf for 3 steps in a row.*optim.lr"):
        train(load_config(write_config(tmp_path / "b.yaml", data)))
    tensors, meta = load_state(latest_state(tmp_path / "bad" / "state"))
    assert meta["step"] == 5
    trained = load_file(good.lora_path)
    saved = {k.removeprefix("lora.").replace(".default", ""): v for k, v in tensors.items() if k.startswith("lora.")}
    assert same_tensors({f"transformer.{k}": v for k, v in saved.items()}, trained)


def test_unwritable_output_folder_fails_before_any_model_loads(tmp_path, photos, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [f"output_dir={blocker / 'run'}", "model.path=/does/not/matter", f"data.path={photos}"]
    assert main(["train", "/dev/null", *args]) == 1
    err = capsys.readouterr().err
    assert "cannot write there" in err and "model_index" not in err


def test_a_second_signal_exits_at_once_and_corrupts_nothing(reference, tmp_path):
    data, _, _, _ = reference
    out = tmp_path / "run"
    long_run = {**data, "output_dir": str(out), "train": {**data["train"], "max_steps": 500}}
    proc = spawn(write_config(tmp_path / "config.yaml", long_run))
    wait_for_step(proc, out, 4)
    proc.send_signal(signal.SIGTERM)  # two different signals: both are delivered, neither is merged
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert re.search(r"second SIG(INT|TERM): exiting now", output)
    found = latest_state(out / "state")
    assert found is not None and load_state(found)[1]["step"] <= max(losses(out))


def test_too_little_disk_space_fails_before_any_model_loads(tmp_path, photos, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    args = [f"output_dir={tmp_path / 'run'}", "model.path=/does/not/matter", f"data.path={photos}"]
    assert main(["train", "/dev/null", *args]) == 1
    assert "only 1 MiB free" in capsys.readouterr().err
