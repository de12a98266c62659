"""Package a trained LoRA for the inference side: one folder with the LoRA in the chosen layout,
a Hugging Face model card and sample images; optionally uploaded to the Hub.

    fluxtune export runs/my_run --format comfyui --trigger sks --out exports/my_lora
    fluxtune export runs/my_run --out exports/my_lora --push-to-hub me/my-lora

The LoRA's header carries modelspec fields (architecture, title, trigger words, resolution, date),
the training summary and a content hash; `fluxtune lora info` prints them.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fluxtune.errors import LoraError
from fluxtune.lora.adapter import WEIGHTS_NAME, replace_dir
from fluxtune.lora.formats import read_lora, write_lora

SPEC_VERSION = "1.0.0"
IMPLEMENTATION = {"flux1": "https://github.com/black-forest-labs/flux",
                  "flux2": "https://github.com/black-forest-labs/flux2"}
# (family, double blocks, single blocks, guidance embedder) -> modelspec architecture name.
KNOWN = {
    ("flux1", 19, 38, True): "flux-1-dev",
    ("flux1", 19, 38, False): "flux-1-schnell",
    ("flux1", 8, 38, True): "flex-1",
    ("flux2", 8, 48, True): "flux-2-dev",
    ("flux2", 5, 20, False): "flux-2-klein-4b",
    ("flux2", 8, 24, False): "flux-2-klein-9b",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PIPELINES = {"flux1": "FluxPipeline", "flux2": "Flux2Pipeline"}


def architecture(family: str, config) -> str:
    """modelspec architecture of a transformer config; a shape we do not know keeps the family name."""
    key = (family, config.get("num_layers"), config.get("num_single_layers"), bool(config.get("guidance_embeds")))
    name = KNOWN.get(key, "flux-1" if family == "flux1" else "flux-2")
    return f"{name}/lora"


def training_metadata(*, family: str, transformer_config, title: str, resolution: int, base_model: str,
                      summary: dict) -> dict[str, str]:
    """Header fields written with every LoRA training saves: modelspec fields and the training
    summary (steps, rank, alpha, targets, dataset size and hash, optimizer, lr, ...)."""
    return {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(family, transformer_config),
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fluxtune.base_model": base_model,
        "fluxtune.training": json.dumps(summary, sort_keys=True),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "lora"


def _find_run(source: Path, ema: bool) -> tuple[Path, Path | None]:
    """(LoRA path, run folder or None) for a run folder or a LoRA file/folder."""
    if (source / "summary.json").is_file() or (source / "config.yaml").is_file():
        lora = source / ("lora_ema" if ema else "lora")
        if not (lora / WEIGHTS_NAME).is_file():
            raise LoraError(f"{source}: this run has no {lora.name}/{WEIGHTS_NAME}"
                            + (" (was train.ema_decay set?)" if ema else " (did training finish a save?)"))
        return lora, source
    if ema:
        raise LoraError("--ema applies to a run folder; pass the lora_ema folder itself instead")
    return source, None


def _run_details(run: Path | None) -> dict:
    """Prompts and sample images of a run, for the model card."""
    details = {"prompts": [], "samples": []}
    if run is None:
        return details
    config_file = run / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        details["prompts"] = [p["prompt"] if isinstance(p, dict) else p
                              for p in (config.get("sample") or {}).get("prompts") or []]
    grids = sorted((run / "samples").glob("step-*.png")) if (run / "samples").is_dir() else []
    details["samples"] = grids[-1:] + (grids[:1] if len(grids) > 1 else [])  # last step, then the base
    return details


def export(source: str | Path, out: str | Path, fmt: str = "diffusers", *, title: str | None = None,
           trigger: list[str] | None = None, base_model: str | None = None, ema: bool = False,
           arch: str | None = None, license: str | None = None) -> Path:
    """Write `out/` with the LoRA, README.md and samples/; built in a temporary folder and renamed,
    so an existing export is replaced whole or not at all."""
    source, out = Path(source), Path(out)
    lora, run = _find_run(source, ema)
    adapter = read_lora(lora, arch=arch)
    meta = adapter.metadata
    title = title or meta.get("modelspec.title") or (run.name if run else Path(lora).stem)
    triggers = trigger if trigger is not None else [t for t in meta.get("modelspec.trigger_phrase", "").split(",") if t]
    base = base_model or meta.get("fluxtune.base_model", "")
    meta["modelspec.title"] = title
    meta.setdefault("modelspec.sai_model_spec", SPEC_VERSION)
    meta.setdefault("modelspec.implementation", IMPLEMENTATION[adapter.arch])
    meta.setdefault("modelspec.date", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if "modelspec.architecture" not in meta:
        meta["modelspec.architecture"] = ("flux-1" if adapter.arch == "flux1" else "flux-2") + "/lora"
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    if base:
        meta["fluxtune.base_model"] = base

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_name = WEIGHTS_NAME if fmt == "diffusers" else f"{_slug(title)}.safetensors"
    write_lora(adapter, tmp / weight_name, fmt)
    details = _run_details(run)
    if details["samples"]:
        (tmp / "samples").mkdir()
        for image in details["samples"]:
            shutil.copy2(image, tmp / "samples" / image.name)
    card = model_card(title=title, arch=adapter.arch, fmt=fmt, weight_name=weight_name, triggers=triggers,
                      base_model=base, metadata=meta, prompts=details["prompts"],
                      samples=[f"samples/{p.name}" for p in details["samples"]], license=license)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    replace_dir(tmp, out)
    return out


def model_card(*, title, arch, fmt, weight_name, triggers, base_model, metadata, prompts, samples, license=None) -> str:
    """README.md in the Hugging Face model-card format: YAML front matter the Hub reads (base model,
    tags, trigger as instance_prompt, sample widget), then usage for diffusers and ComfyUI."""
    hub_base = base_model if HUB_ID.match(base_model or "") else None
    front = {"tags": ["text-to-image", "lora", "diffusers", "flux", "template:sd-lora", "fluxtune"]}
    if hub_base:
        front["base_model"] = hub_base
    front["library_name"] = "diffusers"
    if license:
        front["license"] = license
    if triggers:
        front["instance_prompt"] = ", ".join(triggers)
    if samples:
        text = " | ".join(prompts) if prompts else title
        front["widget"] = [{"text": text, "output": {"url": samples[0]}}]
    example = (f"{triggers[0]}, " if triggers else "") + (prompts[0] if prompts else "a photo")
    pipeline = PIPELINES[arch]
    base_ref = hub_base or "PATH/TO/BASE/MODEL"
    load_kwargs = "" if weight_name == WEIGHTS_NAME else f', weight_name="{weight_name}"'
    training = _training_table(metadata)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {title}", "",
        f"A LoRA for {metadata.get('modelspec.architecture', arch).removesuffix('/lora')}"
        + (f" (`{base_model}`)" if base_model else "") + f", trained with fluxtune. File: `{weight_name}` ({fmt} layout).", "",
    ]
    if triggers:
        lines += ["## Trigger words", "", "Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt.", ""]
    if samples:
        lines += ["## Samples", ""] + [f"![sample]({s})" for s in samples] + [""]
    lines += [
        "## Use with diffusers", "", "```python", "import torch", f"from diffusers import {pipeline}", "",
        f'pipe = {pipeline}.from_pretrained("{base_ref}", torch_dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights("THIS_REPO_OR_FOLDER"{load_kwargs})',
        f"image = pipe({json.dumps(example)}).images[0]", 'image.save("image.png")', "```", "",
        "## Use with ComfyUI", "",
        f"Put `{weight_name}` in `ComfyUI/models/loras/` and add a LoraLoaderModelOnly node after the model loader.", "",
    ]
    if training:
        lines += ["## Training", "", "| setting | value |", "|---|---|"] + training + [""]
    return "\n".join(lines)


def _training_table(metadata) -> list[str]:
    try:
        summary = json.loads(metadata.get("fluxtune.training", "{}"))
    except json.JSONDecodeError:
        return []
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        rows.append(f"| {key} | {value} |")
    return rows


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False, api=None) -> str:
    """Upload an export folder to a Hub model repo (created if missing); returns the repo URL."""
    if not HUB_ID.match(repo):
        raise LoraError(f"--push-to-hub {repo!r}: expected a repo id like user/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                      commit_message="Upload LoRA exported with fluxtune")
    return str(url)
