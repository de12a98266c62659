"""LoRA layouts: every export loads back through diffusers' own loaders and converters with every
layer present and the same output as the adapter it came from.

Tiny FLUX.1, FLUX.2-dev and FLUX.2-klein pipelines get a random LoRA (rank 4, alpha 8: a loader
that drops the scale is caught) on every Linear the widest preset adapts. diffusers' FLUX.1 kohya
converter hard-codes the real block counts and widths (19/38 blocks, 3072 wide), so that layout is
checked at the state-dict level with the real FLUX.1-dev module set.
"""

import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from fluxtune.errors import LoraError
from fluxtune.models.families import load_family
from fluxtune.models.families.flux1 import PRESETS as FLUX1_PRESETS
from fluxtune.lora.adapter import add_lora, resolve_targets
from fluxtune.lora.formats import (
    FORMATS,
    Adapter,
    LoraModule,
    adapter_from_model,
    content_hash,
    delta_close,
    from_state_dict,
    read_lora,
    to_state_dict,
    write_lora,
)

ARCH = {"flux1": "flux1", "flux2": "flux2", "flux2-klein": "flux2"}
PRESET = {"flux1": "all-linear", "flux2": "attention+mlp", "flux2-klein": "attention+mlp"}
# diffusers reads FLUX.1 kohya files only at the real size (see the real-size test below).
LOADABLE = [("flux1", "diffusers")] + [(k, f) for k in ("flux2", "flux2-klein") for f in FORMATS]


def latents(pipe, fam):
    return pipe(prompt="a photo of sks", height=64, width=64, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **fam.pipeline_kwargs()).images


def adapted_layers(transformer) -> set[str]:
    return {n for n, m in transformer.named_modules() if getattr(m, "lora_A", None)}


@pytest.fixture(scope="module")
def lora_on(tiny_models):
    """kind -> (family, adapter, output with the LoRA, output without): made once per kind."""
    made = {}

    def get(kind):
        if kind not in made:
            fam = load_family(str(tiny_models(kind)))
            pipe = fam.load_pipeline(torch.float32)
            base = latents(pipe, fam)
            add_lora(pipe.transformer, rank=4, alpha=8, targets=resolve_targets(fam, PRESET[kind]))
            g = torch.Generator().manual_seed(0)
            for name, p in pipe.transformer.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=g) * 0.1
            made[kind] = (fam, adapter_from_model(pipe.transformer, ARCH[kind]), latents(pipe, fam), base)
        return made[kind]

    return get


@pytest.mark.parametrize("kind,fmt", LOADABLE)
def test_export_loads_in_diffusers_with_every_layer_and_the_same_output(lora_on, kind, fmt, tmp_path):
    fam, adapter, with_lora, base = lora_on(kind)
    file = write_lora(adapter, tmp_path / "lora.safetensors", fmt)
    pipe = fam.load_pipeline(torch.float32)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    assert adapted_layers(pipe.transformer) == set(adapter.modules)  # a dropped key fails here
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the output: equality below means something
    torch.testing.assert_close(latents(pipe, fam), with_lora, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_reads_back_exactly(lora_on, kind, fmt, tmp_path):
    _, adapter, _, _ = lora_on(kind)
    back = read_lora(write_lora(adapter, tmp_path / "x.safetensors", fmt))
    assert back.arch == ARCH[kind]
    assert set(back.modules) == set(adapter.modules)
    assert delta_close(adapter, back, atol=1e-6) == []
    assert back.ranks() == {4}  # fused projections split back into the original per-layer ranks


def test_flux1_kohya_and_comfyui_at_real_size_through_the_diffusers_converter():
    """FLUX.1-dev's real module set (19 double, 38 single blocks, every Linear of the all-linear
    preset), rank 2 and alpha 3: diffusers' converter must give back each layer's exact change."""
    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                       in_channels=64, guidance_embeds=True)
    pattern = re.compile(FLUX1_PRESETS["all-linear"])
    g = torch.Generator().manual_seed(0)
    modules = {n: LoraModule(torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), 3.0)
               for n, m in model.named_modules() if pattern.fullmatch(n)}
    assert len(modules) == 19 * 14 + 38 * 6  # every Linear in every block
    adapter = Adapter(modules, "flux1")
    kohya, _ = to_state_dict(adapter, "kohya")
    comfy, _ = to_state_dict(adapter, "comfyui")
    assert kohya.keys() == comfy.keys() and all(torch.equal(kohya[k], comfy[k]) for k in kohya)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_unet_single_blocks_37_linear1.lora_down.weight" in kohya  # q, k, v and MLP fused

    converted = FluxPipeline.lora_state_dict(dict(kohya))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(modules)
    back = from_state_dict(converted, {}, "flux1")
    assert back.ranks() == {2}  # the block-diagonal layout was recognised and split per layer
    for name, m in modules.items():
        probe = torch.randn(m.down.shape[1], 3, generator=g, dtype=torch.float64)
        b = back.modules[name]
        want = m.scale * m.up.double() @ (m.down.double() @ probe)
        got = b.scale * b.up.double() @ (b.down.double() @ probe)
        assert ((got - want).norm() / want.norm()) < 1e-6, name


def _partial(adapter: Adapter) -> Adapter:
    """q with rank 2 and alpha 1, v with rank 4 and alpha 8, k missing: fusing must pad, fold the
    different scales, and leave k untouched."""
    modules = {}
    for name, m in adapter.modules.items():
        if name.endswith("attn.to_k"):
            continue
        if name.endswith("attn.to_q"):
            m = LoraModule(m.down[:2], m.up[:, :2], 1.0)
        modules[name] = m
    return Adapter(modules, adapter.arch)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_mixed_ranks_scales_and_missing_parts_fuse_exactly(lora_on, fmt, tmp_path):
    fam, full, _, _ = lora_on("flux2-klein")
    adapter = _partial(full)
    file = write_lora(adapter, tmp_path / "p.safetensors", fmt)
    back = read_lora(file)
    assert set(back.modules) == set(adapter.modules)
    assert delta_close(adapter, back, atol=1e-6) == []

    reference = fam.load_pipeline(torch.float32)
    write_lora(adapter, tmp_path / "ref" / "r.safetensors", "diffusers")
    reference.load_lora_weights(str(tmp_path / "ref"), weight_name="r.safetensors")
    pipe = fam.load_pipeline(torch.float32)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    assert set(adapter.modules) <= adapted_layers(pipe.transformer)
    torch.testing.assert_close(latents(pipe, fam), latents(reference, fam), atol=2e-5, rtol=0)


def test_double_block_attention_alone_needs_the_arch(lora_on, tmp_path):
    _, adapter, _, _ = lora_on("flux2")
    only = Adapter({n: m for n, m in adapter.modules.items() if n.startswith("transformer_blocks.")
                    and ".attn.to_" in n}, "flux2")
    tensors, _ = to_state_dict(only, "diffusers")
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # no header: nothing says which FLUX
    with pytest.raises(LoraError, match="--arch flux1 or --arch flux2"):
        read_lora(tmp_path / "bare.safetensors")
    assert read_lora(tmp_path / "bare.safetensors", arch="flux2").arch == "flux2"


def test_header_travels_and_hash_covers_the_tensors(lora_on, tmp_path):
    _, adapter, _, _ = lora_on("flux2")
    tagged = Adapter(adapter.modules, "flux2", {"modelspec.title": "cats", "modelspec.trigger_phrase": "sks"})
    file = write_lora(tagged, tmp_path / "a.safetensors", "kohya")
    back = read_lora(file)
    assert back.metadata["modelspec.title"] == "cats" and back.metadata["modelspec.trigger_phrase"] == "sks"
    converted = write_lora(back, tmp_path / "b.safetensors", "diffusers")
    from safetensors import safe_open

    with safe_open(str(converted), "pt") as f:
        header = f.metadata()
    assert header["modelspec.title"] == "cats" and header["fluxtune.format"] == "diffusers"
    assert header["modelspec.hash_sha256"] == content_hash(load_file(converted))


def test_files_that_are_not_loras_say_what_is_wrong(tmp_path):
    save_file({"transformer.x.weight": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(LoraError, match="not LoRA weights: x.weight"):
        read_lora(tmp_path / "weights.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match="only one of the two LoRA matrices"):
        read_lora(tmp_path / "half.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(LoraError, match="not a readable .safetensors"):
        read_lora(tmp_path / "torn.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"x")
    with pytest.raises(LoraError, match="no pickle"):
        read_lora(tmp_path / "old.ckpt")
    save_file({"model.layer.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraError, match="no layout this tool reads"):
        read_lora(tmp_path / "other.safetensors")
