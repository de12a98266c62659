"""Memory planner: the peak GPU memory and host RAM a training config will need, before any weight loads.

    fluxtune plan configs/flux1-dev.yaml --gpu-memory 24GB
    fluxtune plan configs/flux2-dev.yaml model.path=/models/FLUX.2-dev      # verdicts for 16/24/48/80 GB

    from fluxtune.plan import plan
    print(plan(load_config("configs/flux1-dev.yaml")).table())

A run with a cold cache has three GPU phases, one after the other: caching latents (VAE), caching
captions (text encoders; the VAE is still loaded) and training (transformer, LoRA, optimizer,
activations); the peak is the largest. Everything comes from the checkpoint's config files, so a
hub id works offline only when its configs are cached:
- parameter counts from the transformer, text encoders and VAE built on the meta device (exact,
  and no memory is used);
- LoRA parameters from the modules the target regex matches, rank * (in + out) each;
- activations from bytes per token per hidden unit per block, measured on CPU on FLUX.1- and
  FLUX.2-shaped models (`python scripts/plan_check.py --calibrate` re-derives ACTIVATIONS);
- a fixed CUDA context and allocator allowance (an assumption, see CUDA_OVERHEAD).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

log = logging.getLogger("fluxtune")

GIB = 2**30
DEFAULT_CARDS_GIB = (16, 24, 48, 80)

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


def settings_of(cfg, gpus: int = 1) -> Settings:
    """mixed_precision auto is bf16 here: the plan is for a GPU, where auto means bf16. `gpus`: the
    processes the run is launched with, which matters only when train.sharding splits the base."""
    precision = "bf16" if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    return Settings(
        resolution=cfg.data.resolution, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
        gradient_checkpointing=cfg.train.gradient_checkpointing, precision=precision, optimizer=cfg.optim.name,
        adafactor_momentum=getattr(cfg.optim, "beta1", None) is not None,
        quantize=cfg.model.quantize, quantize_text_encoders=cfg.model.quantize_text_encoders, rank=cfg.lora.rank,
        fsdp_gpus=gpus if cfg.train.sharding != "none" else 1,
    )


# ---------------------------------------------------------------------------- shapes


def read_shapes(model_cfg, lora_cfg) -> Shapes:
    """Count the checkpoint's parts on the meta device; reads config files only."""
    from fluxtune.models.families import load_family
    from fluxtune.models.families.common import read_component_config, read_model_index
    from fluxtune.lora.adapter import check_targets, matched_modules, resolve_targets

    m = model_cfg
    family = load_family(m.path, m.family, m.revision, text_encoder_out_layers=m.text_encoder_out_layers,
                         bypass_guidance=m.bypass_guidance, max_sequence_length=m.max_sequence_length)
    tcfg = read_component_config(m.path, "transformer", m.revision)
    transformer = _meta_model("diffusers", family.parts.transformer_cls.__name__, tcfg)
    targets = resolve_targets(family, lora_cfg.targets)
    check_targets(transformer, targets)
    lora = Counter((mod.in_features, mod.out_features) for mod in matched_modules(transformer, targets).values())
    keep = getattr(family.parts, "keep_unquantized", ())
    quantizable = [mod for name, mod in transformer.named_modules()
                   if isinstance(mod, torch.nn.Linear) and not any(k in name for k in keep)]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    parts = _encoders(m.path, m.revision, read_model_index(m.path, m.revision),
                      getattr(family.parts, "quantizable_text_encoders", ()))
    return Shapes(
        family=family.name, class_name=type(transformer).__name__,
        hidden=tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
        double_blocks=len(transformer.transformer_blocks), single_blocks=len(transformer.single_transformer_blocks),
        text_tokens=family.max_sequence_length, transformer=_weights(transformer, quantizable),
        largest_quantizable=max((mod.weight.numel() for mod in quantizable), default=0), largest_block=max(map(_numel, blocks)),
        lora_layers=tuple(sorted(lora.items())), outside_blocks=_numel(transformer) - sum(map(_numel, blocks)),
        encoders=tuple(p for p in parts if p.name != "vae"), vae=next((p for p in parts if p.name == "vae"), None),
    )


def _weights(model: torch.nn.Module, quantizable: list[torch.nn.Linear]) -> Weights:
    return Weights(params=_numel(model), quantizable=sum(mod.weight.numel() for mod in quantizable),
                   rows=sum(mod.out_features for mod in quantizable), fp32=_fp32_params(model))


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def _meta_model(library: str, class_name: str, config: dict) -> torch.nn.Module:
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


def _encoders(path: str, revision: str | None, index: dict, quantizable: tuple[str, ...]) -> list[Encoder]:
    """Text encoders and the VAE listed in model_index.json (entries set to null are skipped)."""
    from fluxtune.models.families.common import read_component_config

    found = []
    for name, entry in index.items():
        if not (name.startswith("text_encoder") or name == "vae") or not isinstance(entry, list) or None in entry:
            continue
        library, class_name = entry
        model = _meta_model(library, class_name, read_component_config(path, name, revision))
        weights = _weights(model, _quantizable_linears(model))
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
        f"transformer weights ({_dtype_name(s)}{quant})": weight_bytes(shapes, s),
        "LoRA weights (fp32)": 4 * lora,
        "LoRA gradients (fp32)": 4 * lora,
        f"optimizer state ({s.optimizer})": optimizer_bytes(shapes, s),
    }
    activations = activation_bytes(shapes, s)
    if s.fsdp_gpus > 1:
        whole, *rest = rows.items()
        rows = {f"transformer weights ({_dtype_name(s)}, 1/{s.fsdp_gpus} per GPU)": whole[1] // s.fsdp_gpus,
                "FSDP: gathered weights at the peak": _fsdp_gathered(shapes, s, activations + 4 * lora),
                **dict(rest)}
    ckpt = "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing"
    rows[f"activations ({s.resolution}px, batch {s.batch_size}, {ckpt})"] = activations
    return rows | {_OVERHEAD_ROW: CUDA_OVERHEAD}


_OVERHEAD_ROW = "CUDA context + allocator (assumed)"


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
    return latents | {_OVERHEAD_ROW: CUDA_OVERHEAD}, captions | {_OVERHEAD_ROW: CUDA_OVERHEAD}


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


def _dtype_name(s: Settings) -> str:
    return {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[s.precision]


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Suggestion:
    change: str  # config overrides, or a description when it is not a config key
    peak: int  # predicted training-phase peak with this and every earlier suggestion applied


@dataclass
class Plan:
    """Predicted GPU bytes per phase and component, host RAM, and what they were computed from."""

    model: str
    shapes: Shapes
    settings: Settings
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, int]:
        return {phase: sum(rows.values()) for phase, rows in self.phases.items()}

    @property
    def peak(self) -> int:
        return max(self.totals.values())

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def host_peak(self) -> int:
        baseline, *loads = self.host.values()
        return baseline + max(loads)

    def fits(self, card_bytes: int) -> bool:
        return self.peak <= card_bytes

    def suggestions(self, card_bytes: int) -> list[Suggestion]:
        return suggest(self.shapes, self.settings, card_bytes)

    def table(self, gpu_memory: int | None = None) -> str:
        return render(self, [gpu_memory] if gpu_memory else [c * GIB for c in DEFAULT_CARDS_GIB])


def plan(cfg, gpus: int = 1) -> Plan:
    """Predict the memory of training `cfg` (a fluxtune Config) launched on `gpus` processes; loads
    no weights."""
    shapes = read_shapes(cfg.model, cfg.lora)
    return predict(shapes, settings_of(cfg, gpus), cfg.model.path)


def predict(shapes: Shapes, s: Settings, model: str = "") -> Plan:
    latents, captions = caching_phases(shapes, s)
    phases = {"cache latents": latents, "cache captions": captions, "training": training_phase(shapes, s)}
    return Plan(model, shapes, s, phases, host_ram(shapes, s))


def training_peak(shapes: Shapes, s: Settings) -> int:
    return sum(training_phase(shapes, s).values())


def suggest(shapes: Shapes, s: Settings, card_bytes: int) -> list[Suggestion]:
    """Changes in order of what they cost (speed, then quality, then hardware), each applied on
    top of the ones before, up to the first with which training fits."""
    steps = []
    if not s.gradient_checkpointing:
        steps.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if s.optimizer in ("adamw", "prodigy"):
        steps.append(("optim.name=adamw8bit", {"optimizer": "adamw8bit"}))
    if s.batch_size > 1:
        steps.append((f"train.batch_size=1 train.grad_accum={s.batch_size * s.grad_accum}",
                      {"batch_size": 1, "grad_accum": s.batch_size * s.grad_accum}))
    for resolution in (768, 512):
        if s.resolution > resolution:
            steps.append((f"data.resolution={resolution}", {"resolution": resolution}))
    if s.quantize != "nf4":
        steps.append(("model.quantize=nf4", {"quantize": "nf4"}))
    found, current = [], s
    for change, values in steps:
        current = replace(current, **values)
        found.append(Suggestion(change, training_peak(shapes, current)))
        if found[-1].peak <= card_bytes:
            return found
    return found + _fsdp(shapes, current, card_bytes)


def _fsdp(shapes: Shapes, s: Settings, card_bytes: int, most: int = 8) -> list[Suggestion]:
    """The fewest GPUs of this size that train.sharding=fsdp needs, with the base unquantized
    (sharding does not combine with model.quantize)."""
    s = replace(s, quantize="none")
    for gpus in range(max(2, s.fsdp_gpus), most + 1):
        peak = training_peak(shapes, replace(s, fsdp_gpus=gpus))
        if peak <= card_bytes:
            return [Suggestion(f"train.sharding=fsdp model.quantize=none over {gpus} such GPUs (per GPU)", peak)]
    return [Suggestion(f"nothing above fits; train.sharding=fsdp over {most} such GPUs needs per GPU",
                       training_peak(shapes, replace(s, fsdp_gpus=most)))]


# ---------------------------------------------------------------------------- output


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _card_name(card_bytes: int) -> str:
    return f"{card_bytes / GIB:g} GB"


def render(p: Plan, cards: list[int]) -> str:
    s, sh = p.settings, p.shapes
    ckpt = "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing"
    lines = [
        f"memory plan for {p.model} ({sh.family}, {sh.class_name}, {_count(sh.transformer.params)} parameters)",
        f"  {s.resolution}x{s.resolution}, batch {s.batch_size}, {image_tokens(s.resolution)} image + "
        f"{sh.text_tokens} text tokens, {ckpt}, {_dtype_name(s)} weights, LoRA rank {s.rank} on "
        f"{sum(n for _, n in sh.lora_layers)} layers ({_count(sh.lora_params(s.rank))} parameters), "
        f"optimizer {s.optimizer}",
        "",
        *_phase_table(p),
        "",
        f"peak GPU memory: {_gib(p.peak)} GiB ({p.peak_phase}); the caching phases run only while the "
        "cache is cold.",
        *_notes(s),
        "",
        *_host_lines(p),
        "",
        *_verdicts(p, cards),
    ]
    return "\n".join(lines)


def _notes(s: Settings) -> list[str]:
    notes = ["not counted: samples during training (decoded while the step's activations are freed), "
             "lora.dropout > 0 (one more input copy per adapted layer)"]
    if s.precision != "no":
        notes.append("activations: bf16 figures measured on CPU under autocast; scripts/plan_check.py --real "
                     "checks them on a GPU")
    if s.precision == "fp16":
        notes.append("mixed_precision fp16: transformers keeps some text-encoder layers in fp32 (T5's wo, "
                     "1B parameters): caching captions needs up to 2 GiB more than shown")
    if s.fsdp_gpus > 1:
        notes.append(f"train.sharding over {s.fsdp_gpus} processes: host RAM is per process, and each loads the "
                     "whole transformer before splitting it; a machine running k processes needs k times that row")
    if s.quantize in ("int8", "fp8"):
        notes.append(f"model.quantize={s.quantize}: activations measured without it; int8 layers also keep "
                     "their inputs for backward, so expect more")
    return notes


def _phase_table(p: Plan) -> list[str]:
    names = list(p.phases)
    components = [c for c in dict.fromkeys(c for rows in p.phases.values() for c in rows) if c != _OVERHEAD_ROW]
    components.append(_OVERHEAD_ROW)
    width = max(map(len, components)) + 2
    head = "GPU memory (GiB)".ljust(width) + "".join(f"{n:>16}" for n in names)
    rows = [c.ljust(width) + "".join(f"{_gib(p.phases[n].get(c)):>16}" for n in names) for c in components]
    total = "total".ljust(width) + "".join(f"{_gib(t):>16}" for t in p.totals.values())
    rule = "-" * len(head)
    return [head, rule, *rows, rule, total]


def _host_lines(p: Plan) -> list[str]:
    width = max(map(len, p.host)) + 2
    lines = ["host RAM (GiB)"] + [f"  {name.ljust(width)}{_gib(n):>8}" for name, n in p.host.items()]
    lines.append(f"  {'peak (process + the larger load)'.ljust(width)}{_gib(p.host_peak):>8}"
                 + _machine_ram_note(p.host_peak))
    lines.append("  plus page cache for the safetensors files, which the kernel can reclaim")
    return lines


def _machine_ram_note(peak: int) -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return ""
    return f"   (this machine has {_gib(total)} GiB{', less than that' if peak > total else ''})"


def _verdicts(p: Plan, cards: list[int]) -> list[str]:
    lines = ["verdict"]
    for card in cards:
        if p.fits(card):
            lines.append(f"  {_card_name(card):>7}: fits ({100 * p.peak / card:.0f}% of the card)")
            continue
        lines.append(f"  {_card_name(card):>7}: does not fit ({_gib(p.peak)} GiB needed, {p.peak_phase})")
        if p.totals["training"] > card:
            lines.append("           try, in this order (each on top of the ones before):")
            for sug in p.suggestions(card):
                mark = "fits" if sug.peak <= card else "still too big"
                lines.append(f"             {sug.change:<60} training {_gib(sug.peak)} GiB, {mark}")
        caching = max(p.totals["cache latents"], p.totals["cache captions"])
        if caching > card:
            lines.append(f"           caching needs {_gib(caching)} GiB: {_caching_advice(p, card)}")
    return lines


def _caching_advice(p: Plan, card: int) -> str:
    s = p.settings
    if s.quantize_text_encoders != "nf4":
        smaller = predict(p.shapes, replace(s, quantize_text_encoders="nf4"))
        caching = max(smaller.totals["cache latents"], smaller.totals["cache captions"])
        if caching <= card:
            return f"model.quantize_text_encoders=nf4 brings it to {_gib(caching)} GiB, which fits"
    return ("build the cache once on a larger GPU (entries are reused by later runs with the same model, "
            "data and resolution)")


_UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GB', '24 GiB', '81559MiB', '24' -> bytes. GB counts as GiB: GPU makers quote binary sizes
    (a "24 GB" card reports 24 GiB less a few MiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"cannot read {text!r} as a memory size; write a positive number with an optional "
                         "unit, e.g. 24GB, 24GiB or 81559MiB (GB and GiB both mean 2**30 bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


# ---------------------------------------------------------------------------- training hook


def warn_if_too_big(cfg) -> None:
    """At the start of train() on a CUDA machine: warn when the predicted peak exceeds the GPU.

    Advice only, so it never stops a run: a planner failure is logged and training goes on. Under
    train.sharding the figure is per GPU over the launched processes; only the first process speaks.
    """
    if not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        return
    try:
        p = plan(cfg, gpus=int(os.environ.get("WORLD_SIZE", "1")))
        total = torch.cuda.get_device_properties(0).total_memory
        if p.peak > total:
            first = next(iter(p.suggestions(total)), None)
            hint = f"; first thing to try: {first.change}" if first else ""
            log.warning("memory plan: this run is predicted to need %.1f GiB of GPU memory (%s), more than this "
                        "GPU's %.1f GiB%s. Run `fluxtune plan` on this config for the breakdown and options",
                        p.peak / GIB, p.peak_phase, total / GIB, hint)
    except Exception as e:  # advice must never break training
        log.info("memory plan skipped (%s: %s)", type(e).__name__, e)
