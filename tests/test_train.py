"""End to end: train tiny FLUX.1, FLUX.2-dev and FLUX.2-klein pipelines through the CLI, then load
the LoRA with plain diffusers (no fluxtune code) and check it is the model we trained.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtune.cli import main
from fluxtune.config import load_config
from fluxtune.models.tiny import make_tiny
from fluxtune.train import train

PIPELINES = {"flux1": FluxPipeline, "flux1-schnell": FluxPipeline, "flux2": Flux2Pipeline, "flux2-klein": Flux2KleinPipeline}
RANK, ALPHA = 4, 8  # alpha != rank: a loader that drops the scale would be caught


def overrides(model, photos, out, cache, steps=3, **extra):
    items = {
        "output_dir": out, "model.path": model, "data.path": photos, "data.resolution": 64,
        "data.cache_dir": cache, "train.max_steps": steps, "train.batch_size": 2, "train.seed": 1,
        "lora.rank": RANK, "lora.alpha": ALPHA, "optim.lr": 1e-2, "train.save_every": 2, **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def pipe_output(kind, pipe, prompt="a photo of a cat, in the style of sks"):
    extra = {"text_encoder_out_layers": (1, 2, 3)} if kind.startswith("flux2") else {}
    out = pipe(prompt=prompt, width=64, height=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **extra).images
    return np.asarray(out)


def merged_by_hand(transformer, lora_file, scale):
    """W + scale * B @ A for every pair in the file, computed here without peft or diffusers."""
    state = load_file(lora_file)
    modules = dict(transformer.named_modules())
    merged = 0
    for key in state:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            a, b = state[key], state[key.replace("lora_A", "lora_B")]
            with torch.no_grad():
                modules[name].weight += scale * (b @ a)
            merged += 1
    return merged


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
def test_cli_train_then_plain_diffusers_load(kind, tiny_models, photos, tmp_path):
    model = tiny_models(kind)
    out = tmp_path / "run"
    assert main(["train", "/dev/null", *overrides(model, photos, out, tmp_path / "cache")]) == 0

    lora_dir = out / "lora"
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step-000002").is_dir()
    with safe_open(lora_file, "pt") as f:
        keys = set(f.keys())
        adapter_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert adapter_meta["transformer.r"] == RANK and adapter_meta["transformer.lora_alpha"] == ALPHA
    # every single block got its LoRA too, not only the double blocks
    assert any(".single_transformer_blocks." in k for k in keys)
    with safe_open(lora_file, "pt") as f:  # the base it was trained for travels with the file
        assert f.metadata()["fluxtune.base_model"] == str(model)
        expected_class = "FluxTransformer2DModel" if kind == "flux1" else "Flux2Transformer2DModel"
        assert f.metadata()["fluxtune.base_class"] == expected_class

    pipe = PIPELINES[kind].from_pretrained(model)
    base = pipe_output(kind, pipe)
    pipe.load_lora_weights(lora_dir)
    (adapter,) = pipe.transformer.peft_config
    loaded = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter).items()}
    saved = load_file(lora_file)
    assert set(loaded) == set(saved), "keys missing or unexpected after load_lora_weights"
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with_lora = pipe_output(kind, pipe)
    assert np.abs(with_lora - base).max() > 1e-3, "the LoRA does not change the output"

    by_hand = PIPELINES[kind].from_pretrained(model)
    assert merged_by_hand(by_hand.transformer, lora_file, ALPHA / RANK) == len(saved) // 2
    np.testing.assert_allclose(pipe_output(kind, by_hand), with_lora, atol=2e-4)


def test_only_lora_changes_and_loaded_lora_matches_trained_model(tiny_models, photos, tmp_path):
    model = tiny_models("flux2-klein")
    cfg = load_config(None, overrides(model, photos, tmp_path / "run", tmp_path / "cache", steps=4))
    result = train(cfg)
    trained = result.transformer.eval()

    base = Flux2KleinPipeline.from_pretrained(model).transformer
    base_params = dict(base.named_parameters())
    changed_lora = 0
    for name, p in trained.named_parameters():
        if "lora_" in name:
            changed_lora += "lora_B" in name and bool(p.abs().sum() > 0)
        else:
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base_params[key].detach()), f"frozen weight {name} changed"
    assert changed_lora > 0

    pipe = Flux2KleinPipeline.from_pretrained(model)
    pipe.load_lora_weights(result.lora_path.parent)
    torch.manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 128), "encoder_hidden_states": torch.randn(1, 8, 192),
        "timestep": torch.tensor([0.5]),
        "img_ids": Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, 4, 4)),
        "txt_ids": Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 8, 192)),
        "return_dict": False,
    }
    with torch.no_grad():
        ours, theirs = trained(**inputs)[0], pipe.transformer(**inputs)[0]
        untouched = base(**inputs)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - untouched).abs().max() > 1e-4


def test_second_run_reuses_cache_and_encodes_nothing(photos, tmp_path):
    model = make_tiny("flux1", tmp_path / "model")  # its own copy: the test rewrites it
    args = overrides(model, photos, tmp_path / "a", tmp_path / "cache", steps=1)
    first = train(load_config(None, args))
    assert first.cache.latents_encoded == 3 and first.cache.texts_encoded == 3

    args = overrides(model, photos, tmp_path / "b", tmp_path / "cache", steps=1)
    second = train(load_config(None, args))
    assert (second.cache.latents_encoded, second.cache.texts_encoded, second.cache.reused) == (0, 0, 3)

    # a different resolution is a different latent, but the same captions
    third = train(load_config(None, args + ["data.resolution=96"]))
    assert (third.cache.latents_encoded, third.cache.texts_encoded) == (3, 0)

    # new weights saved at the same path must not be served the old embeddings
    make_tiny("flux1", model, seed=7)
    fourth = train(load_config(None, args))
    assert (fourth.cache.latents_encoded, fourth.cache.texts_encoded) == (3, 3)


def test_broken_images_are_skipped_with_a_warning(tiny_models, photos, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for f in photos.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    (data / "empty.png").write_bytes(b"")
    (data / "truncated.jpg").write_bytes((photos / "coffee.jpg").read_bytes()[:2000])
    (data / "notes.jpg").write_text("this is not an image")
    args = overrides(tiny_models("flux2-klein"), data, tmp_path / "run", tmp_path / "cache", steps=1)
    with caplog.at_level("WARNING", logger="fluxtune"):
        result = train(load_config(None, args))
    assert result.cache.skipped == 1  # empty.png and notes.jpg are skipped when the folder is scanned
    for name in ["empty.png", "truncated.jpg", "notes.jpg"]:
        assert any(name in r.getMessage() for r in caplog.records), name


def test_no_usable_image_is_a_clear_error(tiny_models, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    args = overrides(tiny_models("flux2-klein"), data, tmp_path / "run", tmp_path / "cache", steps=1)
    assert main(["train", "/dev/null", *args]) == 1
    err = capsys.readouterr().err
    assert "none of the 1 images could be read" in err and str(data) in err


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
def test_generate_cli_writes_png_and_lora_changes_it(kind, tiny_models, photos, tmp_path):
    from PIL import Image

    model = tiny_models(kind)
    cfg = load_config(None, overrides(model, photos, tmp_path / "run", tmp_path / "cache", steps=2))
    lora_dir = train(cfg).lora_path.parent
    common = ["generate", "--model", str(model), "--prompt", "a photo of a cat", "--steps", "2",
              "--width", "64", "--height", "64", "--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", str(lora_dir), "--scale", "4", "--out", str(tmp_path / "lora.png")]) == 0
    base, lora = (Image.open(tmp_path / f"{n}.png") for n in ("base", "lora"))
    assert base.size == (64, 64) and "a photo of a cat" in lora.text["fluxtune"]
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(lora, dtype=int)).max() > 0


def test_same_seed_same_lora_and_options_run(tiny_models, photos, tmp_path):
    model = tiny_models("flux1-schnell")  # no guidance embedder
    opts = {"train.grad_accum": 2, "train.gradient_checkpointing": "true", "lora.dropout": 0.1,
            "optim.scheduler": "linear", "optim.warmup_steps": 1, "train.sigma.sampling": "shift"}
    runs = [train(load_config(None, overrides(model, photos, tmp_path / n, tmp_path / "cache", **opts)))
            for n in ("a", "b")]
    a, b = (load_file(r.lora_path) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_bf16_autocast_and_flex_guidance_bypass(tiny_models, photos, tmp_path):
    model = tiny_models("flux1")
    args = overrides(model, photos, tmp_path / "run", tmp_path / "cache", steps=2,
                     **{"train.mixed_precision": "bf16", "model.bypass_guidance": "true"})
    result = train(load_config(None, args))
    assert np.isfinite(result.final_loss)
    assert type(result.transformer.time_text_embed).__name__ == "_TimestepTextEmbedOnly"
    assert all(p.dtype == torch.float32 for n, p in result.transformer.named_parameters() if "lora_" in n)
    FluxPipeline.from_pretrained(model).load_lora_weights(result.lora_path.parent)
