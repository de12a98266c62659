"""Where training images come from: folders with same-name caption files, `metadata.jsonl`
manifests and Hugging Face datasets, listed as `Item`s (image file, caption), each file vetted by
`fluxtune.data.images` on the way; the held-out split and each image's bucket.

    items = scan_image_folder("photos/", default_caption="a photo of sks")
    items = list_items(cfg.data.resolved_sources(), image_dir=cache / "images")  # folders, manifests, datasets
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fluxtune.data.buckets import assign_bucket, bucket_sizes
from fluxtune.errors import DataError
from fluxtune.data.images import (
    ERROR,
    Finding,
    candidate_files,
    duplicate_findings,
    header_findings,
    image_size,
    read_caption,
)

log = logging.getLogger("fluxtune")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MANIFEST = "metadata.jsonl"  # the file name `datasets`' imagefolder reads captions and columns from


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


def scan_image_folder(folder: str | Path, default_caption: str = "", caption_extension: str = ".txt",
                      key: str = "data.path") -> list[Item]:
    """The folder's usable images with their captions. The checks of `fluxtune data validate` that
    read only file headers run here (under a millisecond per image): links that loop or dangle,
    non-images, decompression bombs, tiny images, extreme aspect ratios and exact duplicates are
    skipped with one warning line each. Pixels are decoded later, when the cache encodes them.
    `key` is the config key named in errors."""
    folder = _folder(folder, key)
    paths, problems = candidate_files(folder, IMAGE_EXTENSIONS)
    usable, skipped = _without_bad_files(paths, problems)
    items = []
    for image in usable:
        caption, caption_problems = read_caption(image, caption_extension)
        for problem in caption_problems:
            if problem.severity == ERROR:
                log.warning("%s: %s", problem.path, problem.message)
        items.append(Item(image, default_caption if caption is None else caption))
    if not items and skipped:
        raise DataError(f"{key} {folder}: none of the {len(skipped)} images could be read or used (see the "
                        f"warnings above; `fluxtune data validate {folder}` reports every problem)")
    if not items:
        raise DataError(
            f"{key} {folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return items


def _folder(folder: str | Path, key: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{key} {folder}: not a folder; point it at a folder of images with .txt captions "
                        f"or a {MANIFEST}")
    return folder


def _without_bad_files(paths: list[Path], problems: list[Finding]) -> tuple[list[Path], set[Path]]:
    """(usable paths, skipped paths): the header checks of `fluxtune data validate` on each file,
    plus exact duplicates, one warning line per skipped file. Every source goes through here, so a
    dataset's images are held to the same rules as a folder's."""
    for path in paths:
        problems += [f for f in header_findings(path) if f.severity == ERROR]
    problems += duplicate_findings([p for p in paths if p not in {f.path for f in problems}])
    for problem in sorted(problems, key=lambda f: f.path):
        log.warning("skipping %s: %s", problem.path, problem.message)
    skipped = {f.path for f in problems}
    return [p for p in paths if p not in skipped], skipped


def list_items(sources: dict, image_dir: Path, default_caption: str = "",
               caption_extension: str = ".txt") -> list[Item]:
    """The items of every source, each listed `repeats` times. A repeat is a separate dataset
    index, so the training noise (keyed by index) differs between repeats. `sources` maps the
    config key named in messages to a source (the fields of fluxtune.config.SourceConfig);
    `image_dir` receives the images that a dataset holds as bytes (see dataset_items)."""
    items = []
    for key, source in sources.items():
        caption = default_caption if source.default_caption is None else source.default_caption
        if source.dataset is not None:
            found = dataset_items(source.dataset, image_dir, source.split, source.image_column,
                                  source.caption_column, caption, key)
        else:
            found = folder_items(source.path, caption, caption_extension, source.caption_column, key)
        items += found * source.repeats
    return items


def folder_items(folder: str | Path, default_caption: str = "", caption_extension: str = ".txt",
                 caption_column: str = "text", key: str = "data.path") -> list[Item]:
    """A folder's items. With a metadata.jsonl (the `datasets` imagefolder format, as written by
    `fluxtune data prepare`) the manifest lists the images, and a caption is the row's
    `caption_column`, else the image's caption file, else `default_caption`; images it does not
    list are left out. Without one, every image with its caption file (scan_image_folder)."""
    folder = _folder(folder, key)
    if not (folder / MANIFEST).is_file():
        return scan_image_folder(folder, default_caption, caption_extension, key)
    rows = read_manifest(folder / MANIFEST, caption_column, key)
    by_path = {folder / row["file_name"]: row for row in rows}
    missing = [Finding(p, "missing", ERROR, f"listed in {MANIFEST} but not there") for p in by_path if not p.is_file()]
    usable, _ = _without_bad_files([p for p in by_path if p.is_file()], missing)
    unlisted = set(candidate_files(folder, IMAGE_EXTENSIONS)[0]) - set(by_path)
    if unlisted:
        log.info("%s %s: %d images not listed in its %s are not used", key, folder, len(unlisted), MANIFEST)
    if not usable:
        raise DataError(f"{key} {folder}: none of the {len(rows)} images in its {MANIFEST} could be used "
                        "(see the warnings above)")
    items = []
    for image in usable:
        caption = by_path[image].get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            caption, _ = read_caption(image, caption_extension)
        items.append(Item(image, default_caption if caption is None else caption.strip()))
    return items


def read_manifest(file: Path, caption_column: str = "text", key: str = "data.path") -> list[dict]:
    """The rows of a metadata.jsonl; each needs a `file_name`, and some row the caption column."""
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{key} {file} line {n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{key} {file} line {n}: needs \"file_name\", the image's path relative to the folder")
        rows.append(row)
    columns = sorted({column for row in rows for column in row})
    if rows and caption_column not in columns:
        raise DataError(f"{key}: caption column {caption_column!r} is in no row of {file} (columns: "
                        f"{', '.join(columns)}); set caption_column")
    return rows


def dataset_items(name: str, image_dir: Path, split: str = "train", image_column: str = "image",
                  caption_column: str = "text", default_caption: str = "", key: str = "data.sources.0") -> list[Item]:
    """A `datasets` dataset's rows as items: a local dataset folder (imagefolder, parquet, arrow,
    or one written by `save_to_disk`) or a hub id. The cache keys its entries by the bytes of an
    image file, so an image held inside the dataset (bytes, or a PIL image that `datasets` encoded)
    is written once to `image_dir` under a hash of its bytes (materialise_image): the same image
    is always the same file, and a rerun reuses it. Rows that share an image each train."""
    datasets = _datasets(key)
    ds = _load_dataset(datasets, name, split, key)
    for column, field in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in ds.column_names:
            raise DataError(f"{key}.{field}: no column {column!r} in dataset {name} (columns: "
                            f"{', '.join(ds.column_names)})")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, not a re-encoding
    rows = ds.select_columns(list(dict.fromkeys([image_column, caption_column])))
    base = Path(name) if Path(name).is_dir() else None
    pairs = [(_image_file(row[image_column], image_dir, base, f"{key}.{image_column}"), row[caption_column])
             for row in rows]
    usable, _ = _without_bad_files(list(dict.fromkeys(p for p, _ in pairs)), [])
    keep = set(usable)
    items = [Item(path, caption.strip() if isinstance(caption, str) and caption.strip() else default_caption)
             for path, caption in pairs if path in keep]
    if not items:
        raise DataError(f"{key}.dataset {name}: none of its {len(pairs)} rows has a usable image "
                        "(see the warnings above)")
    return items


def _datasets(key: str):
    """The optional `datasets` package, imported only when a source needs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}.dataset needs the datasets package: pip install 'fluxtune[datasets]'") from None
    return datasets


def _load_dataset(datasets, name: str, split: str, key: str):
    """`save_to_disk` folders load as saved; a folder with a metadata.jsonl as an imagefolder (left
    to guess, `datasets` may read its .txt captions as a text dataset); anything else as
    `load_dataset` infers it (parquet, arrow, a hub id)."""
    local = Path(name)
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(name)
        elif (local / MANIFEST).is_file():
            ds = datasets.load_dataset("imagefolder", data_dir=name, split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # not found, offline, unknown split: datasets' message says which
        raise DataError(f"{key}.dataset {name}: cannot load it ({' '.join(str(e).split())})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{key}.split: no split {split!r} in {name} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _image_file(value, image_dir: Path, base: Path | None, key: str) -> Path:
    """The file of one dataset image: its bytes written to `image_dir`, or the file it names."""
    if isinstance(value, dict) and value.get("bytes"):
        return materialise_image(value["bytes"], image_dir)
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        raise DataError(f"{key}: expected an image or a file path, got {type(value).__name__}")
    return base / path if base and not Path(path).is_absolute() else Path(path)


def materialise_image(data: bytes, folder: Path) -> Path:
    """`data` as a file in `folder` named by its sha256 (the same bytes always give the same file),
    written atomically (a `.tmp` renamed into place) and only once."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = {"JPEG": ".jpg", "TIFF": ".tif"}.get(img.format, f".{(img.format or 'img').lower()}")
    except Exception:  # PIL raises many types for bytes that are no image; the header checks report the file
        suffix = ".img"
    path = Path(folder) / f"{hashlib.sha256(data).hexdigest()[:40]}{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


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
    if len(held) == len(set(items)):
        held.discard(ranked[-1])
    return [i for i in items if i not in held], [i for i in items if i in held]


def bucket_targets(items: list[Item], resolution: int, step: int, upscale: bool,
                   max_aspect: float) -> dict[Item, tuple[int, int]]:
    """Each image's training size: its aspect-ratio bucket (see fluxtune.data.buckets)."""
    sizes = bucket_sizes(resolution, step, max_aspect)
    targets = {}
    for item in items:
        wh = image_size(item.image)
        targets[item] = assign_bucket(*wh, sizes, step, upscale) if wh else (resolution, resolution)
    return targets
