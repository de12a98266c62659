"""Memory arithmetic of a FLUX training run: bytes of weights, LoRA, optimizer state and
activations per GPU phase, and host RAM, from a model's shapes and the settings memory depends on.

    shapes = Shapes(...)                      # counted from a checkpoint's configs (fluxtune.plan.read_shapes)
    phase = training_phase(shapes, settings)  # {"transformer weights": bytes, "activations": ...}

Pure functions of `Shapes` and `Settings`; models are only ever built on the meta device here.
The planner (`fluxtune.plan`) reads a config into these, adds the suggestions and renders them.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

GIB = 2**30

# Not measured here (no GPU): a CUDA 12 context with lazy kernel loading takes ~0.5 GiB; cuBLAS
# workspaces and blocks the caching allocator holds but has not handed out take a few hundred MiB
# more. torch.cuda.max_memory_allocated counts neither, nvidia-smi and out-of-memory errors do.
CUDA_OVERHEAD = int(0.75 * GIB)
# Host RAM of the training process besides weights: Python with torch, diffusers, transformers and
# peft imported measures 0.5 GiB on CPU; the CUDA runtime and its libraries add about 1 GiB (assumed).
HOST_BASELINE = int(1.5 * GIB)
# Images and captions encoded per batch while caching (fluxtune.data.cache.build_cache's default).
CACHE_BATCH = 4
# VAE encoder peak activations per input pixel and channel of its first block (batch 1): 2,570
# bytes per pixel measured in fp32 on CPU with the FLUX.1 and FLUX.2 VAE configs (128 channels) at
# 128 and 256 px (linear in pixels); scaled by dtype size and the VAE's width.
VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL_FP32 = 2570 / 128


class PerToken(NamedTuple):
    """Activation bytes of a training step per (token x hidden unit x sample) of the transformer.

    Without gradient checkpointing: `double` per double block, `single` per single block, plus
    `rest` (embedders, head, loss, backward temporaries). With it: `block_input` per block (the
    saved inputs) plus `recompute` (one block's activations rebuilt in backward, and temporaries).
    Frozen Linears save nothing for backward, which is why these are small next to full fine-tuning.
    """

    double: float
    single: float
    rest: float
    block_input: float
    recompute: float


# Measured with scripts/plan_check.py --calibrate: LoRA rank 16 on the attention preset, 512 wide
# models with 1-2 double and 1-2 single blocks, 256 px and 64 text tokens, least squares over the
# runs. "bf16" is bf16 weights under torch.autocast on CPU, the closest this project can measure to
# a GPU's bf16 autocast without one. CUDA's autocast also runs layer norm in fp32 (CPU's does not);
# the frozen modulation after each norm saves no copy of its output, so that mostly changes
# short-lived temporaries. `scripts/plan_check.py --real` compares on a GPU.
ACTIVATIONS: dict[tuple[str, str], PerToken] = {
    ("flux1", "fp32"): PerToken(double=52.8, single=68.7, rest=45.0, block_input=4.0, recompute=117.7),
    ("flux1", "bf16"): PerToken(double=38.1, single=43.6, rest=49.2, block_input=2.2, recompute=95.0),
    ("flux2", "fp32"): PerToken(double=72.7, single=84.4, rest=54.1, block_input=4.0, recompute=138.6),
    ("flux2", "bf16"): PerToken(double=48.0, single=51.7, rest=42.1, block_input=2.5, recompute=93.7),
}

# Bytes per quantized Linear weight (fluxtune.models.quantize): nf4 is 4 bits plus an 8-bit absmax per
# 64 weights and an fp32 one per 256 of those (bitsandbytes double quantization); int8 (LLM.int8)
# and fp8 (torchao, weight-only) are a byte plus an fp32 scale per output row (ROW_SCALE_BYTES).
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "fp8": 1.0}
ROW_SCALE_BYTES = {"nf4": 0, "int8": 4, "fp8": 4}
# bitsandbytes 8-bit optimizers: one byte per state value plus an fp32 absmax per 256; tensors
# under 4096 elements keep 32-bit state.
_BNB_BLOCK, _BNB_MIN_SIZE = 256, 4096


@dataclass(frozen=True)
class Weights:
    """Parameter counts of one model, split by how a load stores them."""

    params: int  # parameters and buffers
    quantizable: int = 0  # Linear weights a quantization setting stores in fewer bits
    rows: int = 0  # their output features (int8 and fp8 keep a scale per row)
    fp32: int = 0  # kept in fp32 whatever the load dtype (transformers' _keep_in_fp32_modules_strict)

    def nbytes(self, dtype_bytes: int, quantize: str = "none") -> int:
        full = (self.params - self.fp32) * dtype_bytes + 4 * self.fp32
        if quantize not in QUANTIZED_BYTES or not self.quantizable:
            return full
        packed = self.quantizable * QUANTIZED_BYTES[quantize] + self.rows * ROW_SCALE_BYTES[quantize]
        return int(full - self.quantizable * dtype_bytes + packed)


@dataclass(frozen=True)
class Encoder:
    """A text encoder or the VAE, counted on the meta device."""

    name: str  # its model_index.json entry
    class_name: str
    weights: Weights
    quantizable: bool = False  # model.quantize_text_encoders applies to it (the family says which)
    width: int = 0  # a text encoder's hidden size; the VAE's first block's channels
    layers: int = 0
    intermediate: int = 0

    def nbytes(self, dtype_bytes: int, quantize: str = "none") -> int:
        return self.weights.nbytes(dtype_bytes, quantize if self.quantizable else "none")


@dataclass(frozen=True)
class Shapes:
    """What the prediction needs to know about a checkpoint and a LoRA target set."""

    family: str
    class_name: str
    hidden: int
    double_blocks: int
    single_blocks: int
    text_tokens: int
    transformer: Weights
    largest_quantizable: int  # one Linear's weights, dequantized to bf16 while it computes
    largest_block: int  # parameters of the largest block (FSDP gathers one at a time)
    lora_layers: tuple[tuple[tuple[int, int], int], ...]  # ((in, out), how many)
    encoders: tuple[Encoder, ...] = ()
    vae: Encoder | None = None
    outside_blocks: int = 0  # embedders, final norm and projection: gathered for the whole forward under FSDP

    def lora_params(self, rank: int) -> int:
        return sum(rank * (i + o) * n for (i, o), n in self.lora_layers)


@dataclass(frozen=True)
class Settings:
    """The config values memory depends on; the suggestions vary them."""

    resolution: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    precision: str  # "bf16", "fp16" or "no" (fp32)
    optimizer: str
    adafactor_momentum: bool
    quantize: str
    quantize_text_encoders: str
    rank: int
    fsdp_gpus: int = 1  # train.sharding=fsdp over this many processes; 1: every GPU holds the whole base

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.precision == "no" else 2



def weights_of(model: torch.nn.Module, quantizable: list[torch.nn.Linear]) -> Weights:
    return Weights(params=numel(model), quantizable=sum(mod.weight.numel() for mod in quantizable),
                   rows=sum(mod.out_features for mod in quantizable), fp32=_fp32_params(model))


def numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def meta_model(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """The model class named in model_index.json, built from its config without allocating."""
    from accelerate import init_empty_weights

    from fluxtune.errors import ModelError

    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelError(f"{library} has no class {class_name!r}; upgrade it (pip install -U {library})")
    with init_empty_weights():
        if library != "transformers":
            return cls.from_config(config)
        model = cls(cls.config_class.from_dict(config))
    model.tie_weights()  # else tied embeddings count twice (T5, Qwen3-4B); a no-op inside the context
    return model


def encoders(path: str, revision: str | None, index: dict, quantizable: tuple[str, ...]) -> list[Encoder]:
    """Text encoders and the VAE listed in model_index.json (entries set to null are skipped)."""
    from fluxtune.models.families.common import read_component_config

    found = []
    for name, entry in index.items():
        if not (name.startswith("text_encoder") or name == "vae") or not isinstance(entry, list) or None in entry:
            continue
        library, class_name = entry
        model = meta_model(library, class_name, read_component_config(path, name, revision))
        weights = weights_of(model, _quantizable_linears(model))
        if library != "transformers":  # the VAE
            found.append(Encoder(name, class_name, weights, width=model.config.block_out_channels[0]))
            continue
        config = model.config.get_text_config()
        found.append(Encoder(
            name=name, class_name=class_name, weights=weights, quantizable=name in quantizable,
            width=config.hidden_size, layers=config.num_hidden_layers,
            intermediate=getattr(config, "intermediate_size", None) or getattr(config, "d_ff", 0),
        ))
    return found


def _quantizable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """transformers quantizes every Linear but the output head (lm_head), as bitsandbytes and
    torchao configs do by default."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear) and mod is not head]


def _fp32_params(model: torch.nn.Module) -> int:
    """Parameters transformers keeps in fp32 at a bf16 load (`_keep_in_fp32_modules_strict`); the
    non-strict list (T5's `wo`) applies to fp16 loads only (see _notes)."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return sum(p.numel() for n, p in model.named_parameters() if keep & set(n.split(".")))


# ---------------------------------------------------------------------------- prediction


def image_tokens(resolution: int) -> int:
    """FLUX.1 packs 2x2 latent patches of the 8x VAE, FLUX.2 patchifies 2x2: 16 px per token side.
    Aspect-ratio buckets keep each image's area within resolution^2, so no bucket has more."""
    return (resolution // 16) ** 2


def activation_bytes(shapes: Shapes, s: Settings) -> int:
    k = ACTIVATIONS[(shapes.family, "fp32" if s.precision == "no" else "bf16")]
    units = s.batch_size * (image_tokens(s.resolution) + shapes.text_tokens) * shapes.hidden
    blocks = shapes.double_blocks + shapes.single_blocks
    if s.gradient_checkpointing:
        per_unit = k.block_input * blocks + k.recompute
    else:
        per_unit = k.double * shapes.double_blocks + k.single * shapes.single_blocks + k.rest
    return int(units * per_unit)


def weight_bytes(shapes: Shapes, s: Settings) -> int:
    """Transformer weights; a quantized base also holds one Linear dequantized at a time."""
    dequantized = s.dtype_bytes * shapes.largest_quantizable if s.quantize in QUANTIZED_BYTES else 0
    return shapes.transformer.nbytes(s.dtype_bytes, s.quantize) + dequantized


def optimizer_bytes(shapes: Shapes, s: Settings) -> int:
    """Optimizer state over the LoRA matrices: A is (rank, in), B is (out, rank) and starts at zero."""
    total = 0
    for (fan_in, fan_out), count in shapes.lora_layers:
        for rows, cols, zero in ((s.rank, fan_in, False), (fan_out, s.rank, True)):
            total += count * _state_bytes(s.optimizer, rows, cols, s.adafactor_momentum, zero)
    return total


def _state_bytes(name: str, rows: int, cols: int, momentum: bool, zero: bool) -> float:
    n = rows * cols
    if name == "adamw":  # fp32 exp_avg and exp_avg_sq
        return 8 * n
    if name == "prodigy":  # fp32 exp_avg, exp_avg_sq, s and the initial weights p0 (a scalar when all zero)
        return 12 * n + (4 if zero else 4 * n)
    if name in ("adamw8bit", "paged_adamw8bit", "lion8bit"):  # Lion keeps one state, Adam two
        states = 1 if name == "lion8bit" else 2
        return states * (4 * n if n < _BNB_MIN_SIZE else n + 4 * math.ceil(n / _BNB_BLOCK))
    if name == "adafactor":  # factored second moment: one fp32 value per row and per column
        return 4 * (rows + cols) + (4 * n if momentum else 0)
    raise ValueError(f"optim.name {name!r}: no memory model for it in fluxtune.plan")


def training_phase(shapes: Shapes, s: Settings) -> dict[str, int]:
    """GPU bytes of the training step, per component. LoRA gradients are listed in full although
    most are allocated while backward frees activations (a little conservative). With FSDP over n
    GPUs (train.sharding) the frozen weights are split n ways; each GPU also holds the weights
    outside the blocks and two or three gathered blocks (see _fsdp_gathered). The LoRA, its
    gradients and optimizer state stay whole on every GPU."""
    lora = shapes.lora_params(s.rank)
    quant = f", {s.quantize}" if s.quantize in QUANTIZED_BYTES else ""
    rows = {
        f"transformer weights ({dtype_name(s)}{quant})": weight_bytes(shapes, s),
        "LoRA weights (fp32)": 4 * lora,
        "LoRA gradients (fp32)": 4 * lora,
        f"optimizer state ({s.optimizer})": optimizer_bytes(shapes, s),
    }
    activations = activation_bytes(shapes, s)
    if s.fsdp_gpus > 1:
        whole, *rest = rows.items()
        rows = {f"transformer weights ({dtype_name(s)}, 1/{s.fsdp_gpus} per GPU)": whole[1] // s.fsdp_gpus,
                "FSDP: gathered weights at the peak": _fsdp_gathered(shapes, s, activations + 4 * lora),
                **dict(rest)}
    ckpt = "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing"
    rows[f"activations ({s.resolution}px, batch {s.batch_size}, {ckpt})"] = activations
    return rows | {OVERHEAD_ROW: CUDA_OVERHEAD}


OVERHEAD_ROW = "CUDA context + allocator (assumed)"


def _fsdp_gathered(shapes: Shapes, s: Settings, step_tensors: int) -> int:
    """What FSDP holds gathered at the step's peak, which is one of two moments (measured on CPU
    with scripts/plan_check.py --sharded). Entering each forward block it holds the non-block
    weights, the previous block's buffer, this block's buffer and its gathered copy (three
    blocks), while few activations exist yet. In backward it holds the non-block weights, the
    block computing and the next one (two), with the activations and LoRA gradients
    (`step_tensors`) live. The row is what makes the larger of the two on top of the rest."""
    forward = (shapes.outside_blocks + 3 * shapes.largest_block) * s.dtype_bytes
    backward = (shapes.outside_blocks + 2 * shapes.largest_block) * s.dtype_bytes
    return max(backward, forward - step_tensors)


def caching_phases(shapes: Shapes, s: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """GPU bytes while caching latents (VAE only) and then captions (text encoders; the VAE stays)."""
    vae = {"VAE": shapes.vae.nbytes(s.dtype_bytes) if shapes.vae else 0}
    latents = vae | {"VAE encoding activations": _vae_activations(shapes, s)}
    quant = s.quantize_text_encoders
    encoders = {f"{e.name} ({e.class_name}{f', {quant}' if e.quantizable and quant in QUANTIZED_BYTES else ''})":
                e.nbytes(s.dtype_bytes, quant) for e in shapes.encoders}
    captions = vae | encoders | {"text encoding activations (estimate)": _text_activations(shapes, s.dtype_bytes)}
    return latents | {OVERHEAD_ROW: CUDA_OVERHEAD}, captions | {OVERHEAD_ROW: CUDA_OVERHEAD}


def _vae_activations(shapes: Shapes, s: Settings) -> int:
    per_pixel = VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL_FP32 * (shapes.vae.width if shapes.vae else 0) * s.dtype_bytes / 4
    return int(per_pixel * CACHE_BATCH * s.resolution**2)


def _text_activations(shapes: Shapes, dtype_bytes: int) -> int:
    """Not measured: every layer's hidden states (FLUX.2 stacks three of them, so the pipeline asks
    for all) plus a few MLP-wide temporaries, for a batch of captions."""
    per_token = sum(e.width * (e.layers + 1) + 4 * e.intermediate for e in shapes.encoders)
    return CACHE_BATCH * shapes.text_tokens * per_token * dtype_bytes


def host_ram(shapes: Shapes, s: Settings) -> dict[str, int]:
    """Weights are read into CPU memory at the load dtype and then moved to the GPU, one part after
    the other: encoders first, then the transformer. A quantized part is quantized as it loads."""
    encoders = sum(e.nbytes(s.dtype_bytes, s.quantize_text_encoders) for e in [*shapes.encoders, *filter(None, [shapes.vae])])
    return {
        "process: Python, libraries, CUDA runtime (assumed)": HOST_BASELINE,
        "text encoders + VAE while loading (caching)": encoders,
        "transformer while loading": shapes.transformer.nbytes(s.dtype_bytes, s.quantize),
    }


def dtype_name(s: Settings) -> str:
    return {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[s.precision]
