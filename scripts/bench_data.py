"""Dataset-preparation throughput: validate, bucket and cache, in images per second.

    python scripts/bench_data.py --images 200 [--model DIR] [--resolution 512]

Writes N synthetic JPEGs of mixed sizes and shapes (smooth gradients plus noise, so they compress
like photos) into a temporary folder, then times, on this machine:
- validate: `fluxtune data validate`'s checks (header checks, a full decode, duplicates);
- bucket: reading each header and choosing its aspect-ratio bucket;
- cache: encoding latents and captions with a pipeline (default: a tiny FLUX.2-klein made here),
  cold (everything encoded) and warm (everything reused).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = [(1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (4 / 3, 1.0), (16 / 9, 1.0), (1.0, 2.0)]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sx, sy = SHAPES[i % len(SHAPES)]
        base = int(rng.integers(384, 1536))
        w, h = int(base * sx), int(base * sy)
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)
        (folder / f"img{i:05d}.txt").write_text(f"a synthetic gradient number {i}, in the style of sks", encoding="utf-8")


def timed(label: str, count: int, fn):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<22} {count:>6} images  {seconds:8.2f} s  {count / seconds:9.1f} images/s")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--model", help="pipeline folder for the cache timing (default: a tiny FLUX.2-klein)")
    p.add_argument("--batch-size", type=int, default=4, help="cache encoding batch")
    args = p.parse_args(argv)

    import torch

    from fluxtune.data.buckets import bucket_sizes
    from fluxtune.data.cache import build_cache
    from fluxtune.data.sources import bucket_targets, scan_image_folder
    from fluxtune.models.families import load_family
    from fluxtune.data.images import decode_findings, duplicate_findings, header_findings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing {args.images} synthetic images ({len(SHAPES)} shapes, 384-2300 px sides) ...")
        write_images(root / "images", args.images)
        paths = sorted((root / "images").glob("*.jpg"))
        print(f"torch threads {torch.get_num_threads()}, resolution {args.resolution}")

        def validate():
            for path in paths:
                header_findings(path, args.resolution)
                decode_findings(path)
            duplicate_findings(paths)

        timed("validate (full decode)", len(paths), validate)
        items = timed("scan (header checks)", len(paths), lambda: scan_image_folder(root / "images"))
        targets = timed("bucket", len(items), lambda: bucket_targets(items, args.resolution, 16, False, 4.0))
        print(f"{len(set(targets.values()))} buckets used of {len(bucket_sizes(args.resolution, 16))}")

        model = args.model
        if model is None:
            from fluxtune.models.tiny import make_tiny

            model = str(make_tiny("flux2-klein", root / "tiny"))
        family = load_family(model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cache = root / "cache"
        timed("cache, cold", len(items), lambda: build_cache(family, items, cache, args.resolution, device,
                                                            batch_size=args.batch_size, sizes=targets))
        timed("cache, warm", len(items), lambda: build_cache(family, items, cache, args.resolution, device,
                                                            batch_size=args.batch_size, sizes=targets))


if __name__ == "__main__":
    main()
