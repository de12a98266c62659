"""The data side of a run: list and cache the images and captions, then build the loader.

    data = prepare_data(cfg.data, cfg.eval, family, accelerator)   # cache latents (and captions)
    loader, order = make_loader(data, repeats=2, resolution=512, batch_size=4, seed=0,
                                processes=accelerator.num_processes, grad_accum=1, num_workers=0)
    if data.caption_settings:
        cache_captions(family, data, loader, order, accelerator, seed=0, batches=1000)

Used by `fluxtune.train`; kept apart so the training recipe reads top to bottom. It takes the
config's `data` and `eval` sections and plain values, never the whole config.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxtune.data.buckets import BucketBatchSampler
from fluxtune.data.cache import CacheStats, build_cache, cache_texts, default_cache_dir
from fluxtune.data.captions import CaptionSettings, choose_caption, eval_caption
from fluxtune.data.sources import (
    DataError,
    bucket_targets,
    dataset_sha256,
    list_items,
    scan_image_folder,
    split_holdout,
)

log = logging.getLogger("fluxtune")


def make_loader(data: "RunData", *, repeats: int, resolution: int, batch_size: int, seed: int, processes: int,
                grad_accum: int, num_workers: int):
    """The loader and its batch sampler. The data order is a function of the global batch
    (batch size x processes x accumulation steps) only, so any split of it trains alike
    (`fluxtune.data.buckets.BucketBatchSampler`); without buckets every image is in one."""
    dataset = CachedDataset(data.train_entries, repeats=repeats)
    sizes = data.sizes or [(resolution, resolution)] * len(data.train_entries)
    order = BucketBatchSampler(sizes * repeats, batch_size, seed, processes, grad_accum)
    # Its own generator: each new epoch's iterator draws a worker seed, which would otherwise
    # come from (and shift) the global stream that LoRA dropout uses, breaking exact resume.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())
    return loader, order


def report_buckets(summary: dict, out: Path) -> None:
    """The buckets in use, in the log and in output_dir/buckets.json."""
    (out / "buckets.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    parts = [f"{size}: {b['images']} images" + (f" (+{b['repeated']} repeated)" if b["repeated"] else "")
             for size, b in summary["buckets"].items()]
    log.info("buckets: %s; %d steps per epoch of %d images each", ", ".join(parts), summary["steps_per_epoch"],
             summary["global_batch"])


@dataclass
class RunData:
    """The cached dataset a run trains on."""

    train_entries: list  # (latent file, text file) per training image; text None with caption_settings
    eval_entries: list
    sizes: list  # (width, height) per training image with buckets; empty without
    stats: CacheStats
    identity: dict  # size and content hash, for the LoRA's header
    cache_dir: Path
    caption_settings: CaptionSettings | None  # None: every image trains with its caption as written
    captions: list[str]  # per training image, as written
    eval_captions: list[str]  # per held-out image, as written


def _shared_cache(family, items, cache_dir, resolution, accelerator, **kwargs):
    """Under N processes each encodes its own shard of the images (every N-th, so each GPU loads
    the encoders and works at once); after a barrier every process reads the whole cache, complete
    by then, so nothing is encoded twice. The counts returned are this process's."""
    if accelerator.num_processes == 1:
        return build_cache(family, items, cache_dir, resolution, accelerator.device, **kwargs)
    shard = list(dict.fromkeys(items))[accelerator.process_index :: accelerator.num_processes]
    _, mine = build_cache(family, shard, cache_dir, resolution, accelerator.device, **kwargs)
    accelerator.wait_for_everyone()
    entries, stats = build_cache(family, items, cache_dir, resolution, accelerator.device, **kwargs)
    stats.latents_encoded += mine.latents_encoded
    stats.texts_encoded += mine.texts_encoded
    return entries, stats


def prepare_data(d, evaluation, family, accelerator) -> RunData:
    """Encode latents and captions once (each process a shard, see `_shared_cache`). `d` and
    `evaluation` are the config's `data` and `eval` sections. Captions changed at train time (see
    fluxtune.data.captions) are left to `cache_captions`, which knows the epochs the run reaches."""
    cache_dir = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    items = list_items(d.resolved_sources(), cache_dir / "images", d.default_caption, d.caption_extension)
    if evaluation.path:
        held_out = scan_image_folder(evaluation.path, d.default_caption, d.caption_extension)
    else:
        items, held_out = split_holdout(items, evaluation.fraction)
    sizes = bucket_targets(items + held_out, d.resolution, d.bucket_step, d.upscale, d.max_aspect) if d.buckets else {}
    settings = CaptionSettings(d.trigger_word, d.caption_dropout, d.shuffle_tags, d.keep_tags)
    settings = settings if settings.active([i.caption for i in items + held_out]) else None
    entries, stats = _shared_cache(family, items + held_out, cache_dir, d.resolution, accelerator,
                                   sizes=sizes, captions=settings is None)
    used = [i for i in items if i in entries]
    eval_items = [i for i in held_out if i in entries]
    eval_entries = [entries[i] for i in eval_items]
    if not used:
        where = f"data.path {d.path}" if d.path else "data.sources"
        raise DataError(f"{where}: none of the {len(items)} images could be read (see warnings above)")
    log.info("dataset: %d training and %d held-out images (%d skipped); cache %s: %d latents and %d captions "
             "encoded, %d reused", len(used), len(eval_entries), stats.skipped, cache_dir,
             stats.latents_encoded, stats.texts_encoded, stats.reused)
    return RunData([entries[i] for i in used], eval_entries, [sizes[i] for i in used] if sizes else [], stats,
                 {"images": len(used), "sha256": dataset_sha256(used)}, cache_dir, settings,
                 [i.caption for i in used], [i.caption for i in eval_items])


def cache_captions(family, data: RunData, loader, order, accelerator, *, seed: int, batches: int) -> None:
    """Choose the caption of every (epoch, sample) a run of `batches` batches per process reaches
    and encode the distinct ones now: the text encoders are freed before training. The loader's
    dataset then reads each sample's text by (epoch, index); held-out images are scored with a
    fixed caption."""
    settings, n = data.caption_settings, len(data.captions)
    seen = _samples_read(loader, order, accelerator, batches)
    plan = {(e, i): choose_caption(data.captions[i % n], settings, seed, e, i) for e, i in seen}
    held_out = [eval_caption(c, settings) for c in data.eval_captions]
    with accelerator.main_process_first():
        files, encoded = cache_texts(family, [*plan.values(), *held_out], data.cache_dir, accelerator.device)
    loader.dataset.texts = {key: files[text] for key, text in plan.items()}
    data.eval_entries = [(latent, files[text]) for (latent, _), text in zip(data.eval_entries, held_out)]
    data.stats.texts_encoded += encoded
    epochs = 1 + max(e for e, _ in plan)
    log.info("captions: %d distinct over %d epochs (%d encoded, %d reused), %.0f%% of samples uncaptioned",
             len(files), epochs, encoded, len(files) - encoded,
             100 * sum(not t for t in plan.values()) / len(plan))


def _samples_read(loader, order, accelerator, batches: int) -> list[tuple[int, int]]:
    """(epoch, index) of every sample in the epochs a run of `batches` batches per process reaches.
    Whole epochs: the loader reads a batch ahead of the one training takes, and a resumed run reads
    the batches of its epoch that it skips. Per-process epoch length as `accelerator.prepare` deals
    the batches out (accelerate's BatchSamplerShard)."""
    from accelerate.data_loader import BatchSamplerShard

    per_process = len(BatchSamplerShard(loader.batch_sampler, accelerator.num_processes, 0,
                                        split_batches=accelerator.split_batches,
                                        even_batches=accelerator.even_batches))
    seen: dict[tuple[int, int], None] = {}
    for epoch in range(math.ceil(batches / per_process)):
        order.set_epoch(epoch)
        seen.update(dict.fromkeys((epoch, i) for batch in loader.batch_sampler for i in batch))
    order.set_epoch(0)
    return list(seen)


class CachedDataset(torch.utils.data.Dataset):
    """Samples read from cache files: {"latents": (C,h,w), "text": {name: tensor}, "index": i}.

    `texts` ({(epoch, index): text entry}, see fluxtune.data.captions) gives a sample a caption per epoch
    in place of its entry's own; the loop calls `set_epoch` before each pass."""

    def __init__(self, entries: list[tuple[Path, Path | None]], repeats: int = 1,
                 texts: dict[tuple[int, int], Path] | None = None):
        self.entries = list(entries) * repeats
        self.texts, self.epoch = texts, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        # i may count repeats past the end (fluxtune.data.buckets.BucketBatchSampler): sample i % len
        latent_file, text_file = self.entries[i % len(self.entries)]
        if self.texts is not None:
            text_file = self.texts[(self.epoch, i)]
        return {"latents": load_file(latent_file)["latents"], "text": load_file(text_file), "index": i}


def collate(samples: list[dict]) -> dict:
    text_keys = samples[0]["text"].keys()
    return {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": {k: torch.stack([s["text"][k] for s in samples]) for k in text_keys},
        "index": torch.tensor([s["index"] for s in samples]),
    }
