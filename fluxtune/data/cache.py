"""Latent and text-embedding cache: encode each image and caption once, reuse across runs.

Entries are safetensors files named by a hash of everything that determines them (image bytes or
caption text, the model's identity, the resolution), so one cache folder serves many runs and
models, and a changed input can never be served a stale entry. Writes are atomic (a `.tmp` file
renamed into place), and each entry carries a sha256 of its tensors in its header: an entry that
fails the check (flipped bits, a torn or foreign file) is re-encoded with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fluxtune.data.images import load_image
from fluxtune.data.sources import Item

log = logging.getLogger("fluxtune")

FORMAT_VERSION = 1
CHECKSUM_KEY = "fluxtune.sha256"


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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order (what a cache entry holds)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        # Bytes of any dtype (bf16 included) through a uint8 view: no copy.
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a sibling `.NAME.PID.tmp` and rename it into place: a reader sees the whole entry or
    none. A killed process leaves only the `.tmp` file, which no lookup ever names."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={CHECKSUM_KEY: tensors_sha256(tensors)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def entry_problem(path: Path) -> str | None:
    """Why the cache entry at `path` cannot be reused, or None when its checksum holds."""
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        return f"unreadable: {' '.join(str(e).split()) or type(e).__name__}"
    if expected is None:
        return "no checksum"
    if tensors_sha256(tensors) != expected:
        return "checksum mismatch"
    return None


def _reusable(path: Path, checked: dict[Path, bool]) -> bool:
    """Whether `path` holds a sound entry; a file that is there but fails the check is reported
    once and re-encoded."""
    if path not in checked:
        problem = entry_problem(path) if path.is_file() else "missing"
        if problem not in (None, "missing"):
            log.warning("cache entry %s is corrupt (%s); re-encoding", path, problem)
        checked[path] = problem is None
    return checked[path]


def build_cache(
    family,
    items: list[Item],
    cache_dir: Path,
    resolution: int,
    device: torch.device,
    batch_size: int = 4,
    sizes: dict[Item, tuple[int, int]] | None = None,
    captions: bool = True,
) -> tuple[dict[Item, tuple[Path, Path | None]], CacheStats]:
    """Make sure every item has a latent and a text entry; returns {item: (latent, text)} for the
    usable items, in input order. `sizes` gives an item's (width, height), e.g. its aspect-ratio
    bucket; without it, a resolution^2 square. `captions=False` caches latents only (text None):
    for a caller that trains with other texts than the captions as written and caches those
    with `cache_texts`."""
    sizes = sizes or {}
    latent_id, text_id = _identity(family, "latents"), _identity(family, "text")
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
        shape = f"{sizes[item][0]}x{sizes[item][1]}" if item in sizes else str(resolution)
        latent = cache_dir / "latents" / f"{_digest(latent_id, shape, image_bytes)}.safetensors"
        entries[item] = (latent, _text_file(cache_dir, text_id, item.caption) if captions else None)

    checked: dict[Path, bool] = {}
    stats.reused = sum(_reusable(latent, checked) and (text is None or _reusable(text, checked))
                       for latent, text in entries.values())
    _encode_latents(family, entries, resolution, sizes, device, batch_size, stats, checked)
    if captions:
        todo = {text: item.caption for item, (_, text) in entries.items()}
        stats.texts_encoded += _encode_texts(family, todo, device, batch_size, checked)
    return {i: entries[i] for i in items if i in entries}, stats


def cache_texts(family, texts: list[str], cache_dir: Path, device: torch.device,
                batch_size: int = 4) -> tuple[dict[str, Path], int]:
    """({text: entry file}, how many were encoded) for the distinct `texts`, the empty one
    included: the same entries `build_cache` writes for captions, so either one reuses the other's."""
    text_id = _identity(family, "text")
    (cache_dir / "text").mkdir(parents=True, exist_ok=True)
    files = {text: _text_file(cache_dir, text_id, text) for text in dict.fromkeys(texts)}
    encoded = _encode_texts(family, {file: text for text, file in files.items()}, device, batch_size, {})
    return files, encoded


def _identity(family, part: str) -> str:
    return json.dumps({**family.identity(part), "v": FORMAT_VERSION}, sort_keys=True)


def _text_file(cache_dir: Path, text_id: str, text: str) -> Path:
    return cache_dir / "text" / f"{_digest(text_id, text)}.safetensors"


def _encode_latents(family, entries, resolution, sizes, device, batch_size, stats, checked):
    todo = [item for item, (latent, _) in entries.items() if not _reusable(latent, checked)]
    by_size: dict[tuple[int, int], list[Item]] = {}
    for item in todo:  # a batch through the VAE has one size
        by_size.setdefault(sizes.get(item, (resolution, resolution)), []).append(item)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo)
    for size, group in by_size.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batch, pixels = [], []
            for item in chunk:
                try:
                    pixels.append(load_image(item.image, resolution, size))
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
            bar.update(len(chunk))
    bar.close()


def _encode_texts(family, texts: dict[Path, str], device, batch_size, checked) -> int:
    """Encode the {entry file: text} pairs whose entry is not reusable; returns how many."""
    todo = {file: text for file, text in texts.items() if not _reusable(file, checked)}
    files = list(todo)
    bar = tqdm(total=len(files), desc="caching captions", unit="caption", disable=not files)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for file, tensors in zip(chunk, family.encode_prompts([todo[f] for f in chunk], device)):
            write_atomic(tensors, file)
        bar.update(len(chunk))
    bar.close()
    return len(files)
