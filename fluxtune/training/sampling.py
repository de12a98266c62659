"""Images from a FLUX pipeline with LoRAs: `fluxtune generate`, and samples during training.

    fluxtune generate --model ./tiny --lora runs/demo/lora --prompt "a photo of sks" --out cat.png
    fluxtune generate --model ./tiny --lora style:0.8 --lora subject --prompts-file prompts.txt \
        --num-images 4 --batch-size 4 --out-dir generated/    # one PNG per (prompt, seed) + contact_sheet.png
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from fluxtune.errors import LoraError, UserError
from fluxtune.models.families import load_family
from fluxtune.models.families.common import SamplingDefaults
from fluxtune.lora.adapter import describe_base, resolve_lora

log = logging.getLogger("fluxtune")

def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _header(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise LoraError(f"LoRA {file} is not a readable .safetensors file ({' '.join(str(e).split())})") from None


def _base_text(fields: dict[str, str]) -> str:
    if "fluxtune.base_class" not in fields and "fluxtune.base_shape" not in fields:
        return "a base it does not record (no fluxtune.base_* fields in its header)"
    text = " ".join(fields[k] for k in ("fluxtune.base_class", "fluxtune.base_shape") if k in fields)
    return text + (f" ({fields['fluxtune.base_model']})" if "fluxtune.base_model" in fields else "")


def _mismatch(lora, header: dict[str, str], here: dict[str, str], detail: str = "") -> LoraError:
    return LoraError(
        f"LoRA {lora} does not fit this model: it was trained for {_base_text(header)}, and is being loaded "
        f"into {_base_text(here)}{detail}. Load it with the model it was trained on."
    )


class _DropFailedLoadLog(logging.Filter):
    """diffusers logs the whole load_state_dict error (a line per tensor) before raising it; the
    error we raise in its place says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()


def load_pipeline_with_loras(family, loras: list[str], scale: float | Sequence[float], dtype: torch.dtype):
    """The family's pipeline with each LoRA loaded as its own adapter. `scale` is one strength for
    all of them or one per LoRA, in order; every file is checked before any model is loaded."""
    scales = [scale] * len(loras) if isinstance(scale, (int, float)) else list(scale)
    if len(scales) != len(loras):
        raise ValueError(f"{len(scales)} LoRA strengths for {len(loras)} LoRAs")
    files = [resolve_lora(lora) for lora in loras]
    headers = [_header(f) if isinstance(f, Path) else {} for f in files]
    pipe = family.load_pipeline(dtype)
    # Taken before loading: a failed FLUX.1 load can leave layers widened to the LoRA's shapes.
    here = describe_base(pipe.transformer, family.path)
    names = []
    for i, (lora, file, header) in enumerate(zip(loras, files, headers)):
        trained_for = header.get("fluxtune.base_class")
        if trained_for and trained_for != here["fluxtune.base_class"]:  # another architecture altogether
            raise _mismatch(lora, header, here)
        name = f"lora{i}"
        source, kwargs = (str(file.parent), {"weight_name": file.name}) if isinstance(file, Path) else (file, {})
        quiet, peft_log = _DropFailedLoadLog(), logging.getLogger("diffusers.loaders.peft")
        peft_log.addFilter(quiet)
        try:
            pipe.load_lora_weights(source, adapter_name=name, use_safetensors=True, **kwargs)
        except RuntimeError as e:  # torch's load_state_dict: "size mismatch for <key>: copying a param ..."
            first = re.search(r"size mismatch for (\S+?): copying a param with shape (.+?) from checkpoint, "
                              r"the shape in current model is (.+?)\.?$", str(e), re.MULTILINE)
            if not first:
                raise
            lora_shape, model_shape = (re.sub(r"torch\.Size\((.*)\)", r"\1", g) for g in (first[2], first[3]))
            # `blocks.0.attn.to_q.lora_A.lora0.weight` -> `blocks.0.attn.to_q (lora_A)`
            where = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r" (\1)", first[1])
            detail = f" (first mismatch: {where} is {lora_shape} in the LoRA, {model_shape} in the model)"
            raise _mismatch(lora, header, here, detail) from None
        finally:
            peft_log.removeFilter(quiet)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return pipe


class GenerateError(UserError, ValueError):
    """Prompts, seeds or output settings that `fluxtune generate` cannot use."""


NO_PROMPT = "no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE"


class LoraSpec(NamedTuple):
    source: str  # folder, .safetensors file or hub id
    scale: float


def _strength(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise LoraError(f"{where}: LoRA strength {value} is not a finite number")
    return value


def parse_lora(arg: str, default_scale: float = 1.0) -> LoraSpec:
    """`PATH[:SCALE]`. The suffix counts only when it is a number, so paths holding a colon (and
    hub ids) still work; a non-number after an existing path is reported as a bad strength."""
    head, colon, tail = arg.rpartition(":")
    if colon:
        try:
            scale = float(tail)
        except ValueError:
            if Path(head).exists() and not Path(arg).exists():
                raise LoraError(f"--lora {arg}: strength {tail!r} is not a number (e.g. {head}:0.8)") from None
        else:
            if not head:
                raise LoraError(f"--lora {arg}: no LoRA path before the strength")
            return LoraSpec(head, _strength(scale, f"--lora {arg}"))
    return LoraSpec(arg, _strength(default_scale, "--scale"))


def read_prompts_file(file: str | Path) -> list[str]:
    """One prompt per non-empty line; lines starting with `#` are comments, so a prompt list can
    carry notes. A UTF-8 byte-order mark (Windows editors) is accepted."""
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenerateError(f"prompts file {path}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise GenerateError(f"prompts file {path}: cannot read it ({e.strerror or e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise GenerateError(f"prompts file {path} holds no prompt (one per line; lines starting with # are comments)")
    return prompts


def gather_prompts(prompts: Sequence[str] = (), prompts_file: str | Path | None = None) -> list[str]:
    """`--prompt` values, then the prompts file's lines."""
    found = list(prompts) + (read_prompts_file(prompts_file) if prompts_file is not None else [])
    if not found:
        raise GenerateError(NO_PROMPT)
    return found


def seed_list(seed: int | None = None, num_images: int | None = None, seeds: str | None = None) -> list[int]:
    """`--seeds 1,5,9` as listed, or `--num-images K` seeds counting up from `--seed N` (0, 1 image)."""
    if seeds is not None:
        if seed is not None or num_images is not None:
            raise GenerateError("--seeds lists every seed; drop --seed and --num-images")
        try:
            return [int(s) for s in seeds.split(",")]
        except ValueError:
            raise GenerateError(f"--seeds {seeds!r}: expected whole numbers separated by commas, e.g. 1,5,9") from None
    if num_images is not None and num_images < 1:
        raise GenerateError(f"--num-images {num_images}: must be at least 1")
    first = 0 if seed is None else seed
    return list(range(first, first + (num_images or 1)))


def image_name(prompt_index: int, seed: int, prompt_digits: int = 2, seed_digits: int = 7) -> str:
    """`p00-s0000000.png`: zero-padded, so files sort by prompt, then seed."""
    return f"p{prompt_index:0{prompt_digits}d}-s{seed:0{seed_digits}d}.png"


def _save_png(image, path: Path, settings: dict) -> Path:
    """PNG with the settings that made it as JSON under the text key "fluxtune"."""
    info = PngInfo()
    info.add_text("fluxtune", json.dumps(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


@dataclass(frozen=True)
class Generated:
    images: list[Path]  # prompt-major: every seed of the first prompt, then the next prompt's
    contact_sheet: Path | None  # None when one file was asked for with `out`
    settings: dict  # what every image shares (its PNG metadata less prompt and seed)


def generate(*, model: str, prompts: Sequence[str], seeds: Sequence[int], loras: Sequence[str] = (),
             scale: float = 1.0, out_dir: str | Path = "generated", out: str | Path | None = None,
             steps: int | None = None, width: int = 1024, height: int = 1024, guidance: float | None = None,
             negative_prompt: str | None = None, batch_size: int = 1, family: str = "auto",
             progress: bool = True) -> Generated:
    """One PNG per (prompt, seed) in `out_dir` plus `contact_sheet.png` (rows: prompts, columns:
    seeds), or the single image at `out`. `loras` are `PATH[:SCALE]`, `scale` the strength of
    those without one; steps and guidance default to the model's own (`family.sampling_defaults()`).
    Everything the user gave is checked before any weights are loaded."""
    _check_request(prompts, seeds, batch_size, out, steps)
    specs = [parse_lora(arg, scale) for arg in loras]
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fam = load_family(model, family, dtype=dtype)
    defaults = fam.sampling_defaults()
    steps, guidance, cfg = _choose_settings(defaults, steps, guidance, negative_prompt, model)

    pipe = load_pipeline_with_loras(fam, [s.source for s in specs], [s.scale for s in specs], dtype).to(device)
    settings = {"model": str(model), "family": fam.name, "pipeline": type(pipe).__name__, "kind": defaults.kind,
                "loras": [{"path": s.source, "scale": s.scale} for s in specs], "steps": steps,
                "size": [width, height], "guidance": guidance}
    call = fam.pipeline_kwargs() | {"width": width, "height": height, "num_inference_steps": steps}
    if guidance is not None:
        call["guidance_scale"] = guidance
    if cfg:
        settings["negative_prompt"] = negative_prompt or ""
        call["negative_prompt_embeds"] = _negative_embeds(pipe, negative_prompt or "", device, fam.pipeline_kwargs())

    if out is not None:
        jobs = [(prompts[0], seeds[0], Path(out))]
    else:
        digits = (max(2, len(str(len(prompts) - 1))), max(7, len(str(max(seeds)))))
        jobs = [(prompt, seed, Path(out_dir) / image_name(i, seed, *digits))
                for i, prompt in enumerate(prompts) for seed in seeds]
    images = _render(pipe, jobs, call, settings, batch_size, progress)
    sheet = None
    if out is None:
        sheet = _save_png(image_grid(images, columns=len(seeds)), Path(out_dir) / "contact_sheet.png",
                          settings | {"prompts": list(prompts), "seeds": list(seeds)})
    return Generated([path for _, _, path in jobs], sheet, settings)


def _check_request(prompts, seeds, batch_size: int, out, steps: int | None) -> None:
    if not prompts:
        raise GenerateError(NO_PROMPT)
    if not seeds:
        raise GenerateError("no seed given")
    if min(seeds) < 0:
        raise GenerateError(f"seeds must not be negative (got {min(seeds)})")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise GenerateError(f"seed {repeated[0]} is given twice; each seed names one image file")
    if batch_size < 1:
        raise GenerateError(f"--batch-size {batch_size}: must be at least 1")
    if steps is not None and steps < 1:
        raise GenerateError(f"--steps {steps}: must be at least 1")
    if out is not None and len(prompts) * len(seeds) != 1:
        raise GenerateError(f"--out writes one image, but {len(prompts)} prompt(s) x {len(seeds)} seed(s) were asked "
                            "for; use --out-dir DIR")


def _choose_settings(defaults: SamplingDefaults, steps: int | None, guidance: float | None,
                     negative_prompt: str | None, model: str) -> tuple[int, float | None, bool]:
    """Steps, guidance and whether it runs CFG: the user's where given, else the model's; says
    what was chosen, since the defaults differ a lot between kinds of checkpoint."""
    steps = defaults.steps if steps is None else steps
    if guidance is not None and defaults.guidance is None:
        log.warning("--guidance %s is ignored: %s takes no guidance", guidance, defaults.kind)
        guidance = None
    elif guidance is None:
        guidance = defaults.guidance
    cfg = defaults.cfg and guidance > 1
    if negative_prompt is not None and not cfg:
        raise GenerateError(f"--negative-prompt needs classifier-free guidance, which only FLUX.2-klein base "
                            f"checkpoints run (with --guidance above 1); {model} is {defaults.kind}, guidance {guidance}")
    how = "no guidance" if guidance is None else f"guidance {guidance}" + (" with CFG" if cfg else "")
    log.info("%s (%s): %d steps, %s", defaults.kind, defaults.why, steps, how)
    return steps, guidance, cfg


def _negative_embeds(pipe, text: str, device: torch.device, encode_kwargs: dict) -> torch.Tensor:
    """One negative prompt's embedding (1, T, D), encoded once for every batch: Flux2KleinPipeline
    takes negative prompts only as embeddings (its own default is the empty prompt's)."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt=[text], device=device, **encode_kwargs)
    return embeds


def _render(pipe, jobs: list[tuple[str, int, Path]], call: dict, settings: dict, batch_size: int,
            progress: bool) -> list:
    """Renders and saves (prompt, seed, path) jobs `batch_size` at a time. Each image gets its own
    seeded generator, so it does not depend on the batch it was rendered in."""
    # With many images one bar over images says more than a bar per pipeline call.
    pipe.set_progress_bar_config(desc="generating", disable=len(jobs) > 1 or not progress)
    images = []
    with tqdm(total=len(jobs), desc="images", unit="img", disable=len(jobs) == 1 or not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            kwargs = dict(call)
            if "negative_prompt_embeds" in kwargs:
                kwargs["negative_prompt_embeds"] = kwargs["negative_prompt_embeds"].expand(len(batch), -1, -1)
            rendered = pipe(prompt=[prompt for prompt, _, _ in batch],
                            generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed, _ in batch],
                            **kwargs).images
            for (prompt, seed, path), image in zip(batch, rendered):
                _save_png(image, path, settings | {"prompt": prompt, "seed": seed})
                images.append(image)
            bar.update(len(batch))
    return images


class TrainingSampler:
    """Renders fixed prompts with the transformer being trained (no second copy of it).

    Prompt embeddings are computed once, while the text encoders are loaded for caching, so the
    encoders need not stay in memory; the pipeline gets the live transformer and its own VAE.
    """

    def __init__(self, family, prompts: list, embeds: list[dict], negative: dict, *, default_size: int,
                 default_steps: int, default_guidance: float | None):
        self.family, self.prompts, self.embeds, self.negative = family, prompts, embeds, negative
        self.default_size, self.default_steps, self.default_guidance = default_size, default_steps, default_guidance
        self._pipe = None

    @classmethod
    def encode(cls, family, prompts: list, device: torch.device, **defaults) -> "TrainingSampler":
        """Embeds the prompts (and the empty negative prompt) with the family's text encoders."""
        *embeds, negative = family.encode_prompts([p.prompt for p in prompts] + [""], device)
        return cls(family, prompts, embeds, negative, **defaults)

    def render(self, transformer, dtype: torch.dtype, device: torch.device) -> list[tuple]:
        """[(PIL image, caption)] per prompt. Leaves every random stream as it found it."""
        if self._pipe is None:
            self._pipe = self.family.sampling_pipeline(transformer, dtype).to(device)
            self._pipe.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        devices = [device] if device.type == "cuda" else []
        results = []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for p, emb in zip(self.prompts, self.embeds):
                    size = (p.width or self.default_size, p.height or self.default_size)
                    guidance = p.guidance if p.guidance is not None else self.default_guidance
                    kwargs = self.family.pipeline_kwargs() | self.family.sample_kwargs(emb, self.negative, device)
                    if guidance is not None:
                        kwargs["guidance_scale"] = guidance
                    image = self._pipe(
                        width=size[0], height=size[1], num_inference_steps=p.steps or self.default_steps,
                        generator=torch.Generator().manual_seed(p.seed), **kwargs,
                    ).images[0]
                    results.append((image, f"{p.prompt} (seed {p.seed})"))
        finally:
            transformer.train(was_training)
        return results


def image_grid(images: list, columns: int | None = None):
    """Images side by side (rows of `columns`), on a white background, sizes may differ."""
    from PIL import Image

    columns = columns or len(images)
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    width = max(sum(im.width for im in row) for row in rows)
    height = sum(max(im.height for im in row) for row in rows)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for im in row:
            grid.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in row)
    return grid
