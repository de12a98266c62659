"""Selectable optimizers: each one trains on CPU and resumes bit for bit from a checkpoint; the
schema takes each optimizer's own settings and names the key when one is misplaced; a missing
optional package fails before any model loads, naming the pip extra.
"""

import logging
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxtune.training.checkpoint import load_state, optimizer_from_flat, optimizer_to_flat
from fluxtune.cli import main
from fluxtune.config import OPTIMIZER_SETTINGS, ConfigError, load_config
from fluxtune.errors import UserError
from fluxtune.training.optim import make_optimizer
from fluxtune.train import train

STEPS, STOP = 6, 3
# An lr that moves a tiny model in a few steps; Prodigy's lr multiplies its own estimate.
LR = {"adamw": 1e-2, "adamw8bit": 1e-2, "paged_adamw8bit": 1e-2, "lion8bit": 1e-3, "prodigy": 1.0, "adafactor": 1e-2}
EIGHT_BIT = {"adamw8bit", "paged_adamw8bit", "lion8bit"}
QUANT_STATE = "__bnb_optimizer_quant_state__"  # where bitsandbytes nests its per-parameter state


def overrides(name, model, photos, out, **extra):
    # Rank 128: every LoRA matrix of the tiny model then has 4096+ elements, the size from which
    # bitsandbytes keeps 8-bit state (below it falls back to 32-bit and the test would miss uint8).
    items = {"output_dir": out, "model.path": model, "data.path": photos, "data.resolution": 64,
             "lora.rank": 128, "lora.dropout": 0.1, "optim.name": name, "optim.lr": LR[name],
             "optim.scheduler": "cosine", "optim.warmup_steps": 1, "train.max_steps": STEPS,
             "train.batch_size": 2, "train.save_every": STOP, "train.seed": 5, **extra}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.parametrize("name", list(OPTIMIZER_SETTINGS))
def test_each_optimizer_trains_and_resumes_bit_identically(name, tiny_models, photos, tmp_path, recwarn):
    """A run of STEPS steps, and a second run started from the first one's step-STOP checkpoint
    (what a stopped or preempted run leaves), end with the same LoRA to the bit."""
    model = tiny_models("flux2-klein")
    straight = train(load_config(None, overrides(name, model, photos, tmp_path / "straight")))
    weights = load_file(straight.lora_path)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert all(torch.isfinite(v).all() for v in weights.values()) and any(v.abs().sum() > 0 for v in lora_b)

    checkpoint = tmp_path / "straight" / "state" / f"step-{STOP:06d}"
    tensors, meta = load_state(checkpoint)
    if name in EIGHT_BIT:
        first_moments = {k: v for k, v in tensors.items() if k.endswith(f"{QUANT_STATE}.state1")}
        assert len(first_moments) == len(weights) and all(v.dtype == torch.uint8 for v in first_moments.values())
    if name == "prodigy":  # its step-size estimate lives in the param groups, saved as JSON
        (group,) = meta["optimizer"]["param_groups"]
        assert group["k"] > 0 and group["d_numerator"] != 0

    resumed = train(load_config(None, overrides(name, model, photos, tmp_path / "resumed",
                                                **{"train.resume": checkpoint})))
    again = load_file(resumed.lora_path)
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    if name == "paged_adamw8bit":  # bitsandbytes pages state only on CUDA
        assert any("Paged optimizers are not supported on CPU" in str(w.message) for w in recwarn)


def test_quantized_state_round_trips_through_safetensors(tmp_path):
    """bitsandbytes shares one quantization map between parameters and nests its state; both
    survive the flat safetensors + JSON form, and the restored optimizer steps identically."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    first = make_optimizer(params, "adamw8bit", lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    grads = [[torch.randn(64, 64) for _ in params] for _ in range(3)]
    for p, g in zip(params, grads[0]):
        p.grad = g
    first.step()
    tensors, meta = optimizer_to_flat(first.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "state.safetensors")

    with torch.no_grad():
        for c, p in zip(copies, params):
            c.copy_(p)
    second = make_optimizer(copies, "adamw8bit", lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    second.load_state_dict(optimizer_from_flat(load_file(tmp_path / "state.safetensors"), meta))
    for step_grads in grads[1:]:
        for opt, ps in ((first, params), (second, copies)):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(p, c) for p, c in zip(params, copies))


# ------------------------------------------------------------------ config


def config(tmp_path, *items):
    return load_config(None, [f"output_dir={tmp_path}", "model.path=m", "data.path=d", *items])


def problems(tmp_path, *items):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, *items)
    return info.value.problems


@pytest.mark.parametrize("name", list(OPTIMIZER_SETTINGS))
def test_each_optimizer_gets_its_own_defaults(name, tmp_path):
    cfg = config(tmp_path, f"optim.name={name}")
    assert cfg.optim.own_settings() == OPTIMIZER_SETTINGS[name]
    assert cfg.optim.lr == 1e-4  # never changed behind the user's back, whatever the optimizer
    shown = cfg.to_dict()["optim"]  # the resolved config lists this optimizer's settings only
    assert {k for k in shown if k not in ("name", "lr", "weight_decay", "max_grad_norm", "scheduler",
                                          "warmup_steps")} == set(OPTIMIZER_SETTINGS[name])


def test_lion_default_betas_differ_from_adams(tmp_path):
    assert config(tmp_path, "optim.name=lion8bit").optim.betas == (0.9, 0.99)
    assert config(tmp_path, "optim.name=adamw8bit").optim.betas == (0.9, 0.999)
    assert config(tmp_path, "optim.name=lion8bit", "optim.betas=[0.95, 0.98]").optim.betas == (0.95, 0.98)


@pytest.mark.parametrize("items, expected", [
    (["optim.d_coef=0.5"], "optim.d_coef: only applies to prodigy, not to optim.name adamw"),
    (["optim.name=lion8bit", "optim.eps=1e-6"],
     "optim.eps: only applies to adamw, adamw8bit, paged_adamw8bit and prodigy, not to optim.name lion8bit"),
    (["optim.name=adafactor", "optim.betas=[0.9, 0.99]"], "optim.betas: only applies to adamw, adamw8bit"),
    (["optim.name=prodigy", "optim.scale_parameter=true"], "optim.scale_parameter: only applies to adafactor"),
    (["optim.name=adamw8bit", "optim.safeguard_warmup=true"], "optim.safeguard_warmup: only applies to prodigy"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas.1: should be less than 1"),
    (["optim.name=prodigy", "optim.d_coef=0"], "optim.d_coef: should be greater than 0"),
    (["optim.name=adafactor", "optim.decay_rate=0.5"], "optim.decay_rate: should be less than or equal to 0"),
    (["optim.name=adamw-8bit"], "optim.name: should be 'adamw', 'adamw8bit', 'paged_adamw8bit', 'lion8bit', "
                                "'prodigy' or 'adafactor'"),
    (["optim.dcoef=1"], "optim.dcoef: unknown key; did you mean 'optim.d_coef'?"),
])
def test_misplaced_and_invalid_settings_name_the_key(tmp_path, items, expected):
    (line,) = problems(tmp_path, *items)
    assert line.startswith(expected), line


def test_every_misplaced_setting_is_reported_at_once(tmp_path):
    lines = problems(tmp_path, "optim.name=lion8bit", "optim.eps=1e-6", "optim.d_coef=2", "optim.beta1=0.9")
    assert sorted(line.split(":")[0] for line in lines) == ["optim.beta1", "optim.d_coef", "optim.eps"]


def test_validate_prints_the_chosen_optimizers_settings_and_reloads(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", "model.path=m", "data.path=d", "optim.name=adamw8bit"]
    assert main(["validate", "/dev/null", *args]) == 0
    printed = capsys.readouterr().out
    assert "name: adamw8bit" in printed and "eps: 1.0e-08" in printed and "d_coef" not in printed
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml") == config(tmp_path, "optim.name=adamw8bit")


@pytest.mark.parametrize("items, warned", [
    (["optim.name=lion8bit"], "Lion"),
    (["optim.name=lion8bit", "optim.lr=3e-5"], None),
    (["optim.name=prodigy"], "expects optim.lr around 1.0"),
    (["optim.name=prodigy", "optim.lr=1.0", "optim.warmup_steps=10"], "optim.safeguard_warmup"),
    (["optim.name=prodigy", "optim.lr=1.0", "optim.warmup_steps=10", "optim.safeguard_warmup=true"], None),
    (["optim.name=adamw"], None),
])
def test_unusual_lr_is_warned_about_not_changed(tmp_path, caplog, items, warned):
    with caplog.at_level(logging.WARNING, logger="fluxtune"):
        config(tmp_path, *items)
    assert (warned in caplog.text) if warned else not caplog.text


@pytest.mark.parametrize("name, package, extra", [("adamw8bit", "bitsandbytes", "bnb"),
                                                  ("prodigy", "prodigyopt", "prodigy")])
def test_missing_package_fails_before_any_model_loads(name, package, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: its import raises
    cfg = config(tmp_path / "run", f"optim.name={name}", "optim.lr=1.0", "model.path=/does/not/exist")
    with pytest.raises(UserError, match=rf"needs the {package} package.*pip install 'fluxtune\[{extra}\]'"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing happened yet


def test_resuming_with_another_optimizer_names_both(tiny_models, photos, tmp_path):
    """Optimizer state does not carry over between optimizers: say so instead of a KeyError."""
    from fluxtune.training.checkpoint import CheckpointError

    model = tiny_models("flux2-klein")
    train(load_config(None, overrides("adamw", model, photos, tmp_path / "first")))
    checkpoint = tmp_path / "first" / "state" / f"step-{STOP:06d}"
    with pytest.raises(CheckpointError, match="holds adamw optimizer state, but optim.name is lion8bit"):
        train(load_config(None, overrides("lion8bit", model, photos, tmp_path / "second",
                                          **{"train.resume": checkpoint})))
