"""Exponential moving average of the LoRA weights.

    ema = LoraEMA(params, decay=0.999)
    ema.update()                    # after each optimizer step
    with ema.applied():             # the model runs with the averaged weights inside the block
        render_samples(...)
"""

from __future__ import annotations

import contextlib

import torch


class LoraEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Swap the averaged weights in; the training weights come back on exit, even on error."""
        backup = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    p.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)
