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
The arithmetic is `fluxtune.models.memory`; this module reads a config into it, suggests changes
that fit a card, and renders the table.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from fluxtune.models.memory import (
    GIB,
    OVERHEAD_ROW,
    Settings,
    Shapes,
    caching_phases,
    dtype_name,
    encoders,
    host_ram,
    image_tokens,
    meta_model,
    numel,
    training_phase,
    weights_of,
)

log = logging.getLogger("fluxtune")

DEFAULT_CARDS_GIB = (16, 24, 48, 80)


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
    transformer = meta_model("diffusers", family.parts.transformer_cls.__name__, tcfg)
    targets = resolve_targets(family, lora_cfg.targets)
    check_targets(transformer, targets)
    lora = Counter((mod.in_features, mod.out_features) for mod in matched_modules(transformer, targets).values())
    keep = getattr(family.parts, "keep_unquantized", ())
    quantizable = [mod for name, mod in transformer.named_modules()
                   if isinstance(mod, torch.nn.Linear) and not any(k in name for k in keep)]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    parts = encoders(m.path, m.revision, read_model_index(m.path, m.revision),
                      getattr(family.parts, "quantizable_text_encoders", ()))
    return Shapes(
        family=family.name, class_name=type(transformer).__name__,
        hidden=tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
        double_blocks=len(transformer.transformer_blocks), single_blocks=len(transformer.single_transformer_blocks),
        text_tokens=family.max_sequence_length, transformer=weights_of(transformer, quantizable),
        largest_quantizable=max((mod.weight.numel() for mod in quantizable), default=0), largest_block=max(map(numel, blocks)),
        lora_layers=tuple(sorted(lora.items())), outside_blocks=numel(transformer) - sum(map(numel, blocks)),
        encoders=tuple(p for p in parts if p.name != "vae"), vae=next((p for p in parts if p.name == "vae"), None),
    )


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
        f"{sh.text_tokens} text tokens, {ckpt}, {dtype_name(s)} weights, LoRA rank {s.rank} on "
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
    components = [c for c in dict.fromkeys(c for rows in p.phases.values() for c in rows) if c != OVERHEAD_ROW]
    components.append(OVERHEAD_ROW)
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
