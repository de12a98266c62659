"""The `fluxtune` command.

    fluxtune train CONFIG [key.path=value ...]
    fluxtune validate CONFIG [key.path=value ...]
    fluxtune generate --model PATH [--lora DIR] --prompt TEXT [--out FILE]
    fluxtune make-tiny {flux1,flux1-schnell,flux2,flux2-klein} DIR

Exit status: 0 done, 1 a bad model, data or LoRA, or a diverged run (the message says which),
2 a bad config, 75 stopped by SIGTERM/SIGINT after writing a checkpoint (resume with
train.resume=latest).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fluxtune.config import ConfigError, load_config
from fluxtune.errors import EXIT_PREEMPTED, Preempted, UserError

EXIT_CONFIG = 2


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from fluxtune.train import train

    result = train(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report is enough
        return 0
    out = result.output_dir
    print(f"done: {result.steps} steps in {result.seconds:.1f}s, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss['eval/loss']:.4f}" if result.eval_loss else ""))
    print(f"LoRA:    {result.lora_path}")
    if (out / "lora_ema").is_dir():
        print(f"EMA:     {out / 'lora_ema'}")
    if (out / "samples").is_dir():
        print(f"samples: {out / 'samples'}")
    print(f"logs:    {out / 'metrics.jsonl'}" + (f" (W&B run {result.run_id})" if result.run_id else ""))
    return 0


def _validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def _generate(args) -> int:
    from fluxtune.sampling import generate

    path = generate(
        model=args.model, loras=args.lora, scale=args.scale, prompt=args.prompt, out=args.out,
        seed=args.seed, steps=args.steps, width=args.width, height=args.height, guidance=args.guidance,
        family=args.family,
    )
    print(f"wrote {path}")
    return 0


def _make_tiny(args) -> int:
    from fluxtune.tiny import KINDS, make_tiny

    if args.kind not in KINDS:
        print(f"fluxtune: unknown tiny model kind {args.kind!r}; choose one of {', '.join(KINDS)}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote tiny {args.kind} pipeline to {make_tiny(args.kind, args.dir, seed=args.seed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxtune", description="LoRA fine-tuning for FLUX models")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, text in [("train", _train, "train a LoRA"), ("validate", _validate, "check a config and print it resolved")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML)")
        p.set_defaults(fn=fn)

    p = sub.add_parser("generate", help="write an image with a model and LoRA(s)")
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--lora", action="append", default=[], help="LoRA folder or .safetensors file (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="sample.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's own")
    p.add_argument("--family", choices=["auto", "flux1", "flux2"], default="auto")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("make-tiny", help="write a tiny random pipeline for tests and demos")
    p.add_argument("kind", help="flux1, flux1-schnell, flux2 or flux2-klein")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="fluxtune: %(message)s")
    logging.getLogger("fluxtune").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"fluxtune: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Preempted as e:
        print(f"fluxtune: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as e:
        print(f"fluxtune: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
