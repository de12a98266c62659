"""A deterministic evaluation loss on held-out images.

Every evaluation uses the same sigmas and the same noise per image (drawn from a fixed seed), so the
curve moves only when the weights do: comparable across steps and across runs.
"""

from __future__ import annotations

import torch

from fluxtune.training.objective import batch_loss


@torch.no_grad()
def evaluation_loss(family, transformer, dataset, *, sigmas: list[float], seed: int, guidance,
                    device) -> dict[str, float]:
    """{"eval/loss": mean, "eval/loss_sigma_0.1": ..., ...} over every held-out image and sigma."""
    was_training = transformer.training
    transformer.eval()  # no LoRA dropout
    totals = {s: 0.0 for s in sigmas}
    try:
        for i in range(len(dataset)):
            sample = dataset[i]
            batch = {"latents": sample["latents"][None], "text": {k: v[None] for k, v in sample["text"].items()}}
            gen = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(family.pack(batch["latents"]).shape, generator=gen)
            for s in sigmas:
                loss = batch_loss(family, transformer, batch, noise=noise, sigmas=torch.tensor([s]),
                                  guidance=guidance, device=device)
                totals[s] += loss.item()
    finally:
        transformer.train(was_training)
    per_sigma = {f"eval/loss_sigma_{s:g}": t / len(dataset) for s, t in totals.items()}
    return {"eval/loss": sum(per_sigma.values()) / len(per_sigma), **per_sigma}
