"""LoRA files in the layouts inference tools read, converted exactly.

    adapter = read_lora("run/lora")                        # any supported layout, any FLUX arch
    write_lora(adapter, "out/my_lora.safetensors", "comfyui")

An `Adapter` holds one (down, up, alpha) triple per adapted Linear, named as in the diffusers
transformer (`transformer_blocks.0.attn.to_q`). Formats:

- `diffusers`: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter config (rank,
  alpha) in the header under `lora_adapter_metadata`. What training writes; what
  `pipe.load_lora_weights` reads natively.
- `kohya`: the original Black Forest Labs module layout, `lora_unet_double_blocks_0_img_attn_qkv`
  with `.lora_down.weight`, `.lora_up.weight`, `.alpha`. ComfyUI, Forge and kohya's scripts read it
  for FLUX.1 and FLUX.2.
- `comfyui`: for FLUX.1 the same file as `kohya` (the layout ComfyUI's FLUX.1 LoRAs use); for
  FLUX.2 the original layout with `diffusion_model.` names and `.lora_A/.lora_B`, the scale folded
  into the weights (the diffusers FLUX.2 converter takes no alpha keys).

The original layout fuses projections that diffusers keeps apart (q, k and v in one `qkv`; FLUX.1
single blocks' q, k, v and MLP-in in one `linear1`). The fused LoRA is exact: down matrices
stacked, up matrices block-diagonal, every part padded to one rank so readers (ours and diffusers')
split it back into the original per-projection LoRAs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxtune.errors import LoraError
from fluxtune.lora.adapter import resolve_lora

FORMATS = ("diffusers", "kohya", "comfyui")
ARCHS = ("flux1", "flux2")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig
# Header fields that describe the tensors of one particular file and are recomputed on write.
_PER_FILE_FIELDS = {ADAPTER_METADATA_KEY, "format", "modelspec.hash_sha256", "fluxtune.format"}

# diffusers module (relative to the block) -> original module, per architecture. A tuple of several
# diffusers modules is one fused original module, parts in the order the original stacks them.
_DOUBLE_ATTN = [
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
    (("attn.to_out.0",), "img_attn.proj"),
    (("attn.to_add_out",), "txt_attn.proj"),
]
LAYOUT = {
    "flux1": {
        "double": _DOUBLE_ATTN + [
            (("ff.net.0.proj",), "img_mlp.0"), (("ff.net.2",), "img_mlp.2"),
            (("ff_context.net.0.proj",), "txt_mlp.0"), (("ff_context.net.2",), "txt_mlp.2"),
            (("norm1.linear",), "img_mod.lin"), (("norm1_context.linear",), "txt_mod.lin"),
        ],
        "single": [
            (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1"),
            (("proj_out",), "linear2"),
            (("norm.linear",), "modulation.lin"),
        ],
    },
    "flux2": {
        "double": _DOUBLE_ATTN + [
            (("ff.linear_in",), "img_mlp.0"), (("ff.linear_out",), "img_mlp.2"),
            (("ff_context.linear_in",), "txt_mlp.0"), (("ff_context.linear_out",), "txt_mlp.2"),
        ],
        "single": [
            (("attn.to_qkv_mlp_proj",), "linear1"),
            (("attn.to_out",), "linear2"),
        ],
    },
}
_BLOCKS = {"double": ("transformer_blocks", "double_blocks"), "single": ("single_transformer_blocks", "single_blocks")}
_BLOCK_NAME = re.compile(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$")
_ORIGINAL_NAME = re.compile(r"^(single_blocks|double_blocks)\.(\d+)\.(.+)$")
_KOHYA_NAME = re.compile(r"^lora_unet_(single_blocks|double_blocks)_(\d+)_(.+)$")


@dataclass
class LoraModule:
    """One adapted Linear: its weight changes by `scale * up @ down`, scale = alpha / rank."""

    down: torch.Tensor  # (rank, in_features), peft's lora_A
    up: torch.Tensor  # (out_features, rank), peft's lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


@dataclass
class Adapter:
    """A transformer LoRA, independent of file layout. Module names are the diffusers ones."""

    modules: dict[str, LoraModule]
    arch: str
    metadata: dict[str, str] = field(default_factory=dict)  # header fields that travel with it
    source_format: str = "diffusers"

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


# ---------------------------------------------------------------------------------------------
# Reading

def lora_file(path: str | Path) -> Path:
    """The .safetensors file a path names: the file itself or the single LoRA in a folder."""
    file = resolve_lora(str(path))
    if not isinstance(file, Path):
        raise LoraError(f"LoRA {path}: no such file or folder (hub ids are read by `fluxtune generate`, "
                        "download the file first for this command)")
    return file


def read_lora(path: str | Path, arch: str | None = None) -> Adapter:
    """Read a LoRA in any supported layout. `arch` (flux1/flux2) is needed only when neither the
    header nor the module names and shapes tell the architecture."""
    from safetensors import safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise LoraError(f"LoRA {file} is not a readable .safetensors file ({' '.join(str(e).split())})") from None
    try:
        return from_state_dict(tensors, header, arch)
    except LoraError as e:
        raise LoraError(f"LoRA {file}: {e}") from None


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in keys) or any(".lora_A." in k for k in keys):
        return "diffusers"
    raise LoraError("its keys are in no layout this tool reads (expected `transformer.`, `lora_unet_` or "
                    f"`diffusion_model.` names; found e.g. {keys[:3]})")


def from_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None,
                    arch: str | None = None) -> Adapter:
    header = dict(header or {})
    fmt = detect_format(tensors)
    if fmt == "diffusers":
        modules = _read_diffusers(tensors, header)
        arch = arch or _arch_from_header(header) or _arch_from_modules(modules)
    else:
        original = _read_original(tensors, kohya=fmt == "kohya")
        arch = arch or _arch_from_header(header) or _arch_from_original(original)
        modules = _unfuse(original, arch)
    if arch not in ARCHS:
        raise LoraError("cannot tell whether it is a FLUX.1 or a FLUX.2 LoRA; pass --arch flux1 or --arch flux2")
    if not modules:
        raise LoraError("it holds no LoRA weights")
    metadata = {k: v for k, v in header.items() if k not in _PER_FILE_FIELDS}
    return Adapter(modules, arch, metadata, fmt)


def _pairs(tensors, down: str, up: str) -> dict[str, tuple]:
    """{module: (down, up, alpha or None)} from keys `<module>.<down|up>.weight` and `<module>.alpha`."""
    found: dict[str, dict] = {}
    unknown = []
    for key, value in tensors.items():
        for part, suffix in (("down", f".{down}.weight"), ("up", f".{up}.weight"), ("alpha", ".alpha")):
            if key.endswith(suffix):
                found.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoraError(f"keys that are not LoRA weights: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''} (DoRA, LoKr and bias LoRAs are not supported)")
    broken = [m for m, parts in found.items() if "down" not in parts or "up" not in parts]
    if broken:
        raise LoraError(f"modules with only one of the two LoRA matrices: {', '.join(broken[:5])}")
    return {m: (p["down"], p["up"], float(p["alpha"]) if "alpha" in p else None) for m, p in found.items()}


def _read_diffusers(tensors, header) -> dict[str, LoraModule]:
    prefixes = ("transformer.", "base_model.model.")
    non_transformer = [k for k in tensors if not k.startswith(prefixes)]
    if non_transformer:
        raise LoraError(f"it has weights for other models than the transformer ({non_transformer[0]}, ...); "
                        "only transformer LoRAs are handled")
    stripped = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                stripped[k[len(p):]] = v
    down, up = ("lora_down", "lora_up") if any(".lora_down." in k for k in stripped) else ("lora_A", "lora_B")
    config = _adapter_config(header)
    modules = {}
    for name, (d, u, alpha) in _pairs(stripped, down, up).items():
        if alpha is None:
            alpha = _configured_alpha(name, d.shape[0], config)
        modules[name] = LoraModule(d.float(), u.float(), alpha)
    return modules


def _adapter_config(header) -> dict:
    raw = header.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"its `{ADAPTER_METADATA_KEY}` header is not valid JSON") from None
    return {k.removeprefix("transformer."): v for k, v in packed.items()}


def _configured_alpha(name: str, rank: int, config: dict) -> float:
    """peft's rule: alpha_pattern keys match a module name's tail; else lora_alpha; without a
    config, diffusers loads with alpha == rank (scale 1)."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return float(rank)


def _read_original(tensors, kohya: bool) -> dict[str, tuple]:
    """{original module name (dotted): (down, up, alpha)}, alpha defaulting to rank."""
    if kohya:
        pairs = _pairs(tensors, "lora_down", "lora_up")
        named = {}
        for key, value in pairs.items():
            name = _kohya_to_original(key)
            if name is None:
                raise LoraError(f"module {key} is not one of the transformer blocks' layers this tool converts")
            named[name] = value
    else:
        stripped = {k.removeprefix("diffusion_model."): v for k, v in tensors.items()}
        down, up = ("lora_down", "lora_up") if any(".lora_down." in k for k in stripped) else ("lora_A", "lora_B")
        named = _pairs(stripped, down, up)
    out = {}
    for name, (d, u, alpha) in named.items():
        if not _ORIGINAL_NAME.match(name):
            raise LoraError(f"module {name} is outside the transformer blocks; this tool converts block layers only")
        out[name] = (d.float(), u.float(), alpha if alpha is not None else float(d.shape[0]))
    return out


def _kohya_to_original(key: str) -> str | None:
    m = _KOHYA_NAME.match(key)
    if not m:
        return None
    kind = "single" if m[1] == "single_blocks" else "double"
    for arch in ARCHS:
        for _, original in LAYOUT[arch][kind]:
            if original.replace(".", "_") == m[3]:
                return f"{m[1]}.{m[2]}.{original}"
    return None


def _arch_from_header(header) -> str | None:
    base = header.get("fluxtune.base_class", "")
    spec = header.get("modelspec.architecture", "").lower()
    if base.startswith("Flux2") or spec.startswith("flux-2"):
        return "flux2"
    if base == "FluxTransformer2DModel" or spec.startswith("flux-1"):
        return "flux1"
    return None


_FLUX1_ONLY = re.compile(r"\.(proj_mlp|proj_out|norm1\.linear|norm1_context\.linear|norm\.linear|ff\.net\.|ff_context\.net\.)")
_FLUX2_ONLY = re.compile(r"\.(attn\.to_qkv_mlp_proj|attn\.to_out$|ff\.linear_|ff_context\.linear_)")


def _arch_from_modules(modules) -> str | None:
    names = list(modules)
    if any(_FLUX2_ONLY.search(n) for n in names):
        return "flux2"
    if any(_FLUX1_ONLY.search(n) for n in names) or any(n.startswith("single_transformer_blocks.") and ".attn.to_q" in n
                                                        for n in names):
        return "flux1"
    return None  # double-block attention only: the same in both, ask


def _arch_from_original(original) -> str | None:
    """Shapes tell: FLUX.1 linear1 is 7x the width (q, k, v, 4x MLP), FLUX.2's 9x (q, k, v, 2x3x
    gated MLP); FLUX.1 img_mlp.0 is 4x, FLUX.2's 6x; only FLUX.1 blocks have modulation layers."""
    for name, (down, up, _) in original.items():
        ratio = up.shape[0] / down.shape[1]
        if name.endswith(("_mod.lin", "modulation.lin")):
            return "flux1"
        if name.endswith(".linear1") or name.endswith("_mlp.0"):
            flux1 = 7 if name.endswith(".linear1") else 4
            flux2 = 9 if name.endswith(".linear1") else 6
            if ratio in (flux1, flux2):
                return "flux1" if ratio == flux1 else "flux2"
        if name.endswith(".linear2"):
            ratio = down.shape[1] / up.shape[0]
            if ratio in (5, 4):
                return "flux1" if ratio == 5 else "flux2"
    return None


def _unfuse(original: dict[str, tuple], arch: str) -> dict[str, LoraModule]:
    """Original-layout modules to diffusers modules; a fused one is split exactly."""
    lookup = {}
    for kind, (ours, theirs) in _BLOCKS.items():
        for parts, orig in LAYOUT[arch][kind]:
            lookup[(theirs, orig)] = (ours, parts)
    modules = {}
    for name, (down, up, alpha) in original.items():
        m = _ORIGINAL_NAME.match(name)
        if (m[1], m[3]) not in lookup:
            raise LoraError(f"module {name} has no counterpart in a {arch} transformer")
        ours, parts = lookup[(m[1], m[3])]
        prefix = f"{ours}.{m[2]}."
        if len(parts) == 1:
            modules[prefix + parts[0]] = LoraModule(down, up, alpha)
            continue
        for part, module in zip(parts, _split_fused(down, up, alpha, _part_sizes(parts, down, up))):
            if module is not None:
                modules[prefix + part] = module
    return modules


def _part_sizes(parts, down, up) -> list[int]:
    """Output rows of each part: q, k and v are the model width (= the input width); the rest of
    a FLUX.1 linear1 is the MLP."""
    width = down.shape[1]
    sizes = [width] * len(parts)
    if parts[-1] == "proj_mlp":
        sizes[-1] = up.shape[0] - 3 * width
    if sum(sizes) != up.shape[0] or min(sizes) <= 0:
        raise LoraError(f"a fused LoRA of shape {tuple(up.shape)}x{tuple(down.shape)} does not split into {parts}")
    return sizes


def _split_fused(down, up, alpha, sizes) -> list[LoraModule | None]:
    """Exact split. A block-diagonal up (what fused exports write) gives each part its own rank;
    otherwise each part keeps the whole down and its rows of up. A part whose rows are all zero
    was not trained: None."""
    n, rank = len(sizes), down.shape[0]
    rows = torch.split(up, sizes, dim=0)
    if rank % n == 0:
        r = rank // n
        blocks = [row[:, i * r:(i + 1) * r] for i, row in enumerate(rows)]
        if all(torch.count_nonzero(row).item() == torch.count_nonzero(b).item() for row, b in zip(rows, blocks)):
            scale = alpha / rank
            return [None if not torch.any(b) else LoraModule(down[i * r:(i + 1) * r], b.contiguous(), scale * r)
                    for i, b in enumerate(blocks)]
    return [None if not torch.any(row) else LoraModule(down, row.contiguous(), alpha) for row in rows]


# ---------------------------------------------------------------------------------------------
# Writing

def to_state_dict(adapter: Adapter, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of `adapter` in layout `fmt`. Header: the adapter's metadata, the format,
    and a content hash of the tensors."""
    if fmt not in FORMATS:
        raise LoraError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "diffusers":
        tensors, header = _diffusers_tensors(adapter)
    else:
        kohya = fmt == "kohya" or adapter.arch == "flux1"
        tensors = _original_tensors(adapter, kohya=kohya)
        header = {}
    header = {**adapter.metadata, **header, "format": "pt", "fluxtune.format": fmt}
    header["modelspec.hash_sha256"] = content_hash(tensors)
    return tensors, header


def write_lora(adapter: Adapter, path: str | Path, fmt: str = "diffusers") -> Path:
    """Write atomically (temporary file, then rename); the parent folder is created."""
    from safetensors.torch import save_file

    tensors, header = to_state_dict(adapter, fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in key order (name, dtype, shape, bytes): the same weights give
    the same hash whatever the header says."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _diffusers_tensors(adapter: Adapter):
    """With one rank and alpha throughout, the adapter config goes in the header as diffusers
    writes it; otherwise each module's scale is folded into its up matrix and the header has no
    config, which diffusers reads as alpha == rank for every module."""
    ranks_alphas = {(m.rank, m.alpha) for m in adapter.modules.values()}
    uniform = len(ranks_alphas) == 1
    tensors = {}
    for name, m in sorted(adapter.modules.items()):
        tensors[f"transformer.{name}.lora_A.weight"] = m.down.contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = (m.up if uniform else m.up * m.scale).contiguous()
    header = {}
    if uniform:
        rank, alpha = ranks_alphas.pop()
        config = {"transformer.r": rank, "transformer.lora_alpha": alpha,
                  "transformer.target_modules": sorted(adapter.modules)}
        header[ADAPTER_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, header


def _original_tensors(adapter: Adapter, kohya: bool) -> dict[str, torch.Tensor]:
    fused = _fuse(adapter)
    tensors = {}
    for name, (down, up, alpha) in sorted(fused.items()):
        if kohya:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:  # no alpha key: the scale goes into up
            tensors[f"diffusion_model.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"diffusion_model.{name}.lora_B.weight"] = (up * (alpha / down.shape[0])).contiguous()
    return tensors


def _fuse(adapter: Adapter) -> dict[str, tuple]:
    """{original module: (down, up, alpha)}; several diffusers modules fused into one exactly."""
    groups: dict[str, dict[str, LoraModule]] = {}
    where: dict[str, tuple] = {}
    unplaced = []
    for name, module in adapter.modules.items():
        m = _BLOCK_NAME.match(name)
        kind = "single" if m and m[1] == "single_transformer_blocks" else "double"
        entry = next(((parts, orig) for parts, orig in LAYOUT[adapter.arch][kind] if m and m[3] in parts), None)
        if entry is None:
            unplaced.append(name)
            continue
        parts, orig = entry
        target = f"{_BLOCKS[kind][1]}.{m[2]}.{orig}"
        groups.setdefault(target, {})[m[3]] = module
        where[target] = parts
    if unplaced:
        raise LoraError(f"modules {', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''} have no place in the "
                        "original layout (only transformer-block layers convert); export in the diffusers format")
    return {target: _fuse_parts(where[target], group) for target, group in groups.items()}


def _fuse_parts(parts, group: dict[str, LoraModule]) -> tuple:
    """Stack down matrices, place up matrices block-diagonally, each part padded to one rank r.
    Missing parts are zero blocks. With one scale throughout, alpha keeps it (alpha = scale * n*r);
    otherwise each part's scale goes into its up block and alpha = n*r (scale 1)."""
    if len(parts) == 1:
        m = group[parts[0]]
        return m.down, m.up, m.alpha
    present = list(group.values())
    width = present[0].down.shape[1]
    out_sizes = []
    for part in parts:
        if part in group:
            out_sizes.append(group[part].up.shape[0])
        else:  # q, k, v are the model width; FLUX.1's MLP part is 4x (its fixed mlp_ratio)
            out_sizes.append(4 * width if part == "proj_mlp" else width)
    r = max(m.rank for m in present)
    scales = {m.scale for m in present}
    same_scale = len(scales) == 1
    down = torch.zeros(len(parts) * r, width, dtype=present[0].down.dtype)
    up = torch.zeros(sum(out_sizes), len(parts) * r, dtype=present[0].up.dtype)
    row = 0
    for i, (part, size) in enumerate(zip(parts, out_sizes)):
        if part in group:
            m = group[part]
            down[i * r: i * r + m.rank] = m.down
            up[row: row + size, i * r: i * r + m.rank] = m.up if same_scale else m.up * m.scale
        row += size
    alpha = (scales.pop() if same_scale else 1.0) * len(parts) * r
    return down, up, alpha


def delta_close(a: Adapter, b: Adapter, atol: float = 1e-5) -> list[str]:
    """Modules whose weight change differs between two adapters (missing on one side included)."""
    bad = sorted(set(a.modules) ^ set(b.modules))
    for name in set(a.modules) & set(b.modules):
        if not torch.allclose(a.modules[name].delta(), b.modules[name].delta(), atol=atol, rtol=0):
            bad.append(name)
    return bad


def parse_weighted(arg: str) -> tuple[str, float]:
    """`path` or `path:weight` (the suffix counts only when it is a number, so paths with colons work)."""
    head, sep, tail = arg.rpartition(":")
    if sep:
        try:
            value = float(tail)
        except ValueError:
            return arg, 1.0
        if not math.isfinite(value):
            raise LoraError(f"{arg}: the weight after ':' must be a finite number")
        return head, value
    return arg, 1.0


def adapter_from_model(transformer: torch.nn.Module, arch: str, adapter_name: str = "default") -> Adapter:
    """The LoRA attached to a live peft-adapted transformer, as an Adapter (weights copied to fp32)."""
    modules = {}
    for name, layer in transformer.named_modules():
        lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        down = lora_a[adapter_name].weight.detach().float().cpu().clone()
        up = lora_b[adapter_name].weight.detach().float().cpu().clone()
        # peft keeps the scale; alpha = scale * rank recovers what the config said
        modules[name] = LoraModule(down, up, layer.scaling[adapter_name] * down.shape[0])
    if not modules:
        raise LoraError(f"the model has no LoRA adapter named {adapter_name!r}")
    return Adapter(modules, arch)
