"""The training objective on one batch of cached samples: pack, noise, predict, flow-matching loss.

Shared by the training loop and the evaluation loss, so both measure exactly the same thing.
"""

from __future__ import annotations

import torch

from fluxtune import flow


def batch_loss(family, transformer, batch: dict, *, noise: torch.Tensor | None = None,
               sigmas: torch.Tensor | None = None, generator: torch.Generator | None = None,
               sigma_sampling: dict | None = None, guidance: float | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Loss of `batch` ({"latents", "text"}). Noise and sigmas are drawn from `generator` (on CPU,
    so a seed gives the same draw on any device) unless given."""
    latents = batch["latents"].to(device)
    text = {k: v.to(device) for k, v in batch["text"].items()}
    x0 = family.pack(latents)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    if sigmas is None:
        sigmas = flow.sample_sigmas(x0.shape[0], generator=generator, num_tokens=x0.shape[1], **(sigma_sampling or {}))
    noise, sigmas = noise.to(device, x0.dtype), sigmas.to(device)
    noisy = flow.add_noise(x0, noise, sigmas)
    pred = family.predict(transformer, latents, noisy, sigmas, text, guidance)
    return flow.flow_loss(pred, flow.velocity_target(x0, noise))
