"""Check every image and caption of a training folder, and optionally write repaired copies.

    fluxtune data validate photos/ [--resolution 512] [--model PATH] [--report report.json] [--fix fixed/]
                                   [--max-pixels 64000000] [--max-aspect 4]

Prints a table of what was found (per kind: severity, count, examples) and how many images are
usable. Errors are files training skips; warnings are files training uses as described. The checks
are `fluxtune.data.images`, the ones training runs, so the table says what training will do.
Nothing is written unless asked, and never into the checked folder: `--report FILE.json` writes
every finding, `--fix DIR2` writes the usable images repaired into a new folder.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fluxtune.data.sources import IMAGE_EXTENSIONS
from fluxtune.errors import DataError
from fluxtune.data.images import (
    ERROR,
    MAX_ASPECT,
    MAX_PIXELS,
    Finding,
    caption_length_findings,
    caption_token_counter,
    candidate_files,
    decode_findings,
    decode_legacy_caption,
    duplicate_findings,
    header_findings,
    open_rgb,
    read_caption,
)

EXAMPLES = 3  # file names shown per kind in the summary table
REWRITTEN = {"converted", "rotated"}  # kinds whose --fix copy is re-encoded rather than copied byte for byte


@dataclass
class Report:
    folder: Path
    settings: dict
    images: list[Path]  # every entry with an image extension, broken links included
    findings: list[Finding]
    token_check: str  # what the caption length check did, in words

    @property
    def usable(self) -> list[Path]:
        """Images without an error; an error on a caption file never removes its image."""
        return _without_errors(self.images, self.findings)

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder), "settings": self.settings, "token_check": self.token_check,
            "images": len(self.images), "usable": len(self.usable), "usable_files": [p.name for p in self.usable],
            "counts": dict(Counter(f.kind for f in self.findings)),
            "findings": [{"file": f.path.name, "kind": f.kind, "severity": f.severity, "message": f.message}
                         for f in self.findings],
        }

    def summary(self) -> str:
        s = self.settings
        lines = [f"checked {len(self.images)} images in {self.folder} (resolution {s['resolution']}, "
                 f"at most {s['max_pixels'] / 1e6:g} MP, aspect up to {s['max_aspect']:g}:1)", ""]
        by_kind: dict[tuple[str, str], list[Finding]] = {}
        for f in sorted(self.findings, key=lambda f: (f.severity, f.kind, f.path)):
            by_kind.setdefault((f.severity, f.kind), []).append(f)
        if by_kind:
            width = max(len(kind) for _, kind in by_kind)
            lines.append(f"{'kind':<{width}}  severity  count  examples")
            for (severity, kind), found in by_kind.items():
                lines.append(f"{kind:<{width}}  {severity:<8}  {len(found):>5}  {_examples(found)}")
        else:
            lines.append("no problems found")
        warnings = sum(f.severity != ERROR for f in self.findings)
        lines += ["", f"caption length: {self.token_check}",
                  f"usable: {len(self.usable)} of {len(self.images)} images "
                  f"({len(self.images) - len(self.usable)} skipped, {warnings} warnings)"]
        return "\n".join(lines)


def _examples(found: list[Finding]) -> str:
    """The first file with its message, then a few more names: enough to find the rest in the report."""
    text = f"{found[0].path.name} ({found[0].message})"
    names = [f.path.name for f in found[1:EXAMPLES]]
    more = len(found) - EXAMPLES
    return ", ".join([text, *names] + ([f"+{more} more"] if more > 0 else []))


def validate_folder(folder: str | Path, resolution: int = 512, model: str | None = None,
                    max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Report:
    """Run every check on every image and caption of `folder`; reads files, writes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; point it at a folder of images with .txt captions")
    tokens = caption_token_counter(model) if model else None  # first: a bad --model fails before the scan
    paths, findings = candidate_files(folder, IMAGE_EXTENSIONS)
    images = sorted(paths + [f.path for f in findings])
    for path in paths:
        found = header_findings(path, resolution, max_pixels, max_aspect)
        if not any(f.severity == ERROR for f in found):
            found += decode_findings(path)
        findings += found
    findings += duplicate_findings(_without_errors(paths, findings))
    caption_findings, token_check = _check_captions(_without_errors(images, findings), tokens, model)
    settings = {"resolution": resolution, "max_pixels": max_pixels, "max_aspect": max_aspect, "model": model}
    return Report(folder, settings, images, findings + caption_findings, token_check)


def _without_errors(paths: list[Path], findings: list[Finding]) -> list[Path]:
    bad = {f.path for f in findings if f.severity == ERROR}
    return [p for p in paths if p not in bad]


def _check_captions(images: list[Path], tokens, model: str | None) -> tuple[list[Finding], str]:
    """Findings on the captions of `images` and, in words, what the token-length check did: it
    needs the model's tokenizer (`tokens`: what `caption_token_counter` returns), so it runs only
    with a model."""
    findings, captions = [], {}
    for image in images:
        captions[image], found = read_caption(image)
        findings += found
    if tokens is None:
        return findings, "not checked (pass --model PATH to count tokens with the model's tokenizer)"
    count, limit, encoder = tokens
    for image, caption in captions.items():
        if caption is not None:
            findings += caption_length_findings(image.with_suffix(".txt"), caption, count, limit, encoder)
    return findings, f"checked with the {encoder}'s tokenizer, limit {limit} tokens ({model})"


def write_fixed(report: Report, out: str | Path) -> str:
    """Copy the usable images and their captions into `out`, a new or empty folder, repaired:
    converted or EXIF-rotated images are written as upright 8-bit RGB (same name and format), the
    others are copied byte for byte (links resolved); captions are written as UTF-8, a caption that
    was not UTF-8 decoded as Windows-1252/Latin-1 (check those); a missing or empty caption stays
    missing, so training still gives it data.default_caption. Skipped files are left out. Returns
    what was written, in words."""
    out = Path(out)
    if out.resolve() == report.folder.resolve():
        raise DataError(f"--fix {out}: that is the folder being checked; originals are never modified, "
                        "choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--fix {out}: folder is not empty; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rewrite = {f.path for f in report.findings if f.kind in REWRITTEN} & set(report.usable)
    reencoded = {f.path for f in report.findings if f.kind == "caption-not-utf8"}
    for image in report.usable:
        if image in rewrite:
            _save_like(open_rgb(image), out / image.name)
        else:
            shutil.copyfile(image, out / image.name)
        caption = _caption_text(image.with_suffix(".txt"))
        if caption:
            (out / image.with_suffix(".txt").name).write_text(caption + "\n", encoding="utf-8")
    return (f"wrote {len(report.usable)} images to {out} (converted or rotated: {len(rewrite)}, "
            f"captions re-encoded to UTF-8: {len(reencoded)})")


def _save_like(img, dest: Path) -> None:
    lossy = dest.suffix.lower() in {".jpg", ".jpeg", ".webp"}
    img.save(dest, **({"quality": 95} if lossy else {}))


def _caption_text(file: Path) -> str | None:
    if not file.is_file():
        return None
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = decode_legacy_caption(data)
    return text.strip() or None


def run(folder: str, resolution: int = 512, model: str | None = None, report_file: str | None = None,
        fix: str | None = None, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> int:
    """`fluxtune data validate`: print the summary, write what was asked; 0 when usable images
    remain, a DataError (exit status 1) when none do."""
    report = validate_folder(folder, resolution, model, max_pixels, max_aspect)
    print(report.summary())
    if report_file:
        Path(report_file).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"report: {report_file}")
    if not report.images:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not report.usable:
        raise DataError(f"{folder}: none of the {len(report.images)} images is usable; "
                        "fix or replace the files listed above")
    if fix:
        print(write_fixed(report, fix))
    return 0
