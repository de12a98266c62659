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
