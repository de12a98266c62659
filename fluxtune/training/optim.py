"""Optimizers by name: torch AdamW, bitsandbytes 8-bit AdamW / paged AdamW / Lion, Prodigy, Adafactor.

    require_optimizer("adamw8bit")        # at the start of a run: a missing package fails early
    optimizer = make_optimizer(params, "adamw8bit", lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8)

The config schema (`OptimConfig`) validates each optimizer's settings; this module maps a name to
its class. Optional packages are imported lazily, with the pip extra that installs them.
"""

from __future__ import annotations

import torch

from fluxtune.errors import require_package

# name -> (package it needs, pip extra that installs it)
_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bnb"),
    "paged_adamw8bit": ("bitsandbytes", "bnb"),
    "lion8bit": ("bitsandbytes", "bnb"),
    "prodigy": ("prodigyopt", "prodigy"),
}


def require_optimizer(name: str) -> None:
    """Import the package optimizer `name` needs, or say which extra to install; call it before
    any model loads so a missing package costs seconds, not a model load."""
    if name not in _PACKAGES:
        return
    require_package(f"optim.name {name}", *_PACKAGES[name])


def make_optimizer(params: list[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                   **settings) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`; `settings` are its own (betas, eps, d_coef, ...)."""
    require_optimizer(name)
    return _BUILDERS[name](list(params), lr=lr, weight_decay=weight_decay, **settings)


def _adamw(params, **kwargs):
    # Fused on the GPU: one kernel for all LoRA tensors, where the default launches several per
    # tensor (hundreds of them). Elsewhere torch's own default.
    fused = True if params and all(p.device.type == "cuda" for p in params) else None
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def _bitsandbytes(class_name: str):
    """8-bit state (uint8 blocks plus per-block scales) for tensors of 4096+ elements; smaller
    ones keep 32-bit state. The paged variant pages state to CPU memory under GPU memory
    pressure; on a CPU, bitsandbytes warns and runs it unpaged."""

    def build(params, **kwargs):
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)(params, **kwargs)

    return build


def _prodigy(params, **kwargs):
    from prodigyopt import Prodigy

    return Prodigy(params, **kwargs)


def _adafactor(params, **kwargs):
    # transformers' Adafactor, not torch.optim.Adafactor: torch's always scales the step by the
    # weight's RMS (floored at 1e-3), so a LoRA's zero-initialised B matrix would start with steps
    # ~1000x smaller than optim.lr. transformers' takes the lr as given (relative_step off, and
    # scale_parameter off by default), as other FLUX LoRA trainers run it, so the lr scheduler applies.
    from transformers.optimization import Adafactor

    return Adafactor(params, relative_step=False, warmup_init=False, **kwargs)


_BUILDERS = {
    "adamw": _adamw,
    "adamw8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw8bit": _bitsandbytes("PagedAdamW8bit"),
    "lion8bit": _bitsandbytes("Lion8bit"),
    "prodigy": _prodigy,
    "adafactor": _adafactor,
}


def lr_scheduler(optimizer, name: str, *, warmup_steps: int, max_steps: int):
    """diffusers' schedule `name`; "constant" keeps its warmup (diffusers' constant_with_warmup)."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
