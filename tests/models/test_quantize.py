"""Quantized base (QLoRA): config keys, the quantization configs we build, which layers they quantize,
LoRA training on bitsandbytes and torchao layers, and the early error for bitsandbytes without a GPU.

On CPU: fp8 (torchao) runs for real, end to end; nf4/int8 text encoders load for real through
transformers; the nf4/int8 transformer loads through diffusers' own bitsandbytes quantizer with
only its "No GPU found" check lifted (`diffusers_bnb_on_cpu`), and trains end to end. bitsandbytes'
CPU 4-bit kernel for AVX512-BF16 machines is forced on (`avx512bf16_cpu`) wherever nf4 runs, so
its packing limit shows on any CPU. The `gpu` tests run the real loads and training on a CUDA
machine: `pytest -m gpu tests/test_quantize.py`.
"""

import functools
import json
import sys

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from safetensors.torch import load_file

from fluxtune.cli import main
from fluxtune.config import ConfigError, load_config
from fluxtune.errors import UserError
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_lora
from fluxtune.training import flow
from fluxtune.training.objective import batch_loss
from fluxtune.models.quantize import enable_input_grads, require_quantization, text_encoder_load_kwargs, transformer_load_kwargs
from fluxtune.train import train

bnb = pytest.importorskip("bitsandbytes")

PIPELINES = {"flux1": FluxPipeline, "flux2-klein": Flux2KleinPipeline}
FLUX2_LAYERS = {"flux2-klein": "[1,2,3]"}  # the tiny FLUX.2 text encoders have 3 layers
BNB_LAYERS = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """As on a CPU with AVX512-BF16: bitsandbytes' 4-bit layers made from now on repack their
    weights for its CPU kernel on the first forward without autograd (sampling, text encoding)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


@pytest.fixture
def diffusers_bnb_on_cpu(monkeypatch):
    """diffusers' bitsandbytes quantizers without their environment check, which refuses a machine
    without a GPU ("No GPU found") and weights placed on the CPU, and checks versions this venv
    meets. Everything else (layer replacement, quantizing each weight as it loads) is diffusers'
    and bitsandbytes' own code; fluxtune's early refusal asks the same check, so it passes too."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    for cls in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(cls, "validate_environment", lambda self, *args, **kwargs: None)


def gpu(test):
    """Runs only where torch sees a CUDA GPU; select these with `pytest -m gpu`."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def base_overrides(kind, model, **extra):
    items = {"output_dir": "out", "model.path": model, "data.path": "photos", **extra}
    if kind in FLUX2_LAYERS:
        items["model.text_encoder_out_layers"] = FLUX2_LAYERS[kind]
    return [f"{k}={v}" for k, v in items.items()]


def run_overrides(kind, model, photos, tmp_path, **extra):
    return base_overrides(kind, model, **{
        "output_dir": tmp_path / "run", "data.path": photos, "data.resolution": 64, "data.cache_dir": tmp_path / "cache",
        "train.max_steps": 2, "train.batch_size": 2, "train.seed": 1, "lora.rank": 4, "optim.lr": 1e-2,
        "train.gradient_checkpointing": "true", **extra})


def family_for(kind, model, **quantization):
    layers = (1, 2, 3) if kind in FLUX2_LAYERS else None
    return load_family(str(model), text_encoder_out_layers=layers, **quantization)


def block_linears(transformer) -> set[str]:
    """Names of the base Linear layers in the blocks (a LoRA-wrapped one by its own name)."""
    return {n.removesuffix(".base_layer") for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and ".lora_" not in n
            and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}


def expected_quantized(kind, transformer) -> set[str]:
    # FLUX.1's final proj_out shares its name with the single blocks' proj_out (see families/flux1.py)
    return block_linears(transformer) | ({"proj_out"} if kind == "flux1" else set())


def bnb_transformer(family, setting):
    """What diffusers' bitsandbytes loader does on a GPU, done on CPU: diffusers' own layer
    replacement with our config and skip list, then the full-precision weights quantized by
    bitsandbytes' Params4bit / Int8Params, and the flag diffusers sets (peft reads it)."""
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    model = family.load_transformer(torch.float32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = transformer_load_kwargs(setting, torch.float32, family.parts.keep_unquantized)["quantization_config"]
    replace_with_bnb_linear(model, modules_to_not_convert=list(family.parts.keep_unquantized), quantization_config=config)
    setattr(model, "is_loaded_in_4bit" if setting == "nf4" else "is_loaded_in_8bit", True)
    for name, layer in model.named_modules():
        if isinstance(layer, BNB_LAYERS[setting]):
            w = weights[f"{name}.weight"]
            layer.weight = (bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
                            if setting == "nf4" else bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False))
            layer.weight = layer.weight.to("cpu")  # bitsandbytes quantizes on the move to a device
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(weights[f"{name}.bias"], requires_grad=False)
    return model


def a_batch(family):
    """Two real latents and captions, through the family's own VAE and text encoder."""
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_images(pixels, torch.device("cpu"))
    texts = family.encode_prompts(["a photo of a cat", "a red car"], torch.device("cpu"))
    family.free_encoders()
    return {"latents": latents, "text": {k: torch.stack([t[k] for t in texts]) for k in texts[0]}}


def loss_of(family, transformer, batch):
    return batch_loss(family, transformer, batch, generator=torch.Generator().manual_seed(0),
                      sigma_sampling={"mode": "uniform"}, guidance=1.0)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("setting", ["none", "nf4", "int8", "fp8"])
def test_config_takes_each_setting_for_both_parts(setting):
    cfg = load_config(None, base_overrides("flux1", "m", **{"model.quantize": setting,
                                                            "model.quantize_text_encoders": setting}))
    assert (cfg.model.quantize, cfg.model.quantize_text_encoders) == (setting, setting)
    assert cfg.to_dict()["model"]["quantize"] == setting


def test_config_defaults_to_no_quantization():
    cfg = load_config(None, base_overrides("flux1", "m"))
    assert (cfg.model.quantize, cfg.model.quantize_text_encoders) == ("none", "none")


def test_config_reports_bad_settings_and_misspelt_keys_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, base_overrides("flux1", "m", **{
            "model.quantize": "NF4", "model.quantize_text_encoders": "fp16", "model.quantise_text": "int8",
        }))
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("model.quantize: should be none, nf4 or int8 (bitsandbytes) or fp8 (torchao); "
                            "did you mean 'nf4'? (got 'NF4')") for p in problems), problems
    assert any(p.startswith("model.quantize_text_encoders:") and "did you mean 'fp8'?" in p for p in problems), problems
    assert any(p.startswith("model.quantise_text: unknown key; did you mean 'model.quantize_text_encoders'?")
               for p in problems), problems


@pytest.mark.parametrize("value, guess", [("int4", "int8"), ("null", "none"), ("bogus", None)])
def test_config_value_did_you_mean(value, guess):
    with pytest.raises(ConfigError) as e:
        load_config(None, base_overrides("flux1", "m", **{"model.quantize": value}))
    (problem,) = e.value.problems
    assert problem.startswith("model.quantize: should be none, nf4 or int8 (bitsandbytes) or fp8 (torchao)")
    assert (f"did you mean '{guess}'?" in problem) if guess else ("did you mean" not in problem)


# ---------------------------------------------------------------------------- the configs we build


def test_no_quantization_adds_no_loading_arguments():
    assert transformer_load_kwargs("none", torch.bfloat16, ("x_embedder",)) == {}
    assert text_encoder_load_kwargs("none", torch.bfloat16, ("text_encoder",)) == {}
    assert text_encoder_load_kwargs("nf4", torch.bfloat16, ()) == {}  # a family with nothing worth quantizing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transformer_nf4_config(dtype):
    keep = ("x_embedder", "norm_out")
    kwargs = transformer_load_kwargs("nf4", dtype, keep)
    config = kwargs["quantization_config"]
    assert type(config).__module__.startswith("diffusers.")
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == dtype  # the run's dtype: bf16, or fp16 on GPUs without bf16
    assert config.llm_int8_skip_modules == list(keep)
    # the weights quantize where they will compute: the GPU, or the CPU where no GPU exists
    assert kwargs["device_map"] == {"": torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                    else "cpu"}


def test_transformer_int8_config():
    config = transformer_load_kwargs("int8", torch.bfloat16, ("proj_out",))["quantization_config"]
    assert config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_skip_modules == ["proj_out"]


def test_transformer_fp8_config():
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig

    config = transformer_load_kwargs("fp8", torch.bfloat16, ("x_embedder", "norm_out"))["quantization_config"]
    assert type(config).__name__ == "TorchAoConfig" and type(config).__module__.startswith("diffusers.")
    assert isinstance(config.quant_type, Float8WeightOnlyConfig)
    assert config.quant_type.weight_dtype == torch.float8_e4m3fn
    assert not config.quant_type.set_inductor_config
    assert config.modules_to_not_convert == ["x_embedder", "norm_out"]


@pytest.mark.parametrize("setting", ["nf4", "int8", "fp8"])
def test_text_encoder_configs_are_transformers_configs_per_component(setting):
    if setting == "fp8":
        pytest.importorskip("torchao")
    import transformers

    config = text_encoder_load_kwargs(setting, torch.bfloat16, ("text_encoder_2",))["quantization_config"]
    assert set(config.quant_mapping) == {"text_encoder_2"}
    quant = config.quant_mapping["text_encoder_2"]
    assert isinstance(quant, transformers.utils.quantization_config.QuantizationConfigMixin)
    if setting == "nf4":
        assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_compute_dtype == torch.bfloat16
    elif setting == "int8":
        assert quant.load_in_8bit and not quant.load_in_4bit
    else:
        assert type(quant.quant_type).__name__ == "Float8WeightOnlyConfig"


# ---------------------------------------------------------------------------- which layers


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_bitsandbytes_quantizes_exactly_the_block_linears(kind, setting, tiny_models):
    """diffusers' own layer replacement, given our skip list: every Linear in the blocks, nothing
    outside them (but FLUX.1's final proj_out, which shares the single blocks' name)."""
    family = family_for(kind, tiny_models(kind))
    model = bnb_transformer(family, setting)
    quantized = {n for n, m in model.named_modules() if isinstance(m, BNB_LAYERS[setting])}
    assert quantized == expected_quantized(kind, model)
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert kept and all(n.split(".")[0] in family.parts.keep_unquantized for n in kept)


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
def test_fp8_loads_for_real_on_cpu_with_the_same_layers_quantized(kind, tiny_models):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    model = family_for(kind, tiny_models(kind), quantize="fp8").load_transformer(torch.float32)
    quantized = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)}
    assert quantized == expected_quantized(kind, model)
    assert not any(p.requires_grad for p in model.parameters())
    reference = family_for(kind, tiny_models(kind)).load_transformer(torch.float32)
    for name in quantized:  # fp8 e4m3 keeps ~3 significant bits: within ~7% of each weight row
        w, ref = dict(model.named_modules())[name].weight.dequantize(), dict(reference.named_modules())[name].weight
        assert (w - ref).abs().max() <= 0.07 * ref.abs().max()


# ---------------------------------------------------------------------------- LoRA on a quantized base


@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_lora_trains_on_bitsandbytes_layers(kind, setting, tiny_models):
    family = family_for(kind, tiny_models(kind))
    batch = a_batch(family)
    model = bnb_transformer(family, setting)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = add_lora(model, rank=4, alpha=4, targets=family.lora_targets("attention+mlp"))
    model.enable_gradient_checkpointing()
    enable_input_grads(model)
    model.train()

    peft_layer = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[setting]
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert adapted and all(type(m).__module__ == "peft.tuners.lora.bnb" and type(m).__name__ == peft_layer
                           for m in adapted)
    assert all(p.dtype == torch.float32 for p in params)

    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        loss = loss_of(family, model, batch)
        loss.backward()
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
        optimizer.step()
        optimizer.zero_grad()

    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p.detach(), frozen_before[name.replace(".base_layer", "")]), f"frozen weight {name} changed"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("setting, tolerance", [("nf4", 0.3), ("int8", 0.05)])
def test_bitsandbytes_base_stays_close_to_full_precision(setting, tolerance, tiny_models):
    family = family_for("flux1", tiny_models("flux1"))
    batch = a_batch(family)
    with torch.no_grad():
        full = loss_of(family, family.load_transformer(torch.float32), batch)
        quantized = loss_of(family, bnb_transformer(family, setting), batch)
    assert abs(quantized - full) <= tolerance * full


def test_input_grads_let_reentrant_checkpointing_train_the_lora(tiny_models):
    """Without them a reentrant checkpoint sees no input that requires grad, records no graph
    through the blocks, and the loss cannot be backpropagated at all."""
    family = family_for("flux1", tiny_models("flux1"))
    batch = a_batch(family)
    reentrant = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    models = []
    for with_hook in (False, True):
        model = bnb_transformer(family, "nf4")
        add_lora(model, rank=4, alpha=4, targets=family.lora_targets("attention"))
        model.enable_gradient_checkpointing(gradient_checkpointing_func=reentrant)
        if with_hook:
            enable_input_grads(model)
        models.append(model.train())
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss_of(family, models[0], batch).backward()
    loss_of(family, models[1], batch).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in models[1].named_parameters() if "lora_B" in n)
    with torch.no_grad():  # sampling: no graph, and no error from the hook
        assert not loss_of(family, models[1], batch).requires_grad


# ---------------------------------------------------------------------------- early errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_bitsandbytes_transformer_without_gpu_fails_before_anything_loads(setting, tiny_models, photos, tmp_path, capsys):
    args = run_overrides("flux1", tiny_models("flux1"), photos, tmp_path, **{"model.quantize": setting})
    assert main(["train", "/dev/null", *args]) == 1
    err = capsys.readouterr().err
    assert f"error: model.quantize {setting} needs a CUDA GPU" in err
    assert "model.quantize: fp8" in err  # says what works here
    # nothing was encoded or written: the check ran before the encoders, the VAE or the transformer
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_missing_package_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(UserError, match=r"model.quantize_text_encoders fp8 needs the torchao package.*"
                                        r"pip install 'fluxtune\[fp8\]'"):
        require_quantization("none", "fp8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"pip install 'fluxtune\[bnb\]'"):
        require_quantization("none", "int8")


def test_cpu_runnable_settings_pass_the_early_check():
    require_quantization("none", "nf4")  # transformers quantizes text encoders on a CPU too
    require_quantization("fp8", "int8")


# ---------------------------------------------------------------------------- end to end on CPU


@pytest.mark.parametrize("kind, text_setting", [("flux1", "nf4"), ("flux2-klein", "int8")])
def test_fp8_base_trains_on_cpu_and_lora_loads_on_full_precision_base(kind, text_setting, tiny_models, photos, tmp_path):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    model = tiny_models(kind)
    cfg = load_config(None, run_overrides(kind, model, photos, tmp_path, **{
        "model.quantize": "fp8", "model.quantize_text_encoders": text_setting,
        "sample.every": 2, "sample.prompts": "[a cat]", "sample.steps": 2}))
    result = train(cfg)

    trained = result.transformer
    quantized = {n.removesuffix(".base_layer") for n, m in trained.named_modules()
                 if isinstance(m, torch.nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)}
    assert quantized == expected_quantized(kind, trained)
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"]["quantize"] == text_setting  # quantized embeddings have their own cache key

    pipe = PIPELINES[kind].from_pretrained(model)  # plain diffusers, full-precision base
    extra = {"text_encoder_out_layers": (1, 2, 3)} if kind in FLUX2_LAYERS else {}

    def render():
        return np.asarray(pipe(prompt="a cat", width=64, height=64, num_inference_steps=2, output_type="np",
                               generator=torch.Generator().manual_seed(0), **extra).images)

    base = render()
    pipe.load_lora_weights(result.lora_path.parent)
    saved = load_file(result.lora_path)
    assert saved and all(k.startswith("transformer.") and v.dtype == torch.float32 for k, v in saved.items())
    assert np.abs(render() - base).max() > 1e-3


def test_text_cache_is_keyed_by_text_encoder_quantization(tiny_models, photos, tmp_path):
    pytest.importorskip("torchao")
    model = tiny_models("flux2-klein")
    first = train(load_config(None, run_overrides("flux2-klein", model, photos, tmp_path, **{
        "model.quantize": "fp8", "model.quantize_text_encoders": "nf4", "train.max_steps": 1})))
    second = train(load_config(None, run_overrides("flux2-klein", model, photos, tmp_path, **{
        "output_dir": tmp_path / "run2", "train.max_steps": 1})))
    assert first.cache.texts_encoded == 3
    assert second.cache.texts_encoded == 3 and second.cache.latents_encoded == 0  # latents reused


# ---------------------------------------------------------------------------- on a CUDA GPU


@gpu
@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
@pytest.mark.parametrize("setting", ["nf4", "int8", "fp8"])
def test_gpu_quantized_training_and_plain_diffusers_load(kind, setting, tiny_models, photos, tmp_path):
    """The real quantized from_pretrained of transformer and text encoder, 2 steps in bf16, then
    the LoRA in plain diffusers on a full-precision base."""
    model = tiny_models(kind)
    cfg = load_config(None, run_overrides(kind, model, photos, tmp_path, **{
        "model.quantize": setting, "model.quantize_text_encoders": setting}))
    result = train(cfg)

    trained = result.transformer
    layers = {n.removesuffix(".base_layer"): m for n, m in trained.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in n}
    if setting == "fp8":
        from torchao.utils import TorchAOBaseTensor

        quantized = {n for n, m in layers.items() if isinstance(m.weight, TorchAOBaseTensor)}
    else:
        quantized = {n for n, m in layers.items() if isinstance(m, BNB_LAYERS[setting])}
    assert quantized == expected_quantized(kind, trained)
    assert all(m.weight.device.type == "cuda" for m in layers.values())
    assert {layers[n].weight.dtype for n in set(layers) - quantized} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for n, p in trained.named_parameters() if "lora_" in n)
    assert np.isfinite(result.final_loss)

    pipe = PIPELINES[kind].from_pretrained(model)
    pipe.load_lora_weights(result.lora_path.parent)
    (adapter,) = pipe.transformer.peft_config
    assert pipe.transformer.peft_config[adapter].r == 4


# ---------------------------------------------------------------------------- QLoRA end to end on CPU


def prediction(family, transformer, batch):
    """The transformer's velocity for `batch` at sigma 0.6, from fixed noise."""
    x0 = family.pack(batch["latents"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    sigmas = torch.full((x0.shape[0],), 0.6)
    with torch.no_grad():
        return family.predict(transformer, batch["latents"], flow.add_noise(x0, noise, sigmas), sigmas,
                              batch["text"], 1.0).float()


def lora_effect(family, transformer, batch):
    """What the LoRA adds to the prediction: with it minus without it."""
    with_lora = prediction(family, transformer, batch)
    transformer.disable_adapters()
    without = prediction(family, transformer, batch)
    transformer.enable_adapters()
    return with_lora - without


def relative(a, b, scale):
    return float((a - b).norm() / scale.norm())


def dequantized_base(kind, model, quantized):
    """Plain diffusers' transformer from `model` with each nf4 layer's weight replaced by what
    bitsandbytes dequantizes it to: the same base the quantized model computes with."""
    transformer = PIPELINES[kind].from_pretrained(model).transformer
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in transformer.named_modules():
            q = layers.get(f"{name}.base_layer", layers.get(name))
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
    return transformer


@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_qlora_trains_end_to_end_on_cpu_and_the_lora_acts_alike_on_a_full_precision_base(
        kind, setting, tiny_models, photos, tmp_path, diffusers_bnb_on_cpu):
    """nf4/int8 transformer and text encoders through diffusers' and transformers' own loaders,
    3 steps with a sample, the LoRA saved, then loaded by plain diffusers.

    Tolerances. A LoRA layer adds x.A.B to its base layer's output exactly; what differs on a
    full-precision base is x, which the quantized layers below produce. So the LoRA's effect (with
    minus without) may differ between the two bases by about the quantized base's own error, and
    no more: the bound is twice that error, both relative to the prediction (measured: 0.07-0.09x
    it for nf4, whose weight error is the same with and without the LoRA; 1.1x for int8, which
    also rounds each activation row to 8 bits). That cannot see a LoRA at the wrong strength under
    nf4 (its base error here exceeds the LoRA's effect), so nf4 is also checked on a base holding
    the dequantized nf4 weights, where the two must agree to float rounding."""
    model = tiny_models(kind)
    result = train(load_config(None, run_overrides(kind, model, photos, tmp_path, **{
        "model.quantize": setting, "model.quantize_text_encoders": setting, "train.max_steps": 3,
        "sample.every": 3, "sample.prompts": "[a cat]", "sample.steps": 2})))

    trained = result.transformer
    quantized = {n.removesuffix(".base_layer") for n, m in trained.named_modules() if isinstance(m, BNB_LAYERS[setting])}
    assert quantized == expected_quantized(kind, trained)
    adapted = [m for m in trained.modules() if hasattr(m, "lora_A")]
    assert adapted and {type(m).__module__ for m in adapted} == {"peft.tuners.lora.bnb"}
    assert np.isfinite(result.final_loss)
    assert (tmp_path / "run" / "samples" / "step-000003.png").is_file()  # sampled on the quantized base
    saved = load_file(result.lora_path)
    assert saved and all(k.startswith("transformer.") and v.dtype == torch.float32 for k, v in saved.items())

    family = family_for(kind, model)
    batch = a_batch(family)
    trained.eval()
    quantized_effect = lora_effect(family, trained, batch)
    trained.disable_adapters()
    quantized_base = prediction(family, trained, batch)
    trained.enable_adapters()

    pipe = PIPELINES[kind].from_pretrained(model)  # plain diffusers, full-precision base
    full_base = prediction(family, pipe.transformer, batch)
    pipe.load_lora_weights(result.lora_path.parent)
    full_effect = lora_effect(family, pipe.transformer, batch)
    assert relative(full_effect, 0, full_base) > 1e-3  # the LoRA learnt something visible
    base_error = relative(quantized_base, full_base, full_base)
    assert relative(quantized_effect, full_effect, full_base) <= 2 * base_error

    if setting == "nf4":
        same = PIPELINES[kind].from_pretrained(model, transformer=dequantized_base(kind, model, trained))
        same.load_lora_weights(result.lora_path.parent)
        assert relative(quantized_effect, lora_effect(family, same.transformer, batch), quantized_effect) < 1e-4


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_the_cpu_refusal_is_diffusers_own_gpu_check(setting, diffusers_bnb_on_cpu):
    require_quantization(setting, setting)  # lifted: passes, as a GPU machine would


# ---------------------------------------------------------------------------- what bitsandbytes can pack


@pytest.mark.parametrize("inputs, outputs", [(32, 64), (64, 64), (96, 64), (128, 32), (64, 48), (64, 16), (192, 96)])
def test_packable_is_bitsandbytes_own_limit(inputs, outputs):
    """The repacking bitsandbytes' 4-bit layers do for its AVX512-BF16 CPU kernel, run for real: it
    fails for the layers `packable` rejects (the error CI first saw: `shape '[32, 0]' is invalid`)
    and round-trips for those it accepts. (Only the packing: the kernel needs that CPU to compute.)"""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    from fluxtune.models.quantize import packable

    weight = bnb.nn.Params4bit(torch.randn(outputs, inputs), requires_grad=False, quant_type="nf4").to("cpu")
    data, state = weight.data.clone(), weight.quant_state
    if packable(torch.nn.Linear(inputs, outputs)):
        packed, packed_state = _convert_weight_packed_for_cpu(data, state)
        back, _ = _convert_weight_packed_for_cpu_inverse(packed, packed_state)
        assert torch.equal(back.reshape(-1), weight.data.reshape(-1))
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            _convert_weight_packed_for_cpu(data, state)


def test_tiny_models_pack_everywhere_like_real_ones(tiny_models):
    """The tiny widths are multiples of 64, as every real FLUX width is: nothing is left unquantized
    on their account, and nothing trips where a real model would not."""
    import diffusers

    from fluxtune.models.quantize import unpackable_linears, unpackable_transformer_linears

    for kind in ("flux1", "flux2", "flux2-klein"):
        folder = tiny_models(kind)
        index = json.loads((folder / "model_index.json").read_text())
        assert unpackable_transformer_linears(getattr(diffusers, index["transformer"][1]), str(folder)) == []
        for part in (k for k in index if k.startswith("text_encoder")):
            assert unpackable_linears(folder / part) == [], (kind, part)


def test_nf4_keeps_layers_it_cannot_pack_unquantized_and_says_so(tmp_path, avx512bf16_cpu, caplog):
    """A text encoder 48 wide: its Linears stay in full precision with a warning naming them, and
    it encodes on a CPU whose kernel would fail on them."""
    import transformers

    from fluxtune.models.quantize import text_encoder_load_kwargs

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=48, d_kv=24, d_ff=128, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-gelu")
    folder = tmp_path / "text_encoder_2"
    transformers.T5EncoderModel(config).save_pretrained(folder)
    with caplog.at_level("WARNING", logger="fluxtune"):
        kwargs = text_encoder_load_kwargs("nf4", torch.float32, ("text_encoder_2",), tmp_path)
    keep = kwargs["quantization_config"].quant_mapping["text_encoder_2"].llm_int8_skip_modules
    assert set(keep) == {"encoder.block.0.layer.0.SelfAttention." + p for p in "qkvo"} | {
        "encoder.block.0.layer.1.DenseReluDense." + p for p in ("wi_0", "wi_1", "wo")}
    assert "7 Linear layers of text_encoder_2" in caplog.text and "stay unquantized" in caplog.text

    ids = torch.tensor([[5, 6, 7, 1]])
    for skip in (keep, None):
        encoder = transformers.T5EncoderModel.from_pretrained(
            folder, quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=skip)).eval()
        with torch.no_grad():
            if skip:
                assert torch.isfinite(encoder(ids).last_hidden_state).all()
            else:  # the mutation: quantize them anyway, and the kernel fails
                with pytest.raises((RuntimeError, AssertionError)):
                    encoder(ids)
