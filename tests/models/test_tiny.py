"""The tiny pipelines of fluxtune.models.tiny save, reload offline and generate with stock diffusers.

Run: HF_HUB_OFFLINE=1 pytest -q tests/test_tiny.py  (CPU, a few seconds after the imports)
"""

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, FluxPipeline

from fluxtune.models.tiny import KINDS, make_tiny

PIPELINES = {
    "flux1": FluxPipeline,
    "flux1-schnell": FluxPipeline,
    "flux2": Flux2Pipeline,
    "flux2-klein": Flux2KleinPipeline,
}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        # huggingface_hub reads HF_HUB_OFFLINE once, at import: the env var alone may come too late.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tiny_models):
    kind = request.param
    return kind, PIPELINES[kind].from_pretrained(tiny_models(kind))


def generate(kind, pipe, prompt):
    # FLUX.2 pipelines take `image` first, hence prompt by keyword; their tiny encoders have 3 layers.
    extra = {"text_encoder_out_layers": (1, 2, 3)} if kind.startswith("flux2") else {}
    return pipe(
        prompt=prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **extra,
    ).images


def test_generates_finite_images_that_depend_on_the_prompt(tiny):
    kind, pipe = tiny
    cat = generate(kind, pipe, "a photo of a cat")
    rocket = generate(kind, pipe, "a red rocket in space")
    assert cat.shape == rocket.shape == (1, 64, 64, 3)
    assert np.isfinite(cat).all() and np.isfinite(rocket).all()
    assert not np.allclose(cat, rocket)


def test_keeps_the_real_geometry(tiny):
    kind, pipe = tiny
    config = pipe.transformer.config
    assert pipe.vae_scale_factor == 8
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    if kind.startswith("flux1"):
        assert config.in_channels == 4 * pipe.vae.config.latent_channels == 64
        assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
        assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
        assert config.guidance_embeds == (kind == "flux1")
    else:
        assert config.in_channels == 4 * pipe.vae.config.latent_channels == 128
        text_config = pipe.text_encoder.config.get_text_config()
        assert text_config.num_hidden_layers == 3  # so text_encoder_out_layers=(1, 2, 3) is valid
        assert config.joint_attention_dim == 3 * text_config.hidden_size
        assert config.guidance_embeds == (kind == "flux2")
        # Non-trivial stats, so latent normalisation is really exercised.
        assert not torch.allclose(pipe.vae.bn.running_mean, torch.zeros(()))
        assert not torch.allclose(pipe.vae.bn.running_var, torch.ones(()))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_files(kind, tmp_path):
    def files(seed, name):
        root = make_tiny(kind, tmp_path / name, seed=seed)
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    first, again, other = files(0, "a"), files(0, "b"), files(1, "c")
    assert any(name.endswith(".safetensors") for name in first)
    assert first == again
    assert first != other


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="flux2-klein"):
        make_tiny("flux3", tmp_path)
