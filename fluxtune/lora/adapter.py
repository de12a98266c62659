"""LoRA on the transformer with peft: add it, list its parameters, save it in diffusers format,
and find the file a LoRA argument names.

    targets = resolve_targets(family, "attention")
    add_lora(transformer, rank=16, alpha=16, targets=targets)
    save_lora(FluxPipeline, transformer, "out/lora")      # loads with pipe.load_lora_weights("out/lora")
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from fluxtune.errors import LoraError

PRESETS = ("attention", "attention+mlp", "all-linear")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Transformer config fields that fix the shapes of the adapted layers (FLUX.1 and FLUX.2 alike).
BASE_SHAPE_FIELDS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "in_channels")
# Formats that unpickle on load, i.e. run code from the file.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
NO_PICKLE = "only .safetensors files are loaded; no pickle (it can run code from the file)"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_targets(family, targets: str | list[str]) -> str | list[str]:
    """A preset name becomes the family's regex; a regex or a list of names passes through."""
    if isinstance(targets, str) and targets in PRESETS:
        return family.lora_targets(targets)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise LoraError(f"lora.targets: {targets!r} is not a preset ({', '.join(PRESETS)}) nor a valid regex: {e}")
    return targets


def matched_modules(transformer: torch.nn.Module, targets) -> dict[str, torch.nn.Module]:
    """The modules peft would adapt: a string is a regex over whole names, a list matches name suffixes."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return {n: m for n, m in transformer.named_modules() if n and pattern.fullmatch(n)}
    return {n: m for n, m in transformer.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}


def check_targets(transformer: torch.nn.Module, targets) -> None:
    """Fail before peft does, with names the user can act on."""
    matched = matched_modules(transformer, targets)
    if not matched:
        examples = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                    and n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0."))][:8]
        raise LoraError(
            f"lora.targets {targets!r} matches no module of the transformer; use a preset "
            f"({', '.join(PRESETS)}), a regex over full names or a list of names, e.g. {examples}"
        )
    wrong = [n for n, m in matched.items() if not isinstance(m, torch.nn.Linear)]
    if wrong:
        raise LoraError(
            f"lora.targets {targets!r} matches modules that are not Linear layers ({', '.join(wrong[:4])}"
            f"{', ...' if len(wrong) > 4 else ''}); name the Linear inside them (e.g. 'attn.to_out.0') or use a regex"
        )


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: float | None, targets, dropout: float = 0.0) -> list:
    """Adds adapter "default"; LoRA weights are kept in fp32 whatever the base dtype. Returns them."""
    check_targets(transformer, targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=targets,
    )
    transformer.add_adapter(config)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def count_adapted(transformer: torch.nn.Module) -> dict[str, int]:
    """How many modules got a LoRA, in double and single blocks: a preset that misses one kind shows here."""
    counts = {"double": 0, "single": 0, "other": 0}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            kind = "single" if name.startswith("single_transformer_blocks.") else (
                "double" if name.startswith("transformer_blocks.") else "other")
            counts[kind] += 1
    return counts


def describe_base(transformer: torch.nn.Module, model_path: str | None = None) -> dict[str, str]:
    """Header fields naming the base a LoRA is trained on, so a loader can say which base a file
    needs: the transformer class, the config fields that fix layer shapes (compact JSON) and,
    when given, the model's name or path."""
    base = getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper
    base = getattr(base, "module", base)  # DDP's wrapper
    config = getattr(base, "config", {}) or {}
    shape = {k: config[k] for k in BASE_SHAPE_FIELDS if k in config}
    fields = {"fluxtune.base_class": type(base).__name__,
              "fluxtune.base_shape": json.dumps(shape, separators=(",", ":"))}
    if model_path is not None:
        fields["fluxtune.base_model"] = str(model_path)
    return fields


def add_file_metadata(file: str | Path, extra: dict[str, str]) -> None:
    """Add string fields to a safetensors header (kept beside diffusers' own), rewriting atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = Path(file)
    with safe_open(file, "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, str(tmp), metadata={**metadata, **{k: str(v) for k, v in extra.items()}})
    os.replace(tmp, file)


def save_lora(pipeline_cls, transformer: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write diffusers-format LoRA weights (`transformer.` keys, adapter config in the header).

    Written into a temporary sibling folder and renamed, so a crash never leaves half a file where
    a finished LoRA was.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    replace_dir(tmp, out_dir)
    return out_dir / WEIGHTS_NAME


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` where `target` is: the old one is renamed aside first and
    deleted last, so a crash leaves either the old folder or the new one, never a mix."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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
