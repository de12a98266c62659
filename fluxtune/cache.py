"""Latent and text-embedding cache: encode each image and caption once, reuse across runs.

Entries are safetensors files named by a hash of everything that determines them (image bytes or
caption text, the model's identity, the resolution), so one cache folder serves many runs and
models, and a changed input can never be served a stale entry. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fluxtune.data import Item, load_image

log = logging.getLogger("fluxtune")

FORMAT_VERSION = 1


@dataclass
class CacheStats:
    latents_encoded: int = 0
    texts_encoded: int = 0
    reused: int = 0  # items whose latent and caption were both cached already
    skipped: int = 0


def default_cache_dir() -> Path:
    if os.environ.get("FLUXTUNE_CACHE"):
        return Path(os.environ["FLUXTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxtune"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        data = p.encode() if isinstance(p, str) else p
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:40]


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _readable(path: Path) -> bool:
    try:
        load_file(path)
        return True
    except Exception:  # a torn or foreign file: re-encode it
        return False


def build_cache(
    family,
    items: list[Item],
    cache_dir: Path,
    resolution: int,
    device: torch.device,
    batch_size: int = 4,
) -> tuple[dict[Item, tuple[Path, Path]], CacheStats]:
    """Make sure every item has a latent and a text entry; returns {item: (latent, text)} for the
    usable items, in input order."""
    identity = json.dumps({**family.identity(), "v": FORMAT_VERSION}, sort_keys=True)
    (cache_dir / "latents").mkdir(parents=True, exist_ok=True)
    (cache_dir / "text").mkdir(parents=True, exist_ok=True)
    stats = CacheStats()

    entries: dict[Item, tuple[Path, Path]] = {}
    for item in items:
        try:
            image_bytes = item.image.read_bytes()
        except OSError as e:
            log.warning("skipping %s: cannot read (%s)", item.image, e.strerror)
            stats.skipped += 1
            continue
        latent = cache_dir / "latents" / f"{_digest(identity, str(resolution), image_bytes)}.safetensors"
        text = cache_dir / "text" / f"{_digest(identity, item.caption)}.safetensors"
        entries[item] = (latent, text)

    stats.reused = sum(latent.is_file() and text.is_file() for latent, text in entries.values())
    _encode_latents(family, entries, resolution, device, batch_size, stats)
    _encode_texts(family, entries, device, batch_size, stats)
    return {i: entries[i] for i in items if i in entries}, stats


def _encode_latents(family, entries, resolution, device, batch_size, stats):
    todo = [item for item, (latent, _) in entries.items() if not (latent.is_file() and _readable(latent))]
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo)
    for start in range(0, len(todo), batch_size):
        batch, pixels = [], []
        for item in todo[start : start + batch_size]:
            try:
                pixels.append(load_image(item.image, resolution))
                batch.append(item)
            except Exception as e:  # PIL raises many types for broken files; any of them means skip it
                log.warning("skipping %s: not a readable image (%s)", item.image, e)
                entries.pop(item)
                stats.skipped += 1
        if batch:
            latents = family.encode_images(torch.stack(pixels), device)
            for item, z in zip(batch, latents):
                write_atomic({"latents": z}, entries[item][0])
            stats.latents_encoded += len(batch)
        bar.update(len(todo[start : start + batch_size]))
    bar.close()


def _encode_texts(family, entries, device, batch_size, stats):
    todo: dict[Path, str] = {}
    for item, (_, text) in entries.items():
        if text not in todo and not (text.is_file() and _readable(text)):
            todo[text] = item.caption
    files = list(todo)
    bar = tqdm(total=len(files), desc="caching captions", unit="caption", disable=not files)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for file, tensors in zip(chunk, family.encode_prompts([todo[f] for f in chunk], device)):
            write_atomic(tensors, file)
        stats.texts_encoded += len(chunk)
        bar.update(len(chunk))
    bar.close()
