"""Time LoRA training steps of a FLUX transformer; print throughput, memory, FLOPs and MFU.

    python -m fluxtune.cli make-tiny flux2-klein /tmp/k
    python scripts/bench_train.py --model /tmp/k --resolution 256 --steps 20
    python scripts/bench_train.py --arch flux1-dev --layers-scale 0.05 --resolution 256 --steps 3   # CPU-sized
    python scripts/bench_train.py --arch flux1-dev --resolution 1024 --checkpointing --json bench.json  # GPU
    python scripts/bench_train.py --arch flux1-dev --resolution 1024 --checkpointing --quantize nf4    # GPU

--model takes a diffusers pipeline folder (or hub id); --arch builds the official transformer config
of a real model with random weights (nothing is downloaded), and --layers-scale shrinks its depth while
keeping its width. Inputs are random tensors shaped like the trainer's cached latents and text
embeddings; each step is the trainer's own: family.pack -> flow noise -> family.predict -> flow_loss
-> backward -> AdamW. On CUDA: bf16 weights, fp32 LoRA, bf16 autocast. FLOPs: see step_flops.
--quantize loads the base the way training does (model.quantize): with --arch the random weights are
first written as a transformer checkpoint in a temporary folder, then loaded through the family.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

from fluxtune.training import flow
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_lora, resolve_targets
from fluxtune.models.quantize import enable_input_grads, require_quantization

# Official transformer configs. FLUX.2 fields left out (mlp_ratio=3.0, rope_theta=2000, eps=1e-6,
# timestep_guidance_channels=256, patch_size=1) are diffusers' Flux2Transformer2DModel defaults, which
# match BFL's reference parameters for dev and both klein sizes. The text-encoder configs are only
# read by the family to choose prompt layers: Mistral-Small-3.1 (5120 wide, 40 layers), Qwen3-4B
# (2560, 36), Qwen3-8B (4096, 36); three of their layers make joint_attention_dim.
_FLUX1 = dict(in_channels=64, num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
              joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))


def _flux2(double: int, single: int, heads: int, joint: int, guidance: bool) -> dict:
    return dict(in_channels=128, attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32), num_layers=double,
                num_single_layers=single, num_attention_heads=heads, joint_attention_dim=joint, guidance_embeds=guidance)


def _text(hidden: int, layers: int) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers}


# name -> (pipeline class in model_index.json, transformer config, text encoder config)
ARCHS = {
    "flux1-dev": ("FluxPipeline", {**_FLUX1, "guidance_embeds": True}, None),
    "flux1-schnell": ("FluxPipeline", {**_FLUX1, "guidance_embeds": False}, None),
    "flux2-dev": ("Flux2Pipeline", _flux2(8, 48, 48, 15360, True), {"text_config": _text(5120, 40)}),
    "flux2-klein-4b": ("Flux2KleinPipeline", _flux2(5, 20, 24, 7680, False), _text(2560, 36)),
    "flux2-klein-9b": ("Flux2KleinPipeline", _flux2(8, 24, 32, 12288, False), _text(4096, 36)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers pipeline folder (or hub id)")
    src.add_argument("--arch", choices=sorted(ARCHS), help="official architecture with random weights")
    p.add_argument("--layers-scale", type=float, default=1.0, help="--arch: multiply the block counts (min 1 each)")
    p.add_argument("--resolution", type=int, default=256, help="square image side in pixels, a multiple of 16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (attention preset, alpha = rank)")
    p.add_argument("--text-len", type=int, help="text tokens (default: the family's max_sequence_length)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="base weights (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantize", choices=["none", "nf4", "int8", "fp8"], default="none",
                   help="quantize the base's blocks as model.quantize does (nf4/int8 need CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="device peak for MFU on CUDA (default 989: H100 SXM dense bf16, spec sheet)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.resolution % 16 or args.steps < 1 or args.warmup < 0:
        p.error("--resolution must be a multiple of 16, --steps at least 1, --warmup not negative")
    if args.model and args.layers_scale != 1.0:
        p.error("--layers-scale applies to --arch only")
    try:
        require_quantization(args.quantize, "none")
    except Exception as e:  # e.g. nf4 without a CUDA GPU, or bitsandbytes missing
        p.error(str(e))
    return args


def arch_family(name: str, scale: float, text_len: int | None):
    """The fluxtune family and (scaled) transformer config of an official architecture.

    load_family reads the configs from a throwaway folder holding only them (no weights), so --arch
    runs exactly the family code of --model: pack, predict, guidance, LoRA targets.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = write_arch_configs(name, scale, Path(tmp))
        return load_family(tmp, max_sequence_length=text_len), tcfg


def write_arch_configs(name: str, scale: float, folder: Path) -> dict:
    """model_index.json and the (scaled) transformer and text-encoder configs; returns the transformer's."""
    pipeline, tcfg, text_cfg = ARCHS[name]
    tcfg = {**tcfg, "num_layers": max(1, round(tcfg["num_layers"] * scale)),
            "num_single_layers": max(1, round(tcfg["num_single_layers"] * scale))}
    files = {"model_index.json": {"_class_name": pipeline}, "transformer/config.json": tcfg}
    if text_cfg:
        files["text_encoder/config.json"] = text_cfg
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content), encoding="utf-8")
    return tcfg


def quantized_arch(args, dtype: torch.dtype):
    """--arch with --quantize: random weights written as a checkpoint (on the CPU, in `dtype`), then
    loaded through the family with model.quantize, as a training run loads a real one."""
    family, config = arch_family(args.arch, args.layers_scale, args.text_len)
    with tempfile.TemporaryDirectory() as tmp:
        write_arch_configs(args.arch, args.layers_scale, Path(tmp))
        random_transformer(family, config, torch.device("cpu"), dtype).save_pretrained(Path(tmp) / "transformer")
        family = load_family(tmp, max_sequence_length=args.text_len, dtype=dtype, quantize=args.quantize)
        return family, family.load_transformer(dtype), config


def random_transformer(family, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Built on the meta device, allocated on `device` in `dtype` (FLUX.2-dev in fp32 fits no GPU), and
    filled by tiling one N(0, 0.02) pool: torch's own init takes ~15 s per 0.5B parameters on a 2-core
    CPU, and step time does not depend on the values. (These models have no buffers to fill.)"""
    cls = FluxTransformer2DModel if family.name == "flux1" else Flux2Transformer2DModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device).requires_grad_(False)
    pool = torch.randn(1 << 20, device=device, dtype=dtype) * 0.02
    for param in model.parameters():
        for piece in param.data.view(-1).split(pool.numel()):
            piece.copy_(pool[: piece.numel()])
    return model


def build(args, device: torch.device, dtype: torch.dtype):
    """-> family, transformer with LoRA (train mode), LoRA parameters, a description of the model."""
    if args.arch and args.quantize != "none":
        family, transformer, config = quantized_arch(args, dtype)
        transformer = transformer.to(device)
    elif args.arch:
        family, config = arch_family(args.arch, args.layers_scale, args.text_len)
        transformer = random_transformer(family, config, device, dtype)
    if args.arch:
        full = ARCHS[args.arch][1]
        label = f"{args.arch} architecture, random weights"
        if args.layers_scale != 1.0:
            label += (f", SCALED by --layers-scale {args.layers_scale}: {config['num_layers']} of {full['num_layers']} double"
                      f" + {config['num_single_layers']} of {full['num_single_layers']} single blocks (figures are for this)")
    else:
        family = load_family(args.model, max_sequence_length=args.text_len, dtype=dtype, quantize=args.quantize)
        transformer = family.load_transformer(dtype).to(device)
        label = f"{args.model} ({family.name})"
    if args.quantize != "none":
        label += f", base quantized {args.quantize}"
    params = add_lora(transformer, rank=args.rank, alpha=args.rank, targets=resolve_targets(family, "attention"))
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
        if args.quantize != "none":
            enable_input_grads(transformer)
    return family, transformer.train(), params, label


def fake_batch(family, transformer, batch: int, resolution: int, device: torch.device):
    """Random latents and text tensors shaped like a batch of the family's cache entries."""
    cfg = transformer.config
    if family.name == "flux1":  # VAE latents (C, H/8, W/8), packed 2x2 into in_channels = 4*C
        shape = (batch, cfg.in_channels // 4, resolution // 8, resolution // 8)
    else:  # already patchified 2x2: (in_channels, H/16, W/16)
        shape = (batch, cfg.in_channels, resolution // 16, resolution // 16)
    text = {"prompt_embeds": torch.randn(batch, family.max_sequence_length, cfg.joint_attention_dim, device=device)}
    if family.name == "flux1":
        text["pooled_prompt_embeds"] = torch.randn(batch, cfg.pooled_projection_dim, device=device)
    return torch.randn(shape, device=device), text


def train_step(family, transformer, optimizer, latents, text, generator, precision) -> None:
    x0 = family.pack(latents)
    noise = torch.randn_like(x0)
    sigmas = flow.sample_sigmas(x0.shape[0], mode="logit_normal", generator=generator).to(x0.device)
    noisy = flow.add_noise(x0, noise, sigmas)
    with precision:
        pred = family.predict(transformer, latents, noisy, sigmas, text, family.default_guidance)
    flow.flow_loss(pred, flow.velocity_target(x0, noise)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# For each Linear of a FLUX transformer, first match wins: what passes through it (image tokens, text
# tokens, one vector per sample) and whether backward goes through it. Modulation and the timestep /
# guidance / pooled-text embedders run once per sample; the double blocks' context stream sees text
# tokens, single blocks all tokens; input embedders and per-sample layers get no gradient.
_ROW_RULES = [  # (pattern, (image, text, per-sample) weights, backward)
    (r"^time_|_modulation|(^|\.)norm(1|1_context|_out)?\.linear", (0, 0, 1), False),
    (r"^context_embedder", (0, 1, 0), False),
    (r"^x_embedder", (1, 0, 0), False),
    (r"\.(add_[qkv]_proj|to_add_out|ff_context)\b", (0, 1, 0), True),
    (r"^single_transformer_blocks\.", (1, 1, 0), True),
    (r"^(proj_out|transformer_blocks\.)", (1, 0, 0), True),
]


def _linear_rule(name: str, image_tokens: int, text_tokens: int) -> tuple[int, bool]:
    for pattern, (img, txt, one), backward in _ROW_RULES:
        if re.search(pattern, name):
            return img * image_tokens + txt * text_tokens + one, backward
    raise ValueError(f"step_flops has no rule for Linear {name!r}: extend _ROW_RULES")


def step_flops(transformer, image_tokens: int, text_tokens: int, batch: int = 1, checkpointing: bool = False) -> dict:
    """Matmul FLOPs of one LoRA training step, counted from the model's modules.

    Forward: 2*in*out per Linear per row through it, plus joint attention 4*L^2*hidden per block
    (QK^T and PV). Backward: frozen Linears need input gradients only (1x their forward), LoRA
    Linears and attention two products per forward one (2x). "model" leaves out the recomputation
    of gradient checkpointing (the MFU convention); "hardware" adds it (one more forward).
    Checked against torch's FlopCounterMode on a real step: within 0.4% for full FLUX.1-dev, klein-4B
    and FLUX.2-dev (run on the meta device), up to 6% high on 1+1-block models (it still counts input
    gradients for the first block's q/k/v, which need none).
    """
    forward = backward = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            rows, needs_grad = _linear_rule(name, image_tokens, text_tokens)
            flops = 2 * module.in_features * module.out_features * rows
            forward += flops
            backward += (2 if ".lora_" in name else 1) * flops if needs_grad else 0
    cfg = transformer.config
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    attention = 4 * (image_tokens + text_tokens) ** 2 * cfg.num_attention_heads * cfg.attention_head_dim * blocks
    forward, model = batch * (forward + attention), batch * (forward + backward + 3 * attention)
    return {"forward": forward, "model": model, "hardware": model + forward if checkpointing else model}


def time_steps(step, count: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    for _ in range(count):
        sync()
        tick = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - tick)
    return times


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak torch.cuda.max_memory_allocated"
    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, "peak RSS of the process (ru_maxrss)"


def report(f: dict) -> None:
    recompute = f", {f['hardware_flops_per_step']:.3e} with recompute" if f["checkpointing"] else ""
    lines = [
        f"device      {f['device']}, {f['dtype']} weights"
        f"{'' if f.get('quantize', 'none') == 'none' else ', blocks ' + f['quantize']}, fp32 LoRA",
        f"model       {f['model']}",
        f"params      {f['params_total'] / 1e6:.4g}M total, {f['params_lora'] / 1e6:.4g}M LoRA (rank {f['rank']}, attention)",
        f"input       {f['resolution']}x{f['resolution']}, batch {f['batch']}, {f['image_tokens']} image + {f['text_tokens']}"
        f" text tokens/sample{', gradient checkpointing' if f['checkpointing'] else ''}",
        f"time        {f['mean_s_per_step']:.4f} s/step mean, {f['median_s_per_step']:.4f} median ({f['steps']} timed after"
        f" {f['warmup']} warm-up); {f['steps_per_s']:.3f} steps/s, {f['images_per_s']:.3f} images/s",
        f"memory      {f['peak_memory_bytes'] / 2**30:.2f} GiB {f['peak_memory_kind']}",
        f"FLOPs/step  {f['model_flops_per_step']:.3e} model (forward {f['forward_flops']:.3e}{recompute});"
        f" achieved {f['achieved_tflops']:.3f} TFLOP/s",
    ]
    if f["mfu"] is not None:
        lines.append(f"MFU         {100 * f['mfu']:.1f}% of {f['peak_tflops']:g} TFLOP/s (spec-sheet peak, --peak-tflops)")
    print("\n".join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    family, transformer, params, label = build(args, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents, text = fake_batch(family, transformer, args.batch, args.resolution, device)
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(0)

    def step():
        train_step(family, transformer, optimizer, latents, text, generator, precision)

    time_steps(step, args.warmup, device)
    times = time_steps(step, args.steps, device)
    image_tokens, text_tokens = family.pack(latents).shape[1], family.max_sequence_length
    flops = step_flops(transformer, image_tokens, text_tokens, args.batch, args.checkpointing)
    mean = statistics.mean(times)
    achieved = flops["model"] / mean / 1e12
    memory, memory_kind = peak_memory(device)
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end",
        "dtype": dtype_name, "quantize": args.quantize, "model": label, "arch": args.arch, "layers_scale": args.layers_scale,
        "params_total": sum(p.numel() for p in transformer.parameters()), "params_lora": sum(p.numel() for p in params),
        "rank": args.rank, "resolution": args.resolution, "batch": args.batch, "checkpointing": args.checkpointing,
        "image_tokens": image_tokens, "text_tokens": text_tokens, "steps": args.steps, "warmup": args.warmup,
        "step_times_s": times, "mean_s_per_step": mean, "median_s_per_step": statistics.median(times),
        "steps_per_s": 1 / mean, "images_per_s": args.batch / mean, "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind, "forward_flops": flops["forward"], "model_flops_per_step": flops["model"],
        "hardware_flops_per_step": flops["hardware"], "achieved_tflops": achieved, "peak_tflops": args.peak_tflops,
        "mfu": achieved / args.peak_tflops if device.type == "cuda" else None,
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


if __name__ == "__main__":
    main()
