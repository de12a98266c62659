"""Train a few LoRA steps on a quantized base, once per setting, on a CUDA GPU; print peak memory
and seconds per step.

    python scripts/gpu_quant_check.py                                   # tiny FLUX.1, none/nf4/int8/fp8
    python scripts/gpu_quant_check.py --kind flux2-klein --steps 20
    python scripts/gpu_quant_check.py --model black-forest-labs/FLUX.1-dev --resolution 1024 \\
        --settings nf4 fp8 --text-encoders nf4 --checkpointing --json quant.json

Each run is fluxtune's own recipe (`fluxtune.train.train`, bf16, the real quantized
`from_pretrained`) on a few generated images. Latents and captions are cached first, so the peak
memory printed is that of loading the transformer and training, not of the text encoder; s/step is
the median after the first step. Needs `pip install 'fluxtune[bnb,fp8]'`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxtune.data.cache import build_cache
from fluxtune.config import QUANTIZATIONS, load_config
from fluxtune.data.sources import scan_image_folder
from fluxtune.models.families import load_family
from fluxtune.models.tiny import KINDS, make_tiny
from fluxtune.train import train


def write_images(folder: Path, count: int, size: int) -> Path:
    """Smooth random colour fields with captions: real image statistics do not matter for timing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks number {i}", encoding="utf-8")
    return folder


def warm_cache(cfg) -> None:
    """Encode latents and captions (with the run's text-encoder setting) before the timed run."""
    m = cfg.model
    family = load_family(m.path, m.family, m.revision, text_encoder_out_layers=m.text_encoder_out_layers,
                         bypass_guidance=m.bypass_guidance, max_sequence_length=m.max_sequence_length,
                         dtype=torch.bfloat16, quantize_text_encoders=m.quantize_text_encoders)
    items = scan_image_folder(cfg.data.path)
    build_cache(family, items, Path(cfg.data.cache_dir), cfg.data.resolution, torch.device("cuda"))
    family.free_encoders()


def run(setting: str, args, model: str, images: Path, work: Path) -> dict:
    overrides = {
        "output_dir": work / f"run-{setting}", "model.path": model, "data.path": images,
        "data.resolution": args.resolution, "data.cache_dir": work / "cache", "train.max_steps": args.steps,
        "train.mixed_precision": "bf16", "train.gradient_checkpointing": str(args.checkpointing).lower(),
        "train.save_every": args.steps, "lora.rank": args.rank, "model.quantize": setting,
        "model.quantize_text_encoders": args.text_encoders or setting,
    }
    if args.text_layers:
        overrides["model.text_encoder_out_layers"] = f"[{args.text_layers}]"
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    warm_cache(cfg)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in rows if "step_s" in r][1:] or [rows[0]["step_s"]]
    del result
    gc.collect()
    torch.cuda.empty_cache()
    return {"setting": setting, "text_encoders": cfg.model.quantize_text_encoders, "peak_gib": round(peak, 3),
            "s_per_step": round(statistics.median(step_s), 4), "final_loss": rows[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder or hub id; default: a tiny --kind pipeline")
    parser.add_argument("--kind", default="flux1", choices=KINDS, help="tiny pipeline to build without --model")
    parser.add_argument("--settings", nargs="+", default=list(QUANTIZATIONS), choices=QUANTIZATIONS)
    parser.add_argument("--text-encoders", choices=QUANTIZATIONS, help="model.quantize_text_encoders; default: as --settings")
    parser.add_argument("--text-layers", help="model.text_encoder_out_layers for FLUX.2, e.g. 10,20,30")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 for tiny, 512 for --model")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_quant_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="fluxtune-quant-") as tmp:
        work = Path(tmp)
        model = args.model or str(make_tiny(args.kind, work / "tiny"))
        if args.model is None and args.kind.startswith("flux2"):
            args.text_layers = args.text_layers or "1,2,3"  # the tiny text encoders have 3 layers
        args.resolution = args.resolution or (512 if args.model else 64)
        images = write_images(work / "images", args.images, args.resolution)
        print(f"{torch.cuda.get_device_name()}: {model} at {args.resolution}px, {args.steps} steps, rank {args.rank}")
        results = []
        for setting in args.settings:
            results.append(run(setting, args, model, images, work))
            r = results[-1]
            print(f"quantize {r['setting']:>4} (text encoders {r['text_encoders']:>4}): peak {r['peak_gib']:8.3f} GiB  "
                  f"{r['s_per_step']:.4f} s/step  loss {r['final_loss']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
