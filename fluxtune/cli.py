"""The `fluxtune` command.

    fluxtune train CONFIG [key.path=value ...]
    fluxtune validate CONFIG [key.path=value ...]
    fluxtune plan CONFIG [key.path=value ...] [--gpu-memory 24GB]
    fluxtune generate --model PATH [--lora PATH[:SCALE] ...] --prompt TEXT [--prompts-file FILE]
                      [--num-images K | --seeds 1,5,9] [--batch-size B] [--out-dir DIR | --out FILE]
    fluxtune make-tiny {flux1,flux1-schnell,flux2,flux2-klein} DIR
    fluxtune export RUN_DIR --format {diffusers,kohya,comfyui} --out DIR [--trigger WORD] [--push-to-hub REPO]
    fluxtune lora {info,check,convert,resize,combine,merge} ...
    fluxtune data caption DIR --model ID_OR_PATH [--trigger WORD] [--batch-size B] [--overwrite] ...
    fluxtune data validate DIR [--resolution 512] [--model PATH] [--report FILE.json] [--fix DIR2]
                               [--max-pixels N] [--max-aspect R]
    fluxtune data prepare DIR [--out DIR/metadata.jsonl] [--resolution 512] [--step 16]
    fluxtune data bucket DIR [--resolution 512] [--step 16] [--upscale] [--batch-size B] [--processes N]

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
    from fluxtune.training.sampling import gather_prompts, generate, seed_list

    result = generate(
        model=args.model, loras=args.lora, scale=args.scale,
        prompts=gather_prompts(args.prompt, args.prompts_file), seeds=seed_list(args.seed, args.num_images, args.seeds),
        negative_prompt=args.negative_prompt, batch_size=args.batch_size, out_dir=args.out_dir, out=args.out,
        steps=args.steps, width=args.width, height=args.height, guidance=args.guidance, family=args.family,
    )
    if result.contact_sheet is None:
        print(f"wrote {result.images[0]}")
    else:
        print(f"wrote {len(result.images)} images to {result.contact_sheet.parent}, contact sheet {result.contact_sheet}")
    return 0


def _plan(args) -> int:
    from fluxtune.plan import plan

    cfg = load_config(args.config, args.overrides)
    print(plan(cfg, gpus=args.gpus).table(args.gpu_memory))
    return 0


def _memory_size(text: str) -> int:
    from fluxtune.plan import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _make_tiny(args) -> int:
    from fluxtune.models.tiny import KINDS, make_tiny

    if args.kind not in KINDS:
        print(f"fluxtune: unknown tiny model kind {args.kind!r}; choose one of {', '.join(KINDS)}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote tiny {args.kind} pipeline to {make_tiny(args.kind, args.dir, seed=args.seed)}")
    return 0


def _export(args) -> int:
    from fluxtune.lora.export import export, push_to_hub

    folder = export(args.source, args.out, args.format, title=args.title, trigger=args.trigger, base_model=args.base_model,
                    ema=args.ema, arch=args.arch, license=args.license)
    print(f"wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(folder, args.push_to_hub, private=args.private)}")
    return 0


def _lora(args) -> int:
    from fluxtune.lora import tools as lora_tools
    from fluxtune.lora.formats import parse_weighted, read_lora, write_lora

    if args.lora_command == "info":
        print(lora_tools.info(args.file))
    elif args.lora_command == "check":
        report = lora_tools.check(args.file, args.model, args.family)
        print(report.text())
        return 0 if report.ok else 1
    elif args.lora_command == "convert":
        adapter = read_lora(args.file, arch=args.arch)
        print(f"wrote {write_lora(adapter, args.out, args.to)} ({args.to} layout, {len(adapter.modules)} layers)")
    elif args.lora_command == "resize":
        adapter = read_lora(args.file, arch=args.arch)
        small, report = lora_tools.resize(adapter, args.rank)
        print(report.table() if args.verbose else report.table().splitlines()[-1])
        print(f"wrote {write_lora(small, args.out, args.format or adapter.source_format)}")
    elif args.lora_command == "combine":
        weighted = [(read_lora(path, arch=args.arch), w) for path, w in map(parse_weighted, args.files)]
        combined = lora_tools.combine(weighted)
        if args.rank:
            combined, report = lora_tools.resize(combined, args.rank)
            print(report.table().splitlines()[-1])
        print(f"wrote {write_lora(combined, args.out, args.format)} (rank {', '.join(map(str, sorted(combined.ranks())))})")
    elif args.lora_command == "merge":
        out = lora_tools.merge(args.file, args.model, args.out, scale=args.scale, family=args.family)
        print(f"wrote merged transformer to {out}; load it with "
              f"<Pipeline>.from_pretrained(base, transformer=<Transformer class>.from_pretrained({str(out)!r}))")
    return 0


def _data_caption(args) -> int:
    from accelerate import PartialState

    from data_tools.caption import caption_folder

    summary = caption_folder(args.dir, args.model, batch_size=args.batch_size, trigger=args.trigger,
                             max_new_tokens=args.max_length, extension=args.extension, overwrite=args.overwrite,
                             task=args.task, instruction=args.instruction)
    if PartialState().is_main_process:  # every process holds the merged counts; one prints them
        print(summary.line())
    return 0


def _data_validate(args) -> int:
    from data_tools.validate import run

    return run(args.dir, resolution=args.resolution, model=args.model, report_file=args.report, fix=args.fix,
               max_pixels=args.max_pixels, max_aspect=args.max_aspect)


def _data_prepare(args) -> int:
    from data_tools.prepare import write_manifest

    out = write_manifest(args.dir, args.out, resolution=args.resolution, step=args.step)
    rows = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"wrote {out}: {rows} images (file_name, text, width, height, bucket)")
    return 0


def _data_bucket(args) -> int:
    from data_tools.prepare import bucket_report

    print(bucket_report(args.dir, resolution=args.resolution, step=args.step, upscale=args.upscale,
                        batch_size=args.batch_size, processes=args.processes))
    return 0


def _add_data_parsers(sub) -> None:
    """`fluxtune data ...`: dataset preparation. Each command's code lives in `data_tools` and is
    imported only when that command runs."""
    from fluxtune.data.images import MAX_ASPECT, MAX_PIXELS

    data = sub.add_parser("data", help="prepare a dataset: caption, validate, write a manifest, show buckets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("caption", help="write a caption file beside each image with a vision-language model")
    p.add_argument("dir", help="folder of images")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH",
                   help="folder or hub id of a Florence-2, BLIP or chat VLM (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) "
                        "checkpoint; the kind is read from its config.json")
    p.add_argument("--trigger", metavar="WORD", help="start every caption with 'WORD, ' (and fill {trigger} in the instruction)")
    p.add_argument("--instruction",
                   help="chat VLMs: what to ask, or a preset: detailed (default), subject or style (these two "
                        "name --trigger and leave it undescribed); {trigger} in the text becomes --trigger")
    p.add_argument("--task", help="Florence-2: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION> (default)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="most new tokens per caption (default 256)")
    p.add_argument("--extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    p.set_defaults(fn=_data_caption)

    p = dsub.add_parser("validate", help="check every image and caption, report problems, optionally write repaired copies")
    p.add_argument("dir", help="folder of images with .txt captions (never modified)")
    p.add_argument("--resolution", type=int, default=512, help="training size; smaller images are reported as upscaled")
    p.add_argument("--model", help="pipeline folder or hub id: count caption tokens with its tokenizer (no weights load)")
    p.add_argument("--report", metavar="FILE.json", help="write every finding as JSON (default: none)")
    p.add_argument("--fix", metavar="DIR2",
                   help="new or empty folder: write the usable images there, repaired (RGB, upright, UTF-8 captions)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"larger images are skipped (default {MAX_PIXELS})")
    p.add_argument("--max-aspect", type=float, default=MAX_ASPECT,
                   help=f"longer / shorter side above this is skipped (default {MAX_ASPECT:g})")
    p.set_defaults(fn=_data_validate)

    p = dsub.add_parser("prepare", help="write metadata.jsonl (the datasets imagefolder format) from .txt captions")
    p.add_argument("dir", help="folder of images with .txt captions")
    p.add_argument("--out", metavar="FILE", help="where to write it (default DIR/metadata.jsonl, where datasets looks)")
    _bucket_arguments(p)
    p.set_defaults(fn=_data_prepare)

    p = dsub.add_parser("bucket", help="images per aspect-ratio bucket, and the batches an epoch makes of them")
    p.add_argument("dir", help="folder of images (its metadata.jsonl when it has one)")
    _bucket_arguments(p)
    p.add_argument("--upscale", action="store_true", help="as data.upscale: let small images fill their bucket")
    p.add_argument("--batch-size", type=int, default=1, help="as train.batch_size (default 1)")
    p.add_argument("--processes", type=int, default=1, help="training processes (GPUs) (default 1)")
    p.set_defaults(fn=_data_bucket)


def _bucket_arguments(p) -> None:
    p.add_argument("--resolution", type=int, default=512, help="as data.resolution (default 512)")
    p.add_argument("--step", type=int, default=16, choices=(16, 32, 64), help="as data.bucket_step (default 16)")


def _add_export_parsers(sub) -> None:
    from fluxtune.lora.formats import ARCHS, FORMATS

    p = sub.add_parser("export", help="package a run's LoRA: chosen layout, metadata, model card, samples")
    p.add_argument("source", help="run output folder, LoRA folder or .safetensors file")
    p.add_argument("--out", required=True, help="folder to write (replaced whole)")
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.add_argument("--title")
    p.add_argument("--trigger", action="append", help="trigger word or phrase (repeatable)")
    p.add_argument("--base-model", help="hub id of the base model, for the model card")
    p.add_argument("--license", help="license id for the model card, e.g. apache-2.0 or other")
    p.add_argument("--ema", action="store_true", help="export the run's EMA LoRA")
    p.add_argument("--arch", choices=ARCHS, help="only when the file cannot tell FLUX.1 from FLUX.2")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(fn=_export)

    lora = sub.add_parser("lora", help="inspect, check, convert, resize, combine or merge LoRA files")
    lsub = lora.add_subparsers(dest="lora_command", required=True)
    p = lsub.add_parser("info", help="layout, architecture, ranks and header of any LoRA file")
    p.add_argument("file")
    p = lsub.add_parser("check", help="list every key that would not load into a model (through diffusers)")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--family", choices=["auto", "flux1", "flux2"], default="auto")
    p = lsub.add_parser("convert", help="rewrite a LoRA in another layout, exactly")
    p.add_argument("file")
    p.add_argument("--to", choices=FORMATS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=ARCHS)
    p = lsub.add_parser("resize", help="lower the rank by SVD and report the energy kept per layer")
    p.add_argument("file")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=FORMATS, help="default: the input's layout")
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer")
    p = lsub.add_parser("combine", help="sum weighted LoRAs into one (exact; --rank to shrink it)")
    p.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int)
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.add_argument("--arch", choices=ARCHS)
    p = lsub.add_parser("merge", help="merge a LoRA into the base transformer and save it")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--out", required=True, help="folder for the merged transformer")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--family", choices=["auto", "flux1", "flux2"], default="auto")
    lora.set_defaults(fn=_lora)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxtune", description="LoRA fine-tuning for FLUX models")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, text in [("train", _train, "train a LoRA"), ("validate", _validate, "check a config and print it resolved")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML)")
        p.set_defaults(fn=fn)

    p = sub.add_parser("generate", help="render prompts x seeds with a model and LoRA(s)")
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA folder, .safetensors file or hub id, with its own strength if given (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="strength of LoRAs given without one (default 1.0)")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", metavar="FILE", help="UTF-8, one prompt per line; lines starting with # are skipped")
    p.add_argument("--negative-prompt", help="FLUX.2-klein base only (it runs CFG); default: the empty prompt")
    p.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt, seeds SEED, SEED+1, ... (default 1)")
    p.add_argument("--seeds", help="the seeds themselves, e.g. 1,5,9 (instead of --seed/--num-images)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (same images, faster on a GPU)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-dir", default="generated",
                       help="one PNG per prompt and seed, plus contact_sheet.png (default generated/)")
    where.add_argument("--out", metavar="FILE", help="write the one image of one prompt and one seed here instead")
    p.add_argument("--steps", type=int, default=None,
                   help="default: the model's own (schnell and klein distilled 4, FLUX.1-dev 28, klein base and FLUX.2-dev 50)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    p.add_argument("--family", choices=["auto", "flux1", "flux2"], default="auto")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("plan", help="predict peak GPU memory and host RAM of a config, and what would make it fit")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML)")
    p.add_argument("--gpu-memory", type=_memory_size, metavar="SIZE",
                   help="the GPU's memory, e.g. 24GB (GB = GiB); default: verdicts for 16, 24, 48 and 80 GB")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="processes the run will be launched with; with train.sharding=fsdp each GPU holds 1/N "
                        "of the base (default 1)")
    p.set_defaults(fn=_plan)

    p = sub.add_parser("make-tiny", help="write a tiny random pipeline for tests and demos")
    p.add_argument("kind", help="flux1, flux1-schnell, flux2 or flux2-klein")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_tiny)

    _add_export_parsers(sub)
    _add_data_parsers(sub)
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
