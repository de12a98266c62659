"""LoRA target presets hit the right layers of real-size FLUX architectures, and bad targets fail
with a message that says what to write instead."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

from fluxtune.errors import LoraError
from fluxtune.models.families import flux1, flux2
from fluxtune.lora.adapter import add_lora, check_targets, count_adapted, matched_modules

# Real block counts and widths (FLUX.1-dev, FLUX.2-dev); built on the meta device: names, no memory.
FLUX1_DEV = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
FLUX2_DEV = dict(num_layers=8, num_single_layers=48, num_attention_heads=48, attention_head_dim=128,
                 joint_attention_dim=15360)


def meta_model(cls, config):
    with torch.device("meta"):
        return cls(**config)


def split(names):
    single = [n for n in names if n.startswith("single_transformer_blocks.")]
    return len(names) - len(single), len(single)


@pytest.mark.parametrize(
    "cls,config,presets,expected",
    [
        (FluxTransformer2DModel, FLUX1_DEV, flux1.PRESETS,
         # double: q k v out + the text stream's q k v out; single: q k v + the fused proj_out
         {"attention": (19 * 8, 38 * 4), "attention+mlp": (19 * 12, 38 * 5), "all-linear": (19 * 14, 38 * 6)}),
        (Flux2Transformer2DModel, FLUX2_DEV, flux2.PRESETS,
         # single blocks: the fused qkv+mlp input projection and the fused output projection
         {"attention": (8 * 8, 48 * 2), "attention+mlp": (8 * 12, 48 * 2), "all-linear": (8 * 12, 48 * 2)}),
    ],
)
def test_presets_cover_double_and_single_blocks_of_real_architectures(cls, config, presets, expected):
    model = meta_model(cls, config)
    for preset, counts in expected.items():
        matched = matched_modules(model, presets[preset])
        assert split(list(matched)) == counts, preset
        assert all(isinstance(m, torch.nn.Linear) for m in matched.values())
        assert "proj_out" not in matched  # the final head stays frozen


def test_flux2_attention_preset_includes_fused_single_block_projections():
    matched = matched_modules(meta_model(Flux2Transformer2DModel, FLUX2_DEV), flux2.PRESETS["attention"])
    assert "single_transformer_blocks.47.attn.to_qkv_mlp_proj" in matched
    assert "single_transformer_blocks.47.attn.to_out" in matched
    assert "transformer_blocks.7.attn.to_out.0" in matched


def test_targets_as_list_and_regex(tiny_models):
    from fluxtune.models.families import load_family

    family = load_family(str(tiny_models("flux2-klein")))
    t = family.load_transformer(torch.float32)
    add_lora(t, rank=2, alpha=4, targets=["attn.to_q", "to_qkv_mlp_proj"])
    assert count_adapted(t) == {"double": 1, "single": 1, "other": 0}

    t = family.load_transformer(torch.float32)
    params = add_lora(t, rank=2, alpha=None, targets=r"transformer_blocks\.0\.attn\.to_(k|v)")
    assert count_adapted(t) == {"double": 2, "single": 0, "other": 0}
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert sum(p.requires_grad for p in t.parameters()) == len(params)


@pytest.mark.parametrize(
    "targets,message",
    [
        (["to_out"], "not Linear layers"),  # FLUX.2's double-block to_out is a ModuleList
        (["nonexistent"], "matches no module"),
        ("blocks_typo.*", "matches no module"),
    ],
)
def test_bad_targets_say_what_to_write(targets, message):
    model = meta_model(Flux2Transformer2DModel, {**FLUX2_DEV, "num_layers": 1, "num_single_layers": 1})
    with pytest.raises(LoraError, match=message) as err:
        check_targets(model, targets)
    assert "transformer_blocks.0." in str(err.value) or "attn.to_out.0" in str(err.value)
