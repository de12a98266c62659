"""Pipelines fluxtune did not make: train them with a minimal config, load the LoRA with plain diffusers.

The promise under test: a FLUX.1, a FLUX.2-dev and a FLUX.2-klein pipeline saved with
`save_pretrained` (any small shape) train with `fluxtune train` given only `model.path`, `data.path`,
`output_dir` and `train.max_steps`, and the LoRA loads into that pipeline with plain diffusers with
no missing or unexpected keys and changes its output.

The pipelines are built here from diffusers / transformers classes, with shapes unlike
fluxtune.models.tiny's (block counts, heads, head dim, rope split, text widths, VAE channels, and FLUX.2
text encoders too shallow for the official (10, 20, 30) / (9, 18, 27) layers). Only the tokenizers
come from a fluxtune.models.tiny folder, loaded like a downloaded tokenizer.

Run: pytest -q tests/test_external_pipelines.py
"""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from fluxtune.cli import main
from fluxtune.errors import ModelError
from fluxtune.models.families import load_family

PIPELINES = {"flux1": FluxPipeline, "flux2": Flux2Pipeline, "flux2-klein": Flux2KleinPipeline}
# What fluxtune must pick on its own: FLUX.1 has no such setting; the FLUX.2 encoders below have
# 5 and 4 layers, so the official layers do not exist and the last three hidden states are used.
EXPECTED_OUT_LAYERS = {"flux1": None, "flux2": (3, 4, 5), "flux2-klein": (2, 3, 4)}
PROMPT = "a photo of a cat, in the style of sks"


# --- pipelines built from library classes ------------------------------------------------------


def _scheduler():
    # As shipped with FLUX.1-dev and FLUX.2: resolution-dependent shift.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _vae_layout(channels):
    # Four levels: the real downsampling factor of 8.
    return dict(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=4,
    )


def _flux1(tokenizers):
    clip_tok = CLIPTokenizer.from_pretrained(tokenizers / "tokenizer")
    t5_tok = T5Tokenizer.from_pretrained(tokenizers / "tokenizer_2")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok) + 5, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=3, max_position_embeddings=77, projection_dim=24,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok) + 3, d_model=40, d_kv=8, d_ff=56, num_layers=3, num_heads=5,
        feed_forward_proj="gated-gelu", pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
    ))
    vae = AutoencoderKL(
        **_vae_layout((4, 8, 12, 12)), latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=8,
        joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    return FluxPipeline(scheduler=_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def _flux2_vae():
    vae = AutoencoderKLFlux2(**_vae_layout((4, 8, 8, 12)), latent_channels=32)
    with torch.no_grad():  # real checkpoints carry non-trivial latent statistics
        vae.bn.running_mean.uniform_(-0.3, 0.3)
        vae.bn.running_var.uniform_(0.7, 1.5)
    return vae


def _flux2_transformer(joint_attention_dim, guidance, heads, head_dim, axes):
    return Flux2Transformer2DModel(
        in_channels=128, num_layers=2, num_single_layers=2, num_attention_heads=heads,
        attention_head_dim=head_dim, joint_attention_dim=joint_attention_dim, axes_dims_rope=axes,
        guidance_embeds=guidance,
    )


def _flux2(tokenizers):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizers / "tokenizer")
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(tok) + 11, hidden_size=24, intermediate_size=40, num_hidden_layers=5,
            num_attention_heads=3, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=1, image_size=32, patch_size=8),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
    ))
    return Flux2Pipeline(
        scheduler=_scheduler(), vae=_flux2_vae(), text_encoder=text_encoder, tokenizer=tok,
        transformer=_flux2_transformer(3 * 24, guidance=True, heads=4, head_dim=8, axes=(2, 2, 2, 2)),
    )


def _flux2_klein(tokenizers):
    tok = Qwen2Tokenizer.from_pretrained(tokenizers / "tokenizer")
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok) + 9, hidden_size=40, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    return Flux2KleinPipeline(
        scheduler=_scheduler(), vae=_flux2_vae(), text_encoder=text_encoder, tokenizer=tok,
        transformer=_flux2_transformer(3 * 40, guidance=False, heads=2, head_dim=24, axes=(4, 6, 6, 8)),
        is_distilled=False,
    )


BUILDERS = {"flux1": _flux1, "flux2": _flux2, "flux2-klein": _flux2_klein}


@pytest.fixture(scope="module")
def external(tmp_path_factory, tiny_models):
    """kind -> folder of a pipeline built and saved here (once per module)."""
    made = {}

    def get(kind):
        if kind not in made:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(7)
                pipe = BUILDERS[kind](tiny_models(kind))
            made[kind] = tmp_path_factory.mktemp(f"external-{kind}")
            pipe.save_pretrained(made[kind], safe_serialization=True)
        return made[kind]

    return get


# --- helpers -----------------------------------------------------------------------------------


def call_kwargs(kind):
    layers = EXPECTED_OUT_LAYERS[kind]
    return {} if layers is None else {"text_encoder_out_layers": layers}


def image(kind, pipe):
    out = pipe(prompt=PROMPT, width=64, height=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **call_kwargs(kind)).images
    return np.asarray(out, dtype=np.float64)


def transformer_output(pipe, seed=0):
    """The transformer's raw velocity on fixed random inputs of its own shapes."""
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8  # a 4x4 token grid
    inputs = {
        "hidden_states": torch.randn(1, tokens, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, cfg.joint_attention_dim, generator=g),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
        "return_dict": False,
    }
    if isinstance(pipe, FluxPipeline):
        inputs["pooled_projections"] = torch.randn(1, cfg.pooled_projection_dim, generator=g)
        inputs["img_ids"] = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        inputs["txt_ids"] = torch.zeros(text, 3)
    else:
        inputs["img_ids"] = type(pipe)._prepare_latent_ids(torch.zeros(1, cfg.in_channels, 4, 4))
        inputs["txt_ids"] = type(pipe)._prepare_text_ids(torch.zeros(1, text, cfg.joint_attention_dim))
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


def check_cached_text_matches_diffusers(kind, pipe, cache_dir, captions):
    """Every text embedding fluxtune trained on is what this pipeline's own encode_prompt gives
    (so, for FLUX.2, fluxtune used EXPECTED_OUT_LAYERS)."""
    with torch.no_grad():
        if kind == "flux1":
            embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, max_sequence_length=512)
            reference = [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(embeds, pooled)]
        else:
            embeds, _ = pipe.encode_prompt(prompt=captions, max_sequence_length=512, **call_kwargs(kind))
            reference = [{"prompt_embeds": e} for e in embeds]
    cached = [load_file(f) for f in sorted((cache_dir / "text").glob("*.safetensors"))]
    assert len(cached) == len(captions)
    for entry in cached:
        assert any(
            entry.keys() == ref.keys() and all(
                entry[k].shape == ref[k].shape and torch.allclose(entry[k], ref[k], atol=1e-5) for k in ref
            )
            for ref in reference
        ), f"a cached text embedding matches no caption encoded by {type(pipe).__name__} with {call_kwargs(kind)}"


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_minimal_config_trains_external_pipeline_and_lora_loads_with_plain_diffusers(
    kind, external, tiny_models, photos, tmp_path, monkeypatch
):
    model = external(kind)
    # Not fluxtune.models.tiny's geometry: the trainer must read shapes from the checkpoint.
    ours = json.loads((model / "transformer" / "config.json").read_text())
    tiny = json.loads((tiny_models(kind) / "transformer" / "config.json").read_text())
    for key in ("num_layers", "num_single_layers", "attention_head_dim", "joint_attention_dim", "axes_dims_rope"):
        assert ours[key] != tiny[key], key

    cache = tmp_path / "cache"
    monkeypatch.setenv("FLUXTUNE_CACHE", str(cache))  # the default cache location; never the home folder
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out), "model": {"path": str(model)}, "data": {"path": str(photos)},
        "train": {"max_steps": 2},
    }), encoding="utf-8")
    assert main(["train", str(config)]) == 0

    # The defaults were what ran: 512 px, batch 1, 2 steps.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["resolution"] == 512 and resolved["train"]["batch_size"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert len(list((cache / "latents").glob("*.safetensors"))) == 3

    lora_dir = out / "lora"
    saved = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert any(".single_transformer_blocks." in k for k in saved) and any(".transformer_blocks." in k for k in saved)
    lora_b = [v for k, v in saved.items() if ".lora_B." in k]
    assert lora_b and all(bool(v.abs().max() > 0) for v in lora_b), "a lora_B is still zero: training did nothing"

    assert getattr(load_family(str(model)), "out_layers", None) == EXPECTED_OUT_LAYERS[kind]
    # the run records the layers it used, for inference outside fluxtune
    recorded = json.loads((out / "summary.json").read_text())["model"].get("out_layers")
    assert (tuple(recorded) if recorded else None) == EXPECTED_OUT_LAYERS[kind]

    pipe = PIPELINES[kind].from_pretrained(model)
    captions = sorted({p.read_text(encoding="utf-8").strip() for p in photos.glob("*.txt")})
    check_cached_text_matches_diffusers(kind, pipe, cache, captions)

    base_image, base_raw = image(kind, pipe), transformer_output(pipe)
    pipe.load_lora_weights(lora_dir)
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    expected = {k.removeprefix("transformer."): v for k, v in saved.items()}
    assert set(loaded) == set(expected), (
        f"missing {sorted(set(expected) - set(loaded))[:3]}, unexpected {sorted(set(loaded) - set(expected))[:3]}"
    )
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    lora_image, lora_raw = image(kind, pipe), transformer_output(pipe)
    assert lora_image.shape == base_image.shape == (1, 64, 64, 3) and np.isfinite(lora_image).all()
    # Two steps at lr 1e-4 move lora_B by ~1e-4, and outputs by ~1e-4 (measured 4e-5..6e-4): small,
    # but far above float noise (~1e-7).
    assert (lora_raw - base_raw).abs().max() > 1e-6, "the LoRA does not change the transformer's output"
    assert np.abs(lora_image - base_image).max() > 1e-6, "the LoRA does not change the image"


def test_flux2_out_layers_are_derived_for_a_shallow_encoder_and_checked(external):
    model = str(external("flux2"))
    assert load_family(model).out_layers == (3, 4, 5)  # the default (10, 20, 30) needs 30 layers
    assert load_family(model, text_encoder_out_layers=(1, 3, 5)).out_layers == (1, 3, 5)
    with pytest.raises(ModelError, match=r"model\.text_encoder_out_layers"):
        load_family(model, text_encoder_out_layers=(1, 2, 9))  # the encoder has 5 layers
    with pytest.raises(ModelError, match=r"model\.text_encoder_out_layers"):
        load_family(model, text_encoder_out_layers=(-1, 2, 3))
