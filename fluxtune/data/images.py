"""One image file and its caption file: what is wrong with them, found before training trips on
them, and how training reads the image.

Each check is a function returning `Finding`s (path, kind, severity, message). An "error" means the
file is left out of training; a "warning" means it is used as described (converted to RGB, rotated,
upscaled, trained with the default caption). Training (`fluxtune.data.sources`) and `fluxtune data validate`
(`data_tools.validate`) call the same functions, so the report says exactly what training will do.

    paths, findings = candidate_files("photos/", {".jpg", ".png"})
    for path in paths:
        findings += header_findings(path, resolution=512)   # cheap: reads the header only
        findings += decode_findings(path)                   # full decode
    findings += duplicate_findings(paths)
    img = open_rgb(paths[0])                               # what training encodes
    pixels = load_image(paths[0], resolution=512)          # (3, 512, 512) in [-1, 1], cropped to fit
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from fluxtune.data.buckets import cover_crop

ERROR, WARNING = "error", "warning"

MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb (64 MP, ~190 MB as RGB)
MAX_ASPECT = 4.0  # longer side / shorter side; a square centre crop of a 4:1 image keeps a quarter of it
# One FLUX latent token covers 16x16 pixels (8x VAE, 2x2 packing): below that there is nothing to learn from.
MIN_SIDE = 16
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class Finding:
    path: Path
    kind: str
    severity: str  # ERROR: the file is left out; WARNING: it is used, as the message says
    message: str


def candidate_files(folder: Path, extensions: set[str]) -> tuple[list[Path], list[Finding]]:
    """Entries of `folder` (not its subfolders) with one of `extensions` (lower case, with the dot),
    in name order. Symlinks to files are followed; a link that loops or points nowhere is reported,
    never followed forever."""
    paths, findings = [], []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in extensions):
        problem = _link_problem(path)
        if problem:
            findings.append(problem)
        elif path.is_file():
            paths.append(path)
    return paths, findings


def _link_problem(path: Path) -> Finding | None:
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Finding(path, "symlink-loop", ERROR, "symlink loop: following it never reaches a file")
        if path.is_symlink():
            return Finding(path, "broken-link", ERROR, f"symlink to {os.readlink(path)}, which does not exist")
        return Finding(path, "unreadable", ERROR, f"cannot read ({e.strerror})")
    return None


def header_findings(path: Path, resolution: int | None = None, max_pixels: int = MAX_PIXELS,
                    max_aspect: float = MAX_ASPECT) -> list[Finding]:
    """What the file's header alone tells: not an image, too many pixels, too small, extreme aspect
    ratio, a mode that is converted, an EXIF rotation. Decodes no pixels, so training can afford it
    on every file at start-up; and the pixel limit is checked before anything decodes a bomb."""
    if path.stat().st_size == 0:
        return [Finding(path, "empty-file", ERROR, "zero-byte file")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            with Image.open(path) as img:
                size, note, orientation = img.size, conversion_note(img), _orientation(img)
    except Image.DecompressionBombError as e:
        return [Finding(path, "too-many-pixels", ERROR, f"over Pillow's own limit: {e}")]
    except UnidentifiedImageError:
        return [Finding(path, "not-an-image", ERROR, "not an image file: no format Pillow knows")]
    except Exception as e:  # Pillow's plugins raise many types on a broken header or EXIF block
        return [Finding(path, "corrupt", ERROR, f"unreadable header: {e}")]
    findings = _size_findings(path, size, resolution, max_pixels, max_aspect)
    if note:
        findings.append(Finding(path, "converted", WARNING, note))
    if orientation not in (None, 1):
        findings.append(Finding(path, "rotated", WARNING, f"EXIF orientation {orientation} applied"))
    return findings


def _size_findings(path, size, resolution, max_pixels, max_aspect) -> list[Finding]:
    w, h = size
    if w * h > max_pixels:
        return [Finding(path, "too-many-pixels", ERROR,
                        f"{w}x{h} is {w * h / 1e6:.0f} MP, above the {max_pixels / 1e6:g} MP limit; downscale it")]
    findings = []
    short, long = min(w, h), max(w, h)
    if long / short > max_aspect:
        findings.append(Finding(path, "extreme-aspect", ERROR,
                                f"{w}x{h}: aspect ratio {long / short:.0f}:1 is above {max_aspect:g}:1"))
    elif short < MIN_SIDE:
        findings.append(Finding(path, "too-small", ERROR, f"{w}x{h}: under {MIN_SIDE} px on a side"))
    elif resolution and short < resolution:
        findings.append(Finding(path, "upscaled", WARNING, f"{w}x{h}: shorter side under {resolution} px, upscaled"))
    return findings


def _orientation(img: Image.Image) -> int | None:
    if img.format == "PNG" and "exif" not in img.info:
        return None  # PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixels
    return img.getexif().get(ExifTags.Base.Orientation)


def decode_findings(path: Path) -> list[Finding]:
    """Decode every pixel: a truncated or corrupt file fails here, not halfway through training."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # Pillow raises many types for broken data; any of them means unusable
        return [Finding(path, "corrupt", ERROR, f"cannot decode: {e}")]
    return []


def duplicate_findings(paths: list[Path]) -> list[Finding]:
    """Later exact copies (same bytes) of an earlier file. Files are grouped by size first, so only
    files that share a size are read and hashed: usually none."""
    by_size = defaultdict(list)
    for path in paths:
        by_size[path.stat().st_size].append(path)
    findings, first = [], {}
    for path in (p for group in by_size.values() if len(group) > 1 for p in group):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in first:
            findings.append(Finding(path, "duplicate", ERROR, f"same bytes as {first[digest].name}"))
        else:
            first[digest] = path
    return findings


def conversion_note(img: Image.Image) -> str | None:
    """How `to_rgb` changes an image of this mode, or None when it is RGB already."""
    if img.mode in _SIXTEEN_BIT:
        return f"{img.mode} (16/32-bit) scaled to 8-bit RGB"
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return f"{img.mode} with transparency composited on white"
    if img.mode != "RGB":
        return f"{img.mode} converted to RGB"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own convert("RGB") clips 16-bit values (a mostly white image) and drops
    alpha (transparent areas turn to whatever colour they hide, often black): do both properly."""
    if img.mode in _SIXTEEN_BIT:
        scaled = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Decode fully, apply the EXIF orientation and convert to RGB: the picture training sees."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def read_caption(image: Path, caption_extension: str = ".txt") -> tuple[str | None, list[Finding]]:
    """The caption of `image` (None: use the default caption) and what is wrong with it. A caption
    that is not UTF-8 is an error for the caption file only: the image trains with the default."""
    file = image.with_suffix(caption_extension)
    if not file.is_file():
        return None, [Finding(image, "no-caption", WARNING, f"no {file.name}; the default caption is used")]
    try:
        text = file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        return None, [Finding(file, "caption-not-utf8", ERROR,
                              f"not valid UTF-8 at byte {e.start}; the image trains with the default caption")]
    if not text:
        return None, [Finding(file, "empty-caption", WARNING, "empty caption; the default caption is used")]
    return text, []


def decode_legacy_caption(data: bytes) -> str:
    """Best reading of a caption that is not UTF-8: Windows-1252 (what editors on Windows write; it
    has the curly quotes), else Latin-1, which decodes any bytes."""
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def caption_length_findings(file: Path, caption: str, count_tokens: Callable[[str], int], limit: int,
                            encoder: str) -> list[Finding]:
    """A caption the text encoder would cut off: the words past the limit never reach the model."""
    n = count_tokens(caption)
    if n <= limit:
        return []
    return [Finding(file, "caption-too-long", WARNING,
                    f"{n} tokens, over the {limit} the {encoder} sees; the rest is cut off")]


# How each pipeline turns a caption into text-encoder tokens (diffusers' `_get_*_prompt_embeds`), so a
# caption is counted with the chat-template tokens that share its budget. verbose=False: the count is
# the point, transformers' "longer than the maximum" warning is not.
def _t5_count(tok, caption: str) -> int:
    return len(tok(caption, verbose=False).input_ids)


def _qwen_count(tok, caption: str) -> int:
    text = tok.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    return len(tok(text, verbose=False).input_ids)


def _mistral_count(tok, caption: str) -> int:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    text = tok.apply_chat_template(format_input([caption])[0], tokenize=False, add_generation_prompt=False)
    return len(tok(text, add_special_tokens=False, verbose=False).input_ids)


# pipeline class -> (tokenizer subfolder, encoder name, counter)
PROMPT_TOKENIZERS = {
    "FluxPipeline": ("tokenizer_2", "T5 text encoder", _t5_count),
    "Flux2Pipeline": ("tokenizer", "Mistral3 text encoder", _mistral_count),
    "Flux2KleinPipeline": ("tokenizer", "Qwen3 text encoder", _qwen_count),
}


def caption_token_counter(model: str) -> tuple[Callable[[str], int], int, str]:
    """(count tokens of a caption, the family's max_sequence_length, encoder name) for a pipeline
    folder or hub id. Loads only the tokenizer, no weights."""
    from transformers import AutoTokenizer

    from fluxtune.models.families import load_family

    family = load_family(model)
    subfolder, encoder, count = PROMPT_TOKENIZERS[family.pipeline_cls.__name__]
    tok = AutoTokenizer.from_pretrained(model, subfolder=subfolder)
    return (lambda caption: count(tok, caption)), family.max_sequence_length, encoder


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
