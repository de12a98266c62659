"""Samples during training, the evaluation loss, EMA and run tracking on tiny models."""

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtune.data.cache import build_cache, default_cache_dir
from fluxtune.config import load_config
from fluxtune.data.loader import CachedDataset
from fluxtune.data.sources import bucket_targets, scan_image_folder, split_holdout
from fluxtune.training.evaluation import evaluation_loss
from fluxtune.models.families import load_family
from fluxtune.train import train

PROMPTS = '["a photo of a cat", {prompt: "a rocket, in the style of sks", seed: 5, width: 64, height: 96}]'


def config(model, photos, out, **extra):
    items = {"output_dir": out, "model.path": model, "data.path": photos, "data.resolution": 64,
             "train.max_steps": 4, "train.batch_size": 1, "train.seed": 3, "optim.lr": 1e-2,
             "lora.rank": 4, "lora.dropout": 0.1, "sample.steps": 2, **extra}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
def test_sampling_does_not_change_the_trained_lora(kind, tiny_models, photos, tmp_path):
    model = tiny_models(kind)
    plain = train(config(model, photos, tmp_path / "plain"))
    sampled = train(config(model, photos, tmp_path / "sampled", **{"sample.every": 2, "sample.prompts": PROMPTS}))
    a, b = load_file(plain.lora_path), load_file(sampled.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    grids = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]  # base, every 2, last
    first, last = (np.asarray(Image.open(tmp_path / "sampled" / "samples" / g)) for g in (grids[0], grids[-1]))
    assert first.shape == (96, 128, 3)  # 64x64 and 64x96 side by side
    assert np.abs(first.astype(int) - last.astype(int)).max() > 0, "samples do not show the LoRA"


def test_sample_matches_the_pipeline_with_the_saved_lora(tiny_models, photos, tmp_path):
    """A training sample is what plain diffusers renders with the saved LoRA, same prompt and seed."""
    model = tiny_models("flux2-klein")
    prompt = "a photo of a cat"
    result = train(config(model, photos, tmp_path / "run", **{"sample.every": 4, "sample.before_training": "false",
                                                              "sample.prompts": f'["{prompt}"]'}))
    sample = np.asarray(Image.open(tmp_path / "run" / "samples" / "step-000004.png"))
    pipe = Flux2KleinPipeline.from_pretrained(model)
    pipe.load_lora_weights(result.lora_path.parent)
    image = pipe(prompt=prompt, width=64, height=64, num_inference_steps=2, text_encoder_out_layers=(1, 2, 3),
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(image).astype(int) - sample.astype(int)).max() <= 1


def test_evaluation_loss_is_deterministic_and_logged(tiny_models, photos, tmp_path):
    model = tiny_models("flux1")
    cfg = config(model, photos, tmp_path / "run", **{"eval.fraction": 0.3, "eval.every": 2,
                                                     "eval.sigmas": "[0.25, 0.75]"})
    result = train(cfg)
    assert set(result.eval_loss) == {"eval/loss", "eval/loss_sigma_0.25", "eval/loss_sigma_0.75"}

    # the held-out image's cache entries, as the run made them (same cache folder: reused, not re-encoded)
    family = load_family(str(model))
    _, held_out = split_holdout(scan_image_folder(photos), 0.3)
    sizes = bucket_targets(held_out, 64, step=16, upscale=False, max_aspect=4.0)  # the run's buckets
    entries, stats = build_cache(family, held_out, default_cache_dir(), 64, torch.device("cpu"), sizes=sizes)
    assert len(held_out) == 1 and stats.reused == 1
    dataset = CachedDataset(list(entries.values()))
    kwargs = dict(sigmas=[0.25, 0.75], seed=cfg.eval.seed, guidance=1.0, device="cpu")
    result.transformer.train()
    first = evaluation_loss(family, result.transformer, dataset, **kwargs)
    second = evaluation_loss(family, result.transformer, dataset, **kwargs)
    assert first == second == result.eval_loss  # same weights, same numbers, to the last bit
    assert result.transformer.training  # evaluation restores the mode it found

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
    # a separate held-out folder works the same way
    other = train(config(model, photos, tmp_path / "other", **{"eval.path": photos, "eval.every": 4}))
    assert other.eval_loss["eval/loss"] > 0 and len(other.eval_loss) == 1 + 5  # mean + the 5 default sigmas
    assert len({r["eval/loss"] for r in rows if "eval/loss" in r}) == 2  # it moves as the weights do


def test_ema_is_saved_beside_the_lora_and_loads(tiny_models, photos, tmp_path):
    model = tiny_models("flux1")
    result = train(config(model, photos, tmp_path / "run", **{"train.ema_decay": 0.5, "train.save_every": 2}))
    ema_file = tmp_path / "run" / "lora_ema" / "pytorch_lora_weights.safetensors"
    assert (tmp_path / "run" / "checkpoints" / "step-000002_ema").is_dir()
    raw, ema = load_file(result.lora_path), load_file(ema_file)
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    with safe_open(ema_file, "pt") as f:
        assert f.metadata()["fluxtune.step"] == "4"
    FluxPipeline.from_pretrained(model).load_lora_weights(ema_file.parent)


def test_offline_wandb_run_holds_losses_and_sample_images(tiny_models, photos, tmp_path, offline_wandb):
    from wandb_files import history_rows, one_run_dir, settled_records

    out = tmp_path / "run"
    result = train(config(tiny_models("flux2-klein"), photos, out, **{
        "log.backend": "wandb", "log.every": 1, "log.project": "tests", "log.artifacts": "true",
        "sample.every": 2, "sample.prompts": PROMPTS, "eval.fraction": 0.3, "eval.every": 2}))

    assert result.run_id and (out / "wandb_run_id.txt").read_text().strip() == result.run_id
    run_dir = one_run_dir(offline_wandb, result.run_id)
    rows = history_rows(settled_records(next(run_dir.glob("run-*.wandb"))))
    losses = {r["_step"]: r["loss"] for r in rows if "loss" in r}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in logged if "loss" in r}
    assert all(k in r for r in rows if "loss" in r for k in ("lr", "grad_norm", "step_s", "images_per_s",
                                                               "peak_memory_gib", "epoch"))
    assert sorted(r["_step"] for r in rows if "eval/loss" in r) == [2, 4]
    sample_steps = sorted(r["_step"] for r in rows if r.get("samples._type") == "images/separated")
    assert sample_steps == [0, 2, 4]
    assert len(list((run_dir / "files" / "media" / "images").glob("*.png"))) == 2 * len(sample_steps)

    with safe_open(result.lora_path, "pt") as f:  # the file traces back to its run
        assert f.metadata()["fluxtune.run_id"] == result.run_id
