"""Flow-matching math for FLUX training: sigma sampling, noising, target and loss. Pure torch, no I/O.

FLUX models predict the velocity `noise - x0` of the straight path
`x_t = (1 - sigma) * x0 + sigma * noise`, with sigma in [0, 1] (the transformer scales it by 1000).
"""

from __future__ import annotations

import math

import torch

# FLUX's resolution-dependent shift: mu is interpolated linearly in the number of image tokens,
# from 0.5 at 256 tokens to 1.15 at 4096 tokens (the values in the FLUX.1 scheduler config).
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def resolution_mu(num_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (num_tokens - BASE_SEQ_LEN)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Push sigmas towards 1 (more noise) by `shift`: s' = shift*s / (1 + (shift-1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    *,
    mode: str,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | str = "auto",
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Draw one sigma in (0, 1) per sample.

    - uniform: U(0, 1)
    - logit_normal: sigmoid(N(logit_mean, logit_std))
    - shift: uniform, then shifted; shift="auto" uses FLUX's exp(mu) with mu from `num_tokens`.
    """
    if mode == "logit_normal":
        normal = torch.randn(batch_size, generator=generator) * logit_std + logit_mean
        return torch.sigmoid(normal)
    # torch.rand can return exactly 0: a sigma of 0 is a wasted step (nothing to denoise).
    uniform = torch.rand(batch_size, generator=generator).clamp_min(1e-5)
    if mode == "uniform":
        return uniform
    if mode == "shift":
        if shift == "auto":
            if num_tokens is None:
                raise ValueError("shift='auto' needs num_tokens (image tokens per sample)")
            shift = math.exp(resolution_mu(num_tokens))
        return shift_sigmas(uniform, float(shift))
    raise ValueError(f"unknown sigma sampling mode {mode!r}; use uniform, logit_normal or shift")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (bf16 squared errors lose the small differences late in training)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())
