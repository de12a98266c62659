"""A folder of broken, odd and good training images, for tests of data checks and of training on
bad input:

    expected = write_bad_corpus(folder)   # {file name: finding kind it must get}

Three real photos and a few small synthetic ones are usable (some with warnings); the rest must be
skipped. Every file is small: the "bombs" are PNG headers that only claim huge sizes.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.demo_photos import write_demo_photos

GOOD_PHOTOS = ["astronaut", "chelsea", "coffee"]
LONG_CAPTION_WORDS = 3000  # over any FLUX text encoder's limit (512 tokens at most) and the tiny ones'


def synthetic(seed: int, size=(96, 64)) -> Image.Image:
    """A distinct RGB picture per seed (so no two are duplicates): a gradient plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, size=3)
    pixels = ramp + rng.normal(0, 20, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds almost no data: tests the pixel limit with
    no big file (the header is checked before anything decodes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def write_bad_corpus(folder: str | Path) -> dict[str, str]:
    """Write the corpus into `folder`; returns {file name: the finding kind it must get}. Caption
    findings name the .txt file; "caption-too-long" needs a tokenizer to be found."""
    folder = Path(folder)
    write_demo_photos(folder, trigger="sks", names=GOOD_PHOTOS)
    expected = {}

    def captioned(name: str, img: Image.Image, kind: str | None = None, **save) -> Path:
        path = folder / name
        img.save(path, **save)
        path.with_suffix(".txt").write_text(f"a synthetic test picture {name}, in the style of sks\n", encoding="utf-8")
        if kind:
            expected[name] = kind
        return path

    # Broken files: skipped.
    photo = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "astronaut_copy.jpg").write_bytes((folder / "astronaut.jpg").read_bytes())
    png_header_only(folder / "bomb.png", 100_000, 100_000)  # over Pillow's own limit: it raises
    png_header_only(folder / "big.png", 9_000, 9_000)  # 81 MP: under Pillow's limit, over ours (64 MP)
    captioned("dot.png", Image.new("RGB", (1, 1), "red"))
    captioned("strip.png", Image.new("RGB", (20_000, 10), "blue"))
    expected.update({"truncated.jpg": "corrupt", "empty.jpg": "empty-file", "notes.jpg": "not-an-image",
                     "astronaut_copy.jpg": "duplicate", "bomb.png": "too-many-pixels",
                     "big.png": "too-many-pixels", "dot.png": "too-small", "strip.png": "extreme-aspect"})

    # Links: two that point at each other, one at nothing, and a folder link to itself (must not loop).
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("missing.png", folder / "dangling.png")
    os.symlink(".", folder / "self", target_is_directory=True)
    expected.update({"loop_a.jpg": "symlink-loop", "loop_b.jpg": "symlink-loop", "dangling.png": "broken-link"})

    # Odd but usable: converted to RGB, rotated, upscaled.
    captioned("cmyk.jpg", synthetic(1).convert("CMYK"), "converted", quality=95)
    sixteen = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    captioned("gray16.png", Image.fromarray(sixteen), "converted")
    captioned("gray.png", synthetic(2).convert("L"), "converted")
    rgba, alpha = synthetic(3).convert("RGBA"), np.zeros((64, 96), np.uint8)
    alpha[:, :48] = 255  # right half fully transparent: training must see white there
    rgba.putalpha(Image.fromarray(alpha))
    captioned("rgba.png", rgba, "converted")
    palette = synthetic(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    captioned("palette.png", palette, "converted", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    captioned("rotated.jpg", synthetic(5), "rotated", exif=exif, quality=95)
    captioned("small.jpg", synthetic(6, size=(40, 32)), "upscaled", quality=95)

    # Captions: the images are fine, the captions are not.
    captioned("latin1.jpg", synthetic(7), quality=95)
    (folder / "latin1.txt").write_bytes("a café crème in the style of sks\n".encode("latin-1"))
    captioned("blank.jpg", synthetic(8), quality=95)
    (folder / "blank.txt").write_text("  \n", encoding="utf-8")
    captioned("wordy.jpg", synthetic(9), quality=95)
    (folder / "wordy.txt").write_text(" ".join(["photograph"] * LONG_CAPTION_WORDS), encoding="utf-8")
    synthetic(10).save(folder / "uncaptioned.jpg", quality=95)
    expected.update({"latin1.txt": "caption-not-utf8", "blank.txt": "empty-caption", "wordy.txt": "caption-too-long",
                     "uncaptioned.jpg": "no-caption"})
    return expected
