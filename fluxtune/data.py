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
from PIL import Image, ImageOps
from safetensors.torch import load_file

from fluxtune.errors import DataError

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
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path {folder}: not a folder; point it at a folder of images with .txt captions")
    items = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = image.with_suffix(caption_extension)
        caption = default_caption
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip() or default_caption
            except UnicodeDecodeError:
                log.warning("%s: caption is not valid UTF-8; using data.default_caption", caption_file)
        items.append(Item(image, caption))
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


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode fully, apply EXIF rotation, resize the short side and centre-crop to a square."""
    with Image.open(path) as img:
        img.load()  # decode now so a truncated file fails here, not halfway through training
        img = ImageOps.exif_transpose(img).convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CachedDataset(torch.utils.data.Dataset):
    """Samples read from cache files: {"latents": (C,h,w), "text": {name: tensor}, "index": i}."""

    def __init__(self, entries: list[tuple[Path, Path]], repeats: int = 1):
        self.entries = list(entries) * repeats

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        latent_file, text_file = self.entries[i]
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
