"""A quantized base under the LoRA (QLoRA): the frozen weights are stored in 4 or 8 bits, the LoRA
on top stays fp32 (`fluxtune.lora.adapter.add_lora`).

    model:
      quantize: nf4                 # transformer blocks: none | nf4 | int8 | fp8
      quantize_text_encoders: nf4   # the large text encoder, while captions are encoded

| setting | library | weights | runs on |
|---|---|---|---|
| `nf4`  | bitsandbytes 4-bit NormalFloat with double quantization (QLoRA) | ~0.52 byte | transformer: CUDA GPU only; text encoder: also CPU |
| `int8` | bitsandbytes LLM.int8 | 1 byte | as nf4 |
| `fp8`  | torchao float8 (e4m3) weight-only, per-row scales; matmuls in the run's dtype | 1 byte | GPU and CPU |

diffusers refuses to quantize a transformer with bitsandbytes without a GPU ("No GPU found"), so
`require_quantization` stops such a run before any weights load. transformers quantizes text
encoders with bitsandbytes on a CPU too, and torchao's fp8 runs anywhere.

What is quantized: every Linear inside the transformer blocks, 95% (klein 4B) to 99.5% (FLUX.1)
of the weights. The embedders, the modulation layers outside the blocks and the output layers keep
the run's dtype (each family lists them): they are a few percent of the weights, and every block
reads what they produce, so their error would reach every block instead of averaging out. Trainers
that quantize their base (ai-toolkit block by block, SimpleTuner by exclusion patterns) also leave
the input/output projections and timestep embedders out. Of the text encoders only the large one is
quantized (T5, Mistral3, Qwen3); FLUX.1's CLIP is 0.1B parameters and its pooled vector modulates
every block.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fluxtune.errors import UserError, require_package

log = logging.getLogger("fluxtune")

_BITSANDBYTES = ("nf4", "int8")
# setting -> (package it needs, pip extra that installs it)
_PACKAGES = {"nf4": ("bitsandbytes", "bnb"), "int8": ("bitsandbytes", "bnb"), "fp8": ("torchao", "fp8")}


def require_quantization(transformer: str, text_encoders: str) -> None:
    """Fail before any weights load: a package the settings need is missing, or diffusers' own
    bitsandbytes quantizer would refuse this machine (it needs a GPU)."""
    for key, setting in (("model.quantize", transformer), ("model.quantize_text_encoders", text_encoders)):
        if setting in _PACKAGES:
            require_package(f"{key} {setting}", *_PACKAGES[setting])
    if transformer in _BITSANDBYTES:
        from diffusers.quantizers.auto import DiffusersAutoQuantizer

        config = transformer_load_kwargs(transformer, torch.float32, ())["quantization_config"]
        try:
            DiffusersAutoQuantizer.from_config(config).validate_environment()
        except RuntimeError as e:  # "No GPU found. A GPU is needed for quantization."
            build = "a CPU-only build of torch" if torch.version.cuda is None else "torch finds no CUDA device"
            raise UserError(
                f"model.quantize {transformer} needs a CUDA GPU: diffusers quantizes a transformer with bitsandbytes "
                f"only onto a GPU ({e}), and this machine has none ({build}). Run on a CUDA GPU, or use "
                "model.quantize: fp8 (torchao, runs on a CPU too) or none"
            ) from None


def transformer_load_kwargs(setting: str, dtype: torch.dtype, keep: tuple[str, ...]) -> dict:
    """Extra `from_pretrained` arguments that quantize a diffusers transformer as it loads.

    `keep`: top-level modules left in `dtype`, with everything under them. diffusers matches these
    names anywhere in the model, so a name that also occurs inside the blocks would keep those
    layers unquantized too (FLUX.1's `proj_out`, see its family). `dtype` is the
    bitsandbytes compute dtype, so a bf16 run computes in bf16 and an fp16 GPU (T4, V100) in fp16.
    Quantized weights are placed on the current CUDA device as they load (bitsandbytes' own
    default): quantizing on the GPU is faster, and the full-precision model never sits in CPU memory.
    """
    if setting == "none":
        return {}
    import diffusers

    keep = list(keep)
    if setting == "nf4":
        config = diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=keep,
        )
    elif setting == "int8":
        config = diffusers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    else:
        config = diffusers.TorchAoConfig(_float8_weight_only(), modules_to_not_convert=keep)
    return {"quantization_config": config, **_device_map(setting)}


def _device_map(setting: str) -> dict:
    if torch.cuda.is_available():
        return {"device_map": {"": torch.device("cuda", torch.cuda.current_device())}}
    if setting in _BITSANDBYTES and not (torch.xpu.is_available() or torch.mps.is_available()):
        # diffusers refuses bitsandbytes on a machine without a GPU (`require_quantization`); where
        # that check is lifted (the CPU tests) the weights quantize on, and stay on, the CPU.
        return {"device_map": {"": "cpu"}}
    return {}


# bitsandbytes' 4-bit blocks: 64 weights each. On a CPU with AVX512-BF16 its inference path repacks
# a 4-bit weight in blocks of 64 input features by 32 outputs and fails for a layer of another width
# (`shape '[32, 0]' is invalid`, `N must be divisible by block_n`). Every real FLUX width is a
# multiple of 64 (transformers 3072/4096/6144 wide, T5 4096/10240, Qwen3 2560/4096/9728/12288,
# Mistral3 5120/32768, vocabularies padded); a layer that is not stays unquantized, named in a warning.
NF4_BLOCK = 64
NF4_OUT_BLOCK = 32


def packable(layer: torch.nn.Linear) -> bool:
    """Whether bitsandbytes' CPU 4-bit kernel can take this Linear's weight (see NF4_BLOCK)."""
    return layer.in_features % NF4_BLOCK == 0 and layer.out_features % NF4_OUT_BLOCK == 0


def warn_unpackable(key: str, part: str, names: list[str]) -> None:
    if names:
        log.warning("%s nf4: %d Linear layers of %s are not a multiple of %d inputs by %d outputs and stay "
                    "unquantized (bitsandbytes cannot pack them): %s", key, len(names), part, NF4_BLOCK,
                    NF4_OUT_BLOCK, ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))


def text_encoder_load_kwargs(setting: str, dtype: torch.dtype, components: tuple[str, ...], path=None) -> dict:
    """Extra pipeline `from_pretrained` arguments that quantize the text encoders named in
    `components` (model_index.json names) with transformers' own quantization configs. With a
    local `path`, nf4 keeps the Linear layers it cannot pack (see NF4_BLOCK) unquantized."""
    if setting == "none" or not components:
        return {}
    from diffusers import PipelineQuantizationConfig

    mapping = {}
    for name in components:
        keep = unpackable_linears(Path(path) / name) if setting == "nf4" and path and Path(path).is_dir() else []
        warn_unpackable("model.quantize_text_encoders", name, keep)
        mapping[name] = _transformers_config(setting, dtype, keep)
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}


def unpackable_linears(folder: Path) -> list[str]:
    """Names of the Linear layers of the transformers model saved in `folder` that bitsandbytes
    cannot pack (`packable`); built on the meta device from its config, so no weight is read."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    with torch.device("meta"):
        model = model_cls(config) if model_cls is not transformers.AutoModel else model_cls.from_config(config)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not packable(m)]


def unpackable_transformer_linears(transformer_cls, path: str, revision: str | None = None) -> list[str]:
    """The same for a diffusers transformer saved under `path`/transformer (its config only)."""
    config = transformer_cls.load_config(path, subfolder="transformer", revision=revision)
    with torch.device("meta"):
        model = transformer_cls.from_config(config)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not packable(m)]


def _transformers_config(setting: str, dtype: torch.dtype, keep: list[str] | None = None):
    import transformers

    if setting == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                               llm_int8_skip_modules=keep or None)
    if setting == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.TorchAoConfig(_float8_weight_only())


def _float8_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig

    # set_inductor_config would change torch.compile's global settings as a side effect of loading.
    return Float8WeightOnlyConfig(set_inductor_config=False)


def enable_input_grads(transformer: torch.nn.Module) -> None:
    """The image tokens entering the first block require grad, as peft's
    `prepare_model_for_kbit_training` arranges for a k-bit base under gradient checkpointing.

    With a frozen base nothing entering the blocks requires grad; a reentrant checkpoint function
    (torch's `checkpoint(use_reentrant=True)` given to `enable_gradient_checkpointing`) then records
    no graph through the blocks and the LoRA gets no gradient. diffusers' default checkpointing is non-reentrant and
    does not need this; it costs one extra input gradient. peft's own function cannot be used: it
    looks for a language model's input embeddings, and it upcasts every unquantized weight to fp32,
    which would double the memory of FLUX.2's 0.6B-parameter modulation layers for no gain under
    bf16 autocast (norms already compute in fp32 there).
    """
    transformer.x_embedder.register_forward_hook(_require_grad)


def _require_grad(module, inputs, output):
    if torch.is_grad_enabled():  # sampling and evaluation run without autograd
        output.requires_grad_(True)
