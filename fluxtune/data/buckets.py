"""Aspect-ratio buckets: train every image near its own shape instead of a square crop.

    sizes = bucket_sizes(512, step=16)                  # (w, h) pairs, w*h <= 512*512
    size = assign_bucket(1200, 800, sizes, step=16)     # (624, 416): the closest shape, never upscaled
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=0, num_replicas=2, grad_accum=1)

A batch holds one size only (FLUX.2 requires it, and latents of different sizes cannot be stacked).
A bucket whose images do not fill its last global batch repeats some of them rather than dropping
any, and every global batch is split over all processes and accumulation steps, so every rank gets
the same number of batches and none waits at the end of an epoch.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def bucket_sizes(resolution: int, step: int = 16, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """For each width (a multiple of `step`), the largest height (a multiple of `step`) keeping the
    area at most resolution^2; shapes beyond `max_aspect` either way are left out."""
    area = resolution * resolution
    sizes = set()
    for w in range(step, math.isqrt(int(area * max_aspect)) + step, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            sizes.add((w, h))
    return sorted(sizes)


def assign_bucket(width: int, height: int, sizes: list[tuple[int, int]], step: int = 16,
                  upscale: bool = False) -> tuple[int, int]:
    """The size with the closest aspect ratio (ties: the larger); without `upscale`, an image
    smaller than that size gets the same shape shrunk to fit inside it (sides rounded down to
    `step`), so no image is enlarged."""
    ratio = math.log(width / height)
    w, h = min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))
    if not upscale and (w > width or h > height):
        shrink = min(width / w, height / h)
        w, h = max(step, int(w * shrink) // step * step), max(step, int(h * shrink) // step * step)
    return w, h


def cover_crop(width: int, height: int, target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized size, centre crop box) that scale an image to cover `target` and cut it to it."""
    tw, th = target
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    left, top = (rw - tw) // 2, (rh - th) // 2
    return (rw, rh), (left, top, left + tw, top + th)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, one bucket per batch, in an order that is a function of
    (seed, epoch) and the global batch only: a resumed run sees the same batches, and N processes
    with batch b and A accumulation steps train on the same samples, step by step, as one process
    with batch N*b*A.

    Each epoch is cut into global batches of `batch_size * num_replicas * grad_accum` samples per
    bucket (shuffled with the seed and epoch; a bucket's last one is filled by repeating some of
    its images, never by dropping any), and the global batches are shuffled. Each global batch is
    then yielded as its N*A per-process batches of `batch_size`, in the order accelerate deals
    batches out (the j-th to process j % N), so process r's a-th batch of a step is slice a*N + r.
    `len()` counts those per-process batches, for every process together.

    An index is `i + k * len(buckets)` for the k-th repeat of sample i in an epoch; the dataset
    reads sample `index % len`, and the noise key sees a distinct index for each repeat. Without
    aspect-ratio buckets every sample is in one bucket: the same order rules hold.
    """

    def __init__(self, buckets: list, batch_size: int, seed: int, num_replicas: int = 1, grad_accum: int = 1):
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.num_replicas, self.grad_accum, self.epoch = num_replicas, grad_accum, 0
        self.global_batch = batch_size * num_replicas * grad_accum
        self.groups: dict = {}
        for i, size in enumerate(self.buckets):
            self.groups.setdefault(size, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) in one epoch."""
        return sum(math.ceil(len(members) / self.global_batch) for members in self.groups.values())

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.num_replicas * self.grad_accum

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        seen: Counter = Counter()
        global_batches = []
        for size in sorted(self.groups):
            members = self.groups[size]
            order = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
            short = -len(order) % self.global_batch
            order += [order[j % len(order)] for j in range(short)]  # repeat, never drop
            global_batches += [order[k:k + self.global_batch] for k in range(0, len(order), self.global_batch)]
        n = len(self.buckets)
        for g in torch.randperm(len(global_batches), generator=gen).tolist():
            encoded = []
            for i in global_batches[g]:
                encoded.append(i + seen[i] * n)
                seen[i] += 1
            for k in range(0, self.global_batch, self.batch_size):
                yield encoded[k:k + self.batch_size]

    def summary(self) -> dict:
        """What an epoch holds: per bucket, images, global batches and repeats added to fill them."""
        per_bucket = {}
        for (w, h), members in sorted(self.groups.items()):
            batches = math.ceil(len(members) / self.global_batch)
            per_bucket[f"{w}x{h}"] = {"images": len(members), "batches": batches,
                                      "repeated": batches * self.global_batch - len(members)}
        return {"batch_size": self.batch_size, "processes": self.num_replicas, "grad_accum": self.grad_accum,
                "global_batch": self.global_batch, "buckets": per_bucket, "steps_per_epoch": self.steps_per_epoch()}


def histogram(sizes: list[tuple[int, int]]) -> str:
    """Images per bucket as text bars, largest bucket first."""
    counts = Counter(sizes)
    if not counts:
        return "no images"
    width = max(counts.values())
    lines = []
    for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        bar = "#" * max(1, round(40 * n / width))
        lines.append(f"{w:>5}x{h:<5} ({w / h:4.2f})  {n:>6}  {bar}")
    return "\n".join(lines)
