"""Training data: a folder of images with same-name caption files, and the dataset over the cache.

    items = scan_image_folder("photos/", default_caption="a photo of sks")
    pixels = load_image(items[0].image, resolution=512)   # (3, 512, 512) in [-1, 1]
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from fluxtune.buckets import assign_bucket, bucket_sizes, cover_crop
from fluxtune.errors import DataError
from fluxtune.image_checks import ERROR, candidate_files, duplicate_findings, header_findings, open_rgb, read_caption

log = logging.getLogger("fluxtune")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


def dataset_sha256(items: list[Item]) -> str:
    """Content identity of a dataset: sha256 over its images' bytes and captions, in name order.
    The same photos and captions give the same hash in any folder, on any machine."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: (i.image.name, i.caption)):
        digest.update(hashlib.sha256(item.image.read_bytes()).digest())
        digest.update(hashlib.sha256(item.caption.encode("utf-8")).digest())
    return digest.hexdigest()


def scan_image_folder(folder: str | Path, default_caption: str = "", caption_extension: str = ".txt") -> list[Item]:
    """The folder's usable images with their captions. The checks of `fluxtune data validate` that
    read only file headers run here (under a millisecond per image): links that loop or dangle,
    non-images, decompression bombs, tiny images, extreme aspect ratios and exact duplicates are
    skipped with one warning line each. Pixels are decoded later, when the cache encodes them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path {folder}: not a folder; point it at a folder of images with .txt captions")
    paths, problems = candidate_files(folder, IMAGE_EXTENSIONS)
    for path in paths:
        problems += [f for f in header_findings(path) if f.severity == ERROR]
    problems += duplicate_findings([p for p in paths if p not in {f.path for f in problems}])
    for problem in sorted(problems, key=lambda f: f.path):
        log.warning("skipping %s: %s", problem.path, problem.message)
    skipped = {f.path for f in problems}
    items = []
    for image in (p for p in paths if p not in skipped):
        caption, caption_problems = read_caption(image, caption_extension)
        for problem in caption_problems:
            if problem.severity == ERROR:
                log.warning("%s: %s", problem.path, problem.message)
        items.append(Item(image, default_caption if caption is None else caption))
    if not items and problems:
        raise DataError(f"data.path {folder}: none of the {len(skipped)} images could be read or used (see the "
                        f"warnings above; `fluxtune data validate {folder}` reports every problem)")
    if not items:
        raise DataError(
            f"data.path {folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return items


def split_holdout(items: list[Item], fraction: float) -> tuple[list[Item], list[Item]]:
    """(train, held out): an image is held out when a hash of its file name falls below `fraction`,
    so the split is the same in every run and does not move when files are added. At least one
    image is held out (when asked for) and at least one is kept for training."""
    if fraction <= 0:
        return items, []
    def score(item):
        return int(hashlib.sha1(item.image.name.encode()).hexdigest()[:8], 16) / 2**32
    ranked = sorted(items, key=score)
    held = {i for i in ranked if score(i) < fraction} or set(ranked[:1])
    if len(held) == len(items):
        held.discard(ranked[-1])
    return [i for i in items if i not in held], [i for i in items if i in held]


def load_image(path: Path, resolution: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode fully (a truncated file fails here, and the cache skips it with a warning), apply EXIF
    rotation, convert to RGB as `fluxtune data validate --fix` does (16-bit scaled, alpha composited
    on white), then resize to cover `size` (width, height; default a resolution^2 square) and
    centre-crop to it. Returns (3, h, w) in [-1, 1]."""
    img = open_rgb(path)
    (w, h), box = cover_crop(img.width, img.height, size or (resolution, resolution))
    img = img.resize((w, h), Image.Resampling.LANCZOS).crop(box)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as training sees it (EXIF rotation applied), from the header only; None
    when the header cannot be read (the cache then reports the file)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # PIL raises many types for broken files; the cache's full decode reports them
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def bucket_targets(items: list[Item], resolution: int, step: int, upscale: bool,
                   max_aspect: float) -> dict[Item, tuple[int, int]]:
    """Each image's training size: its aspect-ratio bucket (see fluxtune.buckets)."""
    sizes = bucket_sizes(resolution, step, max_aspect)
    targets = {}
    for item in items:
        wh = image_size(item.image)
        targets[item] = assign_bucket(*wh, sizes, step, upscale) if wh else (resolution, resolution)
    return targets


class CachedDataset(torch.utils.data.Dataset):
    """Samples read from cache files: {"latents": (C,h,w), "text": {name: tensor}, "index": i}."""

    def __init__(self, entries: list[tuple[Path, Path]], repeats: int = 1):
        self.entries = list(entries) * repeats

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        # i may count repeats past the end (fluxtune.buckets.BucketBatchSampler): sample i % len
        latent_file, text_file = self.entries[i % len(self.entries)]
        return {"latents": load_file(latent_file)["latents"], "text": load_file(text_file), "index": i}


def collate(samples: list[dict]) -> dict:
    text_keys = samples[0]["text"].keys()
    return {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": {k: torch.stack([s["text"][k] for s in samples]) for k in text_keys},
        "index": torch.tensor([s["index"] for s in samples]),
    }


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order that depends only on (seed, epoch): a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self):
        return self.size
