"""The training objective on one batch of cached samples: pack, noise, predict, flow-matching loss.

Shared by the training loop and the evaluation loss, so both measure exactly the same thing.
"""

from __future__ import annotations

import hashlib

import torch

from fluxtune.training import flow


def batch_loss(family, transformer, batch: dict, *, noise: torch.Tensor | None = None,
               sigmas: torch.Tensor | None = None, generator: torch.Generator | list | None = None,
               sigma_sampling: dict | None = None, guidance: float | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Loss of `batch` ({"latents", "text"}). Noise and sigmas are drawn on CPU (a seed gives the
    same draw on any device) unless given: from one `generator` for the batch, or from a list of
    generators, one per sample, so a sample's draw does not depend on its batch."""
    latents = batch["latents"].to(device)
    text = {k: v.to(device) for k, v in batch["text"].items()}
    x0 = family.pack(latents)
    gens = generator if isinstance(generator, list) else None
    if noise is None:
        noise = (torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]) if gens
                 else torch.randn(x0.shape, generator=generator))
    if sigmas is None:
        draw = {"num_tokens": x0.shape[1], **(sigma_sampling or {})}
        sigmas = (torch.cat([flow.sample_sigmas(1, generator=g, **draw) for g in gens]) if gens
                  else flow.sample_sigmas(x0.shape[0], generator=generator, **draw))
    noise, sigmas = noise.to(device, x0.dtype), sigmas.to(device)
    noisy = flow.add_noise(x0, noise, sigmas)
    pred = family.predict(transformer, latents, noisy, sigmas, text, guidance)
    return flow.flow_loss(pred, flow.velocity_target(x0, noise))


def sample_generators(seed: int, epoch: int, batch: dict) -> list[torch.Generator]:
    """One CPU generator per sample, keyed by (seed, epoch, sample): its noise and sigma are the
    same on any device, in any batch, on any rank. So N processes with batch b train exactly like
    one process with batch N*b, and a resumed run needs no noise stream state."""
    gens = []
    for index in batch["index"].tolist():
        key = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
    return gens
