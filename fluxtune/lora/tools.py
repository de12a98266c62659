"""Work on finished LoRA files: check, describe, resize, combine, convert and merge.

    fluxtune lora info FILE
    fluxtune lora check FILE --model PATH
    fluxtune lora resize FILE --rank 8 --out SMALL.safetensors
    fluxtune lora combine A.safetensors:0.8 B.safetensors:0.5 --out AB.safetensors
    fluxtune lora convert FILE --to comfyui --out FILE2
    fluxtune lora merge FILE --model PATH --out MERGED_TRANSFORMER_DIR

All of them read any layout `fluxtune.lora.formats` reads and are exact where the math allows
(convert, combine, merge); resize reports how much of each layer it keeps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxtune.errors import LoraError
from fluxtune.lora.formats import Adapter, LoraModule, content_hash, lora_file, read_lora

log = logging.getLogger("fluxtune")


# --- resize ----------------------------------------------------------------------------------

@dataclass
class ResizeReport:
    layers: list[tuple[str, int, int, float]]  # (module, old rank, new rank, retained energy)

    @property
    def mean_energy(self) -> float:
        return sum(e for *_, e in self.layers) / max(len(self.layers), 1)

    @property
    def min_energy(self) -> tuple[str, float]:
        name, *_, energy = min(self.layers, key=lambda layer: layer[3])
        return name, energy

    def table(self) -> str:
        width = max(len(n) for n, *_ in self.layers)
        lines = [f"{'module':<{width}}  rank       energy kept"]
        lines += [f"{n:<{width}}  {a:>3} -> {b:<3}  {e:>10.2%}" for n, a, b, e in self.layers]
        worst, energy = self.min_energy
        lines.append(f"mean energy kept {self.mean_energy:.2%}; lowest {energy:.2%} ({worst})")
        return "\n".join(lines)


def low_rank(module: LoraModule, rank: int) -> tuple[LoraModule, float]:
    """Best rank-`rank` approximation of the module's weight change (truncated SVD), and the share
    of its energy (squared Frobenius norm) kept. The SVD runs on the r x r core of QR factors, so
    it costs O(r^2 (m + n)) instead of a full m x n decomposition."""
    up, down = module.up.double(), module.down.double()
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(module.scale * r_up @ r_down.T)
    total = float((s**2).sum())
    k = min(rank, int(s.numel()))
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    new_up = (q_up @ u[:, :k]) * root
    new_down = root[:, None] * (vh[:k] @ q_down.T)
    return LoraModule(new_down.float(), new_up.float(), float(k)), kept


def resize(adapter: Adapter, rank: int) -> tuple[Adapter, ResizeReport]:
    if rank < 1:
        raise LoraError(f"--rank must be at least 1 (got {rank})")
    modules, layers = {}, []
    for name, module in sorted(adapter.modules.items()):
        if module.rank <= rank:
            modules[name], kept = module, 1.0
        else:
            modules[name], kept = low_rank(module, rank)
        layers.append((name, module.rank, modules[name].rank, kept))
    metadata = {**adapter.metadata, "fluxtune.resized": json.dumps({"from_ranks": sorted(adapter.ranks()), "to_rank": rank})}
    return Adapter(modules, adapter.arch, metadata, adapter.source_format), ResizeReport(layers)


# --- combine ---------------------------------------------------------------------------------

def combine(weighted: list[tuple[Adapter, float]]) -> Adapter:
    """The exact sum of weighted LoRAs: per module, down matrices stacked and weighted, scaled up
    matrices side by side, so the result's change is sum(w_i * delta_i). Its rank is the sum of the
    ranks; `resize` shrinks it."""
    if not weighted:
        raise LoraError("nothing to combine")
    archs = {a.arch for a, _ in weighted}
    if len(archs) > 1:
        raise LoraError(f"cannot combine LoRAs of different architectures ({', '.join(sorted(archs))})")
    names = sorted({n for a, _ in weighted for n in a.modules})
    modules = {}
    for name in names:
        parts = [(a.modules[name], w) for a, w in weighted if name in a.modules]
        shapes = {(m.up.shape[0], m.down.shape[1]) for m, _ in parts}
        if len(shapes) > 1:
            raise LoraError(f"{name} has different shapes in the LoRAs ({sorted(shapes)}): they are for different models")
        down = torch.cat([m.down for m, _ in parts])
        up = torch.cat([m.up * (w * m.scale) for m, w in parts], dim=1)
        modules[name] = LoraModule(down, up, float(down.shape[0]))
    sources = [a.metadata.get("modelspec.title") or a.metadata.get("fluxtune.run_id") or "?" for a, _ in weighted]
    metadata = {"fluxtune.combined": json.dumps([{"source": s, "weight": w} for s, (_, w) in zip(sources, weighted)])}
    for key in ("modelspec.architecture", "modelspec.implementation", "fluxtune.base_class", "fluxtune.base_shape"):
        values = {a.metadata.get(key) for a, _ in weighted}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    return Adapter(modules, archs.pop(), metadata)


# --- merge -----------------------------------------------------------------------------------

def merge_into(transformer: torch.nn.Module, adapter: Adapter, scale: float = 1.0) -> int:
    """W += scale * delta for every module, computed in float64 and cast back to W's dtype.
    Every module is checked before any weight changes. Returns the number of layers changed."""
    layers = dict(transformer.named_modules())
    problems = []
    for name, m in adapter.modules.items():
        layer = layers.get(name)
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{name}: no such Linear layer in the model")
        elif tuple(layer.weight.shape) != (m.up.shape[0], m.down.shape[1]):
            problems.append(f"{name}: LoRA is {m.up.shape[0]}x{m.down.shape[1]}, layer is {tuple(layer.weight.shape)}")
    if problems:
        raise LoraError("the LoRA does not fit this model: " + "; ".join(problems[:5])
                        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    with torch.no_grad():
        for name, m in adapter.modules.items():
            w = layers[name].weight
            w.copy_((w.double() + scale * m.delta().to(w.device)).to(w.dtype))
    return len(adapter.modules)


def merge(lora: str | Path, model: str, out: str | Path, *, scale: float = 1.0, family: str = "auto",
          dtype: torch.dtype | None = None) -> Path:
    """Load the base transformer, merge the LoRA into it, save it (safetensors) as a transformer folder."""
    from fluxtune.models.families import load_family

    fam = load_family(model, family)
    adapter = read_lora(lora, arch=fam.name)
    transformer = fam.load_transformer(dtype or _checkpoint_dtype(fam))
    count = merge_into(transformer, adapter, scale)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("merged %d layers at scale %g", count, scale)
    return out


def _checkpoint_dtype(fam) -> torch.dtype:
    """The dtype the transformer is stored in, so merging does not change the file's precision."""
    from fluxtune.models.families.common import read_component_config

    name = read_component_config(fam.path, "transformer", fam.revision).get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


# --- check -----------------------------------------------------------------------------------

@dataclass
class CheckReport:
    file: Path
    loaded: list[str] = field(default_factory=list)  # transformer modules that get the LoRA
    problems: list[str] = field(default_factory=list)  # keys or modules that would not load
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.loaded)

    def text(self) -> str:
        lines = [f"{self.file}: {len(self.loaded)} transformer layers load"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("OK: every key loads" if self.ok else "NOT OK: the keys above would not load")
        return "\n".join(lines)


def check(lora: str | Path, model: str, family: str = "auto") -> CheckReport:
    """What diffusers would do with this file: its own converter (`lora_state_dict`), then each
    converted key against the transformer's layers and shapes. The transformer is built on the
    meta device from its config, so no weights are loaded: real checkpoints check in seconds."""
    from fluxtune.models.families import load_family

    file = lora_file(lora)
    fam = load_family(model, family)
    report = CheckReport(file)
    try:
        converted = fam.pipeline_cls.lora_state_dict(str(file.parent), weight_name=file.name, use_safetensors=True)
    except Exception as e:  # diffusers' converters raise ValueError, KeyError or AssertionError
        report.problems.append(f"diffusers cannot convert it: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return report
    if isinstance(converted, tuple):  # FLUX.1 returns (state_dict, network_alphas)
        converted = converted[0]
    layers = dict(_empty_transformer(fam).named_modules())
    modules: dict[str, dict] = {}
    for key, value in converted.items():
        if not key.startswith("transformer."):
            report.notes.append(f"{key}: not a transformer key (text encoder LoRA), not checked")
            continue
        name, _, rest = key.removeprefix("transformer.").partition(".lora_")
        modules.setdefault(name, {})["lora_" + rest] = value
    for name, parts in sorted(modules.items()):
        layer = layers.get(name)
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if layer is None:
            report.problems.append(f"{name}: no such layer in {type(layers['']).__name__}")
        elif not isinstance(layer, torch.nn.Linear):
            report.problems.append(f"{name}: is a {type(layer).__name__}, not a Linear layer")
        elif a is None or b is None:
            report.problems.append(f"{name}: has {', '.join(sorted(parts))} only")
        elif a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            report.problems.append(f"{name}: LoRA {tuple(b.shape)}x{tuple(a.shape)} does not fit the layer "
                                   f"({layer.out_features}x{layer.in_features})")
        else:
            report.loaded.append(name)
    _check_nothing_dropped(file, fam.name, modules, report)
    return report


def _empty_transformer(fam) -> torch.nn.Module:
    from accelerate import init_empty_weights

    from fluxtune.models.families.common import read_component_config

    config = read_component_config(fam.path, "transformer", fam.revision)
    with init_empty_weights():
        return fam.parts.transformer_cls.from_config(config)


def _check_nothing_dropped(file: Path, arch: str, converted: dict, report: CheckReport) -> None:
    """diffusers' converters skip keys they do not know with at most a log line; compare with our
    own reading of the file so a silently dropped layer shows."""
    try:
        ours = read_lora(file, arch=arch)
    except LoraError as e:
        report.notes.append(f"fluxtune cannot read it itself, so dropped keys are not checked ({e})")
        return
    dropped = sorted(n for n, m in ours.modules.items() if n not in converted and torch.any(m.up))
    for name in dropped:
        report.problems.append(f"{name}: in the file but dropped by diffusers' converter")


# --- info ------------------------------------------------------------------------------------

def info(lora: str | Path) -> str:
    """A readable description of any LoRA file: layout, architecture, layers, ranks, header."""
    from safetensors import safe_open

    file = lora_file(lora)
    with safe_open(str(file), "pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lines = [f"file:        {file} ({file.stat().st_size / 2**20:.2f} MiB, {len(tensors)} tensors)"]
    try:
        adapter = read_lora(file)
    except LoraError as e:
        lines.append(f"layout:      not one fluxtune converts ({e})")
        adapter = None
    if adapter is not None:
        kinds = {"double": 0, "single": 0}
        for name in adapter.modules:
            kinds["single" if name.startswith("single_") else "double"] += 1
        alphas = sorted({round(m.alpha, 6) for m in adapter.modules.values()})
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        params = sum(m.down.numel() + m.up.numel() for m in adapter.modules.values())
        lines += [
            f"layout:      {adapter.source_format}",
            f"arch:        {adapter.arch}",
            f"layers:      {len(adapter.modules)} ({kinds['double']} in double blocks, {kinds['single']} in single blocks)",
            f"rank:        {', '.join(map(str, sorted(adapter.ranks())))}",
            f"alpha:       {', '.join(f'{a:g}' for a in alphas)}",
            f"parameters:  {params:,} ({', '.join(dtypes)})",
        ]
    stored = header.get("modelspec.hash_sha256")
    if stored:
        verdict = "matches" if stored == content_hash(tensors) else "DOES NOT MATCH the tensors (file altered?)"
        lines.append(f"hash:        {stored[:16]}... {verdict}")
    if header:
        lines.append("header:")
        width = max(len(k) for k in header)
        for key in sorted(header):
            lines.append(f"  {key:<{width}}  {_pretty(header[key])}")
    return "\n".join(lines)


def _pretty(value: str) -> str:
    """JSON header values on one readable line; long values shortened."""
    try:
        parsed = json.loads(value)
        if isinstance(parsed, (dict, list)):
            value = json.dumps(parsed, separators=(", ", ": "))
    except (json.JSONDecodeError, TypeError):
        pass
    return value if len(value) <= 300 else value[:297] + "..."
