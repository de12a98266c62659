"""Write a folder's metadata.jsonl manifest, and show how its images fall into aspect-ratio buckets.

    fluxtune data prepare photos/ [--out photos/metadata.jsonl] [--resolution 512] [--step 16]
    fluxtune data bucket photos/ [--resolution 512] [--step 16] [--upscale] [--batch-size 1] [--processes 1]

The manifest is the `datasets` imagefolder format, one JSON object per image: `file_name` (relative
to the folder), `text` (the image's .txt caption, empty without one), `width` and `height` (after
EXIF rotation) and `bucket` ("WxH", the size training uses at that resolution and step). It loads
with `datasets.load_dataset("imagefolder", data_dir=DIR)` when it sits in DIR, and training reads
its captions in place of the .txt files. Files the training checks skip are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fluxtune.data.buckets import BucketBatchSampler, histogram
from fluxtune.config import DataConfig
from fluxtune.data.images import image_size
from fluxtune.data.sources import MANIFEST, bucket_targets, folder_items, scan_image_folder

# The training defaults, so the buckets written and shown are the ones a run would use.
MAX_ASPECT = DataConfig.model_fields["max_aspect"].default


def manifest_rows(folder: str | Path, resolution: int = 512, step: int = 16, upscale: bool = False) -> list[dict]:
    """One row per usable image, in name order (the checks and captions of scan_image_folder)."""
    folder = Path(folder)
    items = scan_image_folder(folder, key="folder")
    targets = bucket_targets(items, resolution, step, upscale, MAX_ASPECT)
    rows = []
    for item in items:
        width, height = image_size(item.image)
        w, h = targets[item]
        rows.append({"file_name": item.image.relative_to(folder).as_posix(), "text": item.caption,
                     "width": width, "height": height, "bucket": f"{w}x{h}"})
    return rows


def write_manifest(folder: str | Path, out: str | Path | None = None, resolution: int = 512, step: int = 16) -> Path:
    """Write the manifest atomically (a `.tmp` renamed into place), replacing any earlier one."""
    out = Path(out) if out else Path(folder) / MANIFEST
    rows = manifest_rows(folder, resolution, step)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


def bucket_report(folder: str | Path, resolution: int = 512, step: int = 16, upscale: bool = False,
                  batch_size: int = 1, processes: int = 1) -> str:
    """Images per bucket, then what the batch sampler makes of them in one epoch."""
    items = folder_items(folder, key="folder")
    sizes = bucket_targets(items, resolution, step, upscale, MAX_ASPECT)
    summary = BucketBatchSampler([sizes[i] for i in items], batch_size, seed=0, num_replicas=processes).summary()
    repeated = sum(b["repeated"] for b in summary["buckets"].values())
    return "\n".join([
        f"{len(items)} images in {len(summary['buckets'])} buckets (resolution {resolution}, step {step}"
        f"{', upscaled' if upscale else ''})",
        histogram([sizes[i] for i in items]),
        f"batch size {batch_size} on {processes} process{'es' * (processes != 1)}: "
        f"{summary['steps_per_epoch']} steps per epoch of {summary['global_batch']} images, "
        f"{repeated} images repeated to fill each bucket's last one",
    ])
