"""`fluxtune lora ...`: resize by SVD, combine, merge, check, convert and info, on tiny FLUX.1 and
FLUX.2 pipelines, each result loaded back through diffusers.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxtune.cli import main
from fluxtune.errors import LoraError
from fluxtune.models.families import load_family
from fluxtune.lora.formats import Adapter, LoraModule, delta_close, read_lora, write_lora
from fluxtune.lora.tools import check, combine, low_rank, merge_into, resize

from test_lora_formats import adapted_layers, latents


def random_adapter(fam, arch, rank, seed, alpha=None) -> Adapter:
    """A LoRA of `rank` on every attention layer of the family's transformer, random both sides."""
    from fluxtune.lora.adapter import matched_modules, resolve_targets

    transformer = fam.load_transformer(torch.float32)
    g = torch.Generator().manual_seed(seed)
    modules = {n: LoraModule(torch.randn(rank, m.in_features, generator=g) * 0.2,
                             torch.randn(m.out_features, rank, generator=g) * 0.2, alpha or 2.0 * rank)
               for n, m in matched_modules(transformer, resolve_targets(fam, "attention")).items()}
    return Adapter(modules, arch)


@pytest.fixture(scope="module")
def klein(tiny_models):
    return load_family(str(tiny_models("flux2-klein")))


def loaded(fam, folder, name):
    pipe = fam.load_pipeline(torch.float32)
    pipe.load_lora_weights(str(folder), weight_name=name)
    return pipe


def test_low_rank_is_the_truncated_svd_of_the_change():
    g = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(8, 40, generator=g), torch.randn(30, 8, generator=g), alpha=4.0)
    small, kept = low_rank(module, 3)
    full = module.delta()
    s = torch.linalg.svdvals(full)
    assert small.rank == 3
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-9)
    # Eckart-Young: what is lost is exactly the energy of the dropped singular values
    assert float(((full - small.delta()) ** 2).sum()) == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-6)
    same, kept_all = low_rank(module, 8)
    assert kept_all == pytest.approx(1.0) and torch.allclose(same.delta(), full, atol=1e-4)


def test_resize_cli_reports_energy_and_the_result_loads(klein, tmp_path, capsys):
    big = write_lora(random_adapter(klein, "flux2", rank=8, seed=1), tmp_path / "big.safetensors", "kohya")
    assert main(["lora", "resize", str(big), "--rank", "4", "--out", str(tmp_path / "small" / "s.safetensors"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "8 -> 4" in out and "mean energy kept" in out
    small = read_lora(tmp_path / "small" / "s.safetensors")
    assert small.source_format == "kohya" and small.ranks() == {4}
    resized_from = small.metadata["fluxtune.resized"]
    assert '"to_rank": 4' in resized_from
    pipe = loaded(klein, tmp_path / "small", "s.safetensors")
    assert adapted_layers(pipe.transformer) == set(small.modules)


def test_resize_keeps_everything_when_the_rank_is_already_small(klein):
    adapter = random_adapter(klein, "flux2", rank=4, seed=2)
    same, report = resize(adapter, 16)
    assert delta_close(adapter, same) == [] and report.mean_energy == 1.0
    with pytest.raises(LoraError, match="at least 1"):
        resize(adapter, 0)


def test_combine_equals_the_two_loras_loaded_side_by_side(klein, tmp_path):
    a = write_lora(random_adapter(klein, "flux2", rank=4, seed=3), tmp_path / "a" / "a.safetensors")
    b = write_lora(random_adapter(klein, "flux2", rank=2, seed=4, alpha=1.0), tmp_path / "b" / "b.safetensors")
    assert main(["lora", "combine", f"{a}:0.7", f"{b}:-0.4", "--out", str(tmp_path / "ab" / "ab.safetensors")]) == 0
    both = klein.load_pipeline(torch.float32)
    both.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    both.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    both.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    combined = loaded(klein, tmp_path / "ab", "ab.safetensors")
    torch.testing.assert_close(latents(combined, klein), latents(both, klein), atol=2e-5, rtol=0)
    assert read_lora(tmp_path / "ab" / "ab.safetensors").ranks() == {6}


def test_combine_refuses_mixed_architectures(klein, tiny_models):
    flux1 = random_adapter(load_family(str(tiny_models("flux1"))), "flux1", rank=2, seed=5)
    with pytest.raises(LoraError, match="different architectures"):
        combine([(flux1, 1.0), (random_adapter(klein, "flux2", rank=2, seed=6), 1.0)])


@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
def test_merge_cli_gives_the_output_of_the_loaded_lora(kind, tiny_models, tmp_path):
    fam = load_family(str(tiny_models(kind)))
    arch = "flux1" if kind == "flux1" else "flux2"
    lora = write_lora(random_adapter(fam, arch, rank=4, seed=7), tmp_path / "l" / "l.safetensors",
                      "kohya" if arch == "flux2" else "diffusers")
    assert main(["lora", "merge", str(lora), "--model", str(tiny_models(kind)), "--out", str(tmp_path / "merged"),
                 "--scale", "0.5"]) == 0
    with_lora = loaded(fam, lora.parent, lora.name)
    with_lora.set_adapters(with_lora.get_active_adapters(), adapter_weights=[0.5])
    merged = fam.load_pipeline(torch.float32, transformer=fam.parts.transformer_cls.from_pretrained(tmp_path / "merged"))
    torch.testing.assert_close(latents(merged, fam), latents(with_lora, fam), atol=2e-5, rtol=0)


def test_merge_checks_every_layer_before_changing_any(klein):
    transformer = klein.load_transformer(torch.float32)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    adapter = random_adapter(klein, "flux2", rank=2, seed=8)
    adapter.modules["transformer_blocks.9.attn.to_q"] = next(iter(adapter.modules.values()))
    with pytest.raises(LoraError, match="transformer_blocks.9.attn.to_q: no such Linear"):
        merge_into(transformer, adapter)
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())


def test_check_passes_a_good_file_and_lists_keys_that_would_not_load(klein, tiny_models, tmp_path, capsys):
    model = str(tiny_models("flux2-klein"))
    good = write_lora(random_adapter(klein, "flux2", rank=2, seed=9), tmp_path / "good.safetensors", "comfyui")
    assert main(["lora", "check", str(good), "--model", model]) == 0
    assert "OK: every key loads" in capsys.readouterr().out

    state = load_file(write_lora(random_adapter(klein, "flux2", rank=2, seed=9), tmp_path / "d.safetensors"))
    state["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(2, 8)
    state["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(8, 2)
    name = "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"
    state[name] = torch.zeros(2, state[name].shape[1] + 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    assert main(["lora", "check", str(tmp_path / "bad.safetensors"), "--model", model]) == 1
    out = capsys.readouterr().out
    assert "transformer_blocks.7.attn.to_q: no such layer" in out
    assert "transformer_blocks.0.attn.to_k: LoRA" in out and "does not fit" in out

    report = check(tmp_path / "bad.safetensors", model)
    assert not report.ok and len(report.problems) == 2


def test_check_reports_a_file_diffusers_cannot_convert(tiny_models, tmp_path):
    fam = load_family(str(tiny_models("flux1")))
    lora = write_lora(random_adapter(fam, "flux1", rank=2, seed=10), tmp_path / "k.safetensors", "kohya")
    report = check(lora, str(tiny_models("flux1")))
    # diffusers' FLUX.1 kohya converter assumes FLUX.1-dev's 3072-wide single blocks
    assert not report.ok and "diffusers cannot convert it" in report.problems[0]


def test_convert_cli_round_trip_and_info(klein, tmp_path, capsys):
    start = write_lora(random_adapter(klein, "flux2", rank=4, seed=11), tmp_path / "a.safetensors")
    assert main(["lora", "convert", str(start), "--to", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert main(["lora", "convert", str(tmp_path / "c.safetensors"), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert delta_close(read_lora(start), read_lora(tmp_path / "k.safetensors"), atol=1e-6) == []
    capsys.readouterr()
    assert main(["lora", "info", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "layout:      kohya" in out and "arch:        flux2" in out and "hash:" in out and "matches" in out


def test_info_reads_files_it_cannot_convert(tmp_path, capsys):
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)},
              str(tmp_path / "te.safetensors"), metadata={"ss_network_dim": "2"})
    assert main(["lora", "info", str(tmp_path / "te.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "not one fluxtune converts" in out and "ss_network_dim" in out
