"""Write a small captioned photo dataset from the CC0 / public-domain photos bundled with
scikit-image (no download), for the demo and the tests.

    python -m data_tools.demo_photos demo_out/photos [--trigger sks]
"""

from __future__ import annotations

import argparse
from pathlib import Path

# scikit-image loader name -> caption; all colour photos that ship inside the wheel.
PHOTOS = {
    "astronaut": "a portrait photo of an astronaut in a white spacesuit in front of a flag",
    "chelsea": "a photo of a tabby cat looking to the side",
    "coffee": "a photo of a cup of coffee on a saucer, seen from above",
    "rocket": "a photo of a rocket on a launch pad against a blue sky",
    "stereo_motorcycle": "a photo of a red motorcycle in a garage",
    "hubble_deep_field": "a photo of distant galaxies in the deep night sky",
}


def write_demo_photos(out_dir: str | Path, trigger: str = "sks", names: list[str] | None = None) -> list[Path]:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("the demo photos come from scikit-image: pip install scikit-image") from None
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(PHOTOS):
        image = out / f"{name}.jpg"
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        Image.fromarray(pixels).convert("RGB").save(image, quality=95)
        image.with_suffix(".txt").write_text(f"{PHOTOS[name]}, in the style of {trigger}\n", encoding="utf-8")
        written.append(image)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--trigger", default="sks", help="trigger word appended to every caption")
    args = parser.parse_args(argv)
    files = write_demo_photos(args.out_dir, args.trigger)
    print(f"wrote {len(files)} captioned photos to {args.out_dir}")


if __name__ == "__main__":
    main()
