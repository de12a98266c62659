"""Images from a FLUX pipeline with LoRAs: `fluxtune generate`.

    fluxtune generate --model ./tiny --lora runs/demo/lora --prompt "a photo of sks" --out cat.png
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from fluxtune.errors import LoraError
from fluxtune.families import load_family
from fluxtune.lora import WEIGHTS_NAME, describe_base

# Formats that unpickle on load, i.e. run code from the file.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
NO_PICKLE = "only .safetensors files are loaded; no pickle (it can run code from the file)"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_lora(lora: str) -> Path | str:
    """The .safetensors file a `--lora` argument names (the file, or the LoRA in a folder), or a
    hub id as given. Refuses pickle formats before diffusers, which would unpickle them, sees them."""
    path = Path(lora)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return path / WEIGHTS_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if found:
            raise LoraError(f"LoRA folder {path} holds several .safetensors files ({', '.join(f.name for f in found)}); "
                            "pass one of them with --lora FILE")
        pickled = sorted(f.name for f in path.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickled:
            raise LoraError(f"LoRA folder {path} holds {', '.join(pickled)}: {NO_PICKLE}; convert it to .safetensors")
        raise LoraError(f"LoRA folder {path} holds no .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES or (path.is_file() and path.suffix.lower() != ".safetensors"):
        raise LoraError(f"LoRA {path}: {NO_PICKLE}; convert it to .safetensors")
    if path.is_file():
        return path
    if HUB_ID.match(lora):
        return lora
    raise LoraError(f"LoRA {lora}: no such file or folder")


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


def load_pipeline_with_loras(family, loras: list[str], scale: float, dtype: torch.dtype):
    files = [resolve_lora(lora) for lora in loras]  # before any model or LoRA is loaded
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
        pipe.set_adapters(names, adapter_weights=[scale] * len(names))
    return pipe


def generate(*, model, loras, scale, prompt, out, seed, steps, width, height, guidance, family="auto") -> Path:
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fam = load_family(model, family, dtype=dtype)
    pipe = load_pipeline_with_loras(fam, loras, scale, dtype).to(device)
    pipe.set_progress_bar_config(desc="generating")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # FLUX.2 pipelines take `image` first: everything by keyword.
    kwargs = fam.pipeline_kwargs() | ({} if guidance is None else {"guidance_scale": guidance})
    image = pipe(prompt=prompt, width=width, height=height, num_inference_steps=steps, generator=generator,
                 **kwargs).images[0]
    info = PngInfo()
    settings = {"prompt": prompt, "model": model, "loras": loras, "scale": scale, "seed": seed, "steps": steps,
                "guidance": guidance}
    info.add_text("fluxtune", json.dumps(settings))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=info)
    return out


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
