"""Images from a FLUX pipeline with LoRAs: `fluxtune generate`.

    fluxtune generate --model ./tiny --lora runs/demo/lora --prompt "a photo of sks" --out cat.png
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from fluxtune.families import load_family


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline_with_loras(family, loras: list[str], scale: float, dtype: torch.dtype):
    pipe = family.load_pipeline(dtype)
    names = []
    for i, lora in enumerate(loras):
        path = Path(lora)
        kwargs = {"weight_name": path.name} if path.is_file() else {}
        name = f"lora{i}"
        pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=name, **kwargs)
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
