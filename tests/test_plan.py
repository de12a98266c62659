"""fluxtune.plan: the memory planner.

Real FLUX.1-dev and FLUX.2-dev shapes come from folders holding only their config files (no
weights, offline); predictions are checked against training-step peaks measured on CPU on medium
random-weight models (scripts/plan_check.py measures them); the CLI and the train() hook last.
"""

import importlib.util
import logging
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fluxtune.cli import main
from fluxtune.config import load_config
from fluxtune.errors import ModelError
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_lora, resolve_targets
from fluxtune.training.optim import make_optimizer
from fluxtune.models.memory import GIB, optimizer_bytes
from fluxtune.plan import parse_memory, plan, predict, read_shapes, settings_of, warn_if_too_big

ROOT = Path(__file__).parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


plan_check = _script("plan_check")  # loads bench_train beside it, whose ARCHS hold the real transformer configs

# The real checkpoints' other config files: CLIP ViT-L/14 text and T5 v1.1 XXL (FLUX.1),
# Mistral-Small-3.1-24B (FLUX.2-dev), and the two VAEs.
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}
_T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
           "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
_MISTRAL_SMALL = {
    "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                    "max_position_embeddings": 131072, "rope_theta": 1e9, "tie_word_embeddings": False},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14},
    "spatial_merge_size": 2, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
}
_FLUX1_VAE = {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
PARTS = {
    "flux1-dev": {"text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
                  "text_encoder_2": ("transformers", "T5EncoderModel", _T5_XXL),
                  "vae": ("diffusers", "AutoencoderKL", _FLUX1_VAE)},
    "flux2-dev": {"text_encoder": ("transformers", "Mistral3ForConditionalGeneration", _MISTRAL_SMALL),
                  "vae": ("diffusers", "AutoencoderKLFlux2", {})},
}


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    """arch -> a folder with the real model's model_index.json and component configs only."""
    folders = {}
    for arch, parts in PARTS.items():
        pipeline, transformer, _ = plan_check.bench.ARCHS[arch]
        files = {"model_index.json": {"_class_name": pipeline, **{name: [lib, cls] for name, (lib, cls, _) in parts.items()}},
                 "transformer/config.json": transformer,
                 **{f"{name}/config.json": config for name, (_, _, config) in parts.items()}}
        folders[arch] = plan_check.write_configs(tmp_path_factory.mktemp(arch), files)
    return folders


def _rows(p, phase, prefix):
    return sum(v for k, v in p.phases[phase].items() if k.startswith(prefix)) / GIB


def test_flux1_dev_plan(real_shapes, capsys):
    p = plan(load_config(ROOT / "configs/flux1-dev.yaml", [f"model.path={real_shapes['flux1-dev']}"]))
    print(p.table())
    table = capsys.readouterr().out
    assert all(f"{c} GB:" in table for c in (16, 24, 48, 80))
    assert 11.8e9 < p.shapes.transformer.params < 12.0e9  # FLUX.1-dev: 11.9B
    assert 21.5 < _rows(p, "training", "transformer weights (bf16)") < 24
    assert 8.7 < _rows(p, "cache captions", "text_encoder_2") < 9.0  # T5 XXL encoder, 4.76B in bf16
    assert 0.01 < _rows(p, "training", "LoRA weights") < 0.2  # rank 16 on attention: 18.7M
    assert p.peak_phase == "training" and p.fits(80 * GIB) and not p.fits(16 * GIB) and not p.fits(24 * GIB)
    # A 16 GB card: checkpointing is on already, so 8-bit Adam, smaller images, then a 4-bit base.
    steps = [s.change for s in p.suggestions(16 * GIB)]
    assert steps[0] == "optim.name=adamw8bit" and any(s.startswith("model.quantize=nf4") for s in steps)
    nf4 = predict(p.shapes, replace(p.settings, optimizer="adamw8bit", quantize="nf4"))
    assert 6 < nf4.totals["training"] / GIB < 12  # users report ~9 GB for an nf4 base at 1024 px


def test_flux2_dev_plan(real_shapes, capsys):
    p = plan(load_config(ROOT / "configs/flux2-dev.yaml", [f"model.path={real_shapes['flux2-dev']}"]))
    print(p.table())
    assert "80 GB: fits" in capsys.readouterr().out
    assert 32.0e9 < p.shapes.transformer.params < 32.5e9
    assert 58 < _rows(p, "training", "transformer weights (bf16)") < 62
    assert 43 < _rows(p, "cache captions", "text_encoder (Mistral3") < 46  # 24B in bf16
    # 24 GB: a 4-bit base (and a 4-bit text encoder while caching); 16 GB: only several GPUs.
    assert p.suggestions(24 * GIB)[-1].change == "model.quantize=nf4"
    assert "model.quantize_text_encoders=nf4 brings it to" in p.table(24 * GIB)
    # Between a 4-bit base (20.8 GiB) and FSDP over 8 GPUs (16.3 GiB): on 18 GB cards, sharding over 7.
    last = p.suggestions(18 * GIB)[-1]
    assert last.change == "train.sharding=fsdp model.quantize=none over 7 such GPUs (per GPU)"
    assert 16 * GIB < last.peak <= 18 * GIB
    assert p.suggestions(16 * GIB)[-1].change.startswith("nothing above fits; train.sharding=fsdp over 8")


def test_sharded_plan_splits_only_the_frozen_weights(real_shapes):
    """train.sharding=fsdp over 4 GPUs: a quarter of FLUX.2-dev's weights per GPU plus the gathered
    pieces; LoRA, optimizer state and activations are the same as on one GPU."""
    cfg = load_config(ROOT / "configs/flux2-dev.yaml", [f"model.path={real_shapes['flux2-dev']}", "train.sharding=fsdp",
                                                      "model.quantize=none"])
    one, four = plan(cfg), plan(cfg, gpus=4)
    whole = _rows(one, "training", "transformer weights (bf16)")
    assert _rows(four, "training", "transformer weights (bf16, 1/4 per GPU)") == pytest.approx(whole / 4, rel=1e-6)
    gathered = _rows(four, "training", "FSDP: gathered")
    assert 0 < gathered < 0.1 * whole
    for row in ("LoRA weights", "optimizer state", "activations"):
        assert _rows(four, "training", row) == _rows(one, "training", row)
    assert four.totals["training"] < one.totals["training"] - 0.7 * whole
    assert "each loads the whole transformer" in four.table()


def test_hub_id_without_cached_configs_fails_clearly():
    with pytest.raises(ModelError, match="black-forest-labs/FLUX.1-dev"):
        plan(load_config(ROOT / "configs/flux1-dev.yaml"))


@pytest.mark.parametrize("case", plan_check.default_cases(), ids=lambda c: c.label())
def test_prediction_within_25_percent_of_measured_peak(case):
    """Weights + LoRA + optimizer state + gradients + activations against the bytes live at the
    step's peak (CPU: no CUDA context on either side)."""
    result = plan_check.check(case)
    print(f"{case.label()}: predicted {result.predicted / 2**20:.1f} MiB, measured {result.measured / 2**20:.1f} MiB "
          f"({100 * result.error:+.1f}%); step adds {result.predicted_dynamic / 2**20:.1f} vs "
          f"{result.measured_dynamic / 2**20:.1f} MiB")
    assert abs(result.error) < 0.25
    # What the step adds (activations, gradients) on its own too: weights do not dilute it.
    assert abs(result.predicted_dynamic / result.measured_dynamic - 1) < 0.25


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy", "adafactor"])
def test_optimizer_state_bytes(name, tmp_path):
    """The planner's optimizer state against the state each optimizer really allocates for a LoRA."""
    package = {"prodigy": "prodigyopt", "adamw8bit": "bitsandbytes", "paged_adamw8bit": "bitsandbytes",
               "lion8bit": "bitsandbytes"}.get(name)
    if package:
        pytest.importorskip(package)
    case = plan_check.Case(plan_check.medium("FluxPipeline", 1, 1), optimizer=name)
    cfg = case.config(tmp_path)
    family = load_family(cfg.model.path, max_sequence_length=case.text_tokens)
    transformer = plan_check.bench.random_transformer(family, case.arch[1], torch.device("cpu"), torch.float32)
    params = add_lora(transformer, rank=16, alpha=16, targets=resolve_targets(family, "attention"))
    optimizer = make_optimizer(params, name, lr=1e-4, weight_decay=0.0, **cfg.optim.own_settings())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    allocated = plan_check.tensor_bytes([t for state in optimizer.state.values() for t in state.values()])
    predicted = optimizer_bytes(read_shapes(cfg.model, cfg.lora), settings_of(cfg))
    assert predicted == pytest.approx(allocated, rel=0.02)


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24 GiB") == parse_memory("24") == 24 * GIB
    assert parse_memory("81559MiB") == 81559 * 2**20
    assert parse_memory("0.5TB") == 512 * GIB
    for bad in ("lots", "24XB", "-3GB", "0", ""):
        with pytest.raises(ValueError, match="cannot read"):
            parse_memory(bad)


def test_cli_plan(real_shapes, capsys):
    assert main(["plan", str(ROOT / "configs/flux1-dev.yaml"), f"model.path={real_shapes['flux1-dev']}",
                 "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "24 GB: does not fit" in out and "80 GB" not in out
    with pytest.raises(SystemExit) as stop:
        main(["plan", str(ROOT / "configs/flux1-dev.yaml"), "--gpu-memory", "24XB"])
    assert stop.value.code == 2
    assert "cannot read '24XB' as a memory size" in capsys.readouterr().err


def test_train_hook_warns_on_a_small_gpu_and_never_fails(real_shapes, monkeypatch, caplog):
    cfg = load_config(ROOT / "configs/flux1-dev.yaml", [f"model.path={real_shapes['flux1-dev']}"])
    with caplog.at_level(logging.INFO, logger="fluxtune"):
        warn_if_too_big(cfg)  # CPU: nothing to check
        assert not caplog.records
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=16 * GIB))
        warn_if_too_big(cfg)
        assert "more than this GPU's 16.0 GiB" in caplog.records[-1].getMessage()
        warn_if_too_big(load_config(ROOT / "configs/flux1-dev.yaml", ["model.path=/nonexistent"]))
        assert "memory plan skipped" in caplog.records[-1].getMessage()


# train.sharding=fsdp against what a sharded step really holds per process: two CPU processes over
# gloo each build the same medium random-weight model as the single-process check, shard it with
# fluxtune.models.sharding.shard_base and run the trainer's step (forward, backward, LoRA gradient
# averaging, optimizer step); each measures its own peak with the profiler. Both cases run in one
# launch: importing torch, diffusers and peft in each process is most of the time.

SHARDED_CASES = plan_check.sharded_cases()


@pytest.fixture(scope="module")
def sharded_results():
    return plan_check.check_sharded_cases(SHARDED_CASES, processes=2)


@pytest.mark.parametrize("index", range(len(SHARDED_CASES)), ids=[c.label() for c in SHARDED_CASES])
def test_sharded_prediction_within_25_percent_of_each_ranks_peak(sharded_results, index):
    """Per rank: its shards, the whole LoRA and optimizer state, plus its step's peak (gathered
    weights, activations, gradients) against the plan for fsdp_gpus=2, less the CUDA overhead row."""
    mib = 2**20
    ranks = sharded_results[index]
    assert [r.rank for r in ranks] == [0, 1]
    for r in ranks:
        held = ", ".join(f"{unit} {size / mib:.1f}" for unit, size in r.at_peak.items())
        phases = ", ".join(f"{name} {peak / mib:.1f} (FSDP {fsdp / mib:.1f})"
                           for name, (peak, fsdp) in r.phases.items())
        print(f"{r.case.label()} rank {r.rank}: predicted {r.predicted / mib:.1f} MiB, "
              f"measured {r.measured / mib:.1f} MiB "
              f"({100 * r.error:+.1f}%); step adds {r.measured_dynamic / mib:.1f} MiB sharded (plan: "
              f"{r.predicted_dynamic / mib:.1f}) vs {r.single_dynamic / mib:.1f} MiB in one process; FSDP held at the "
              f"peak ({r.phase_at_peak}): {held} MiB (plan's gathered row {r.predicted_gathered / mib:.1f}); by phase: "
              f"{phases} MiB; unbalanced {r.unbalanced / mib:.1f} MiB")
        assert r.gathered_at_peak > 0  # the measurement saw FSDP gather: the base really was sharded
        assert abs(r.error) < 0.25
