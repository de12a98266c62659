"""Predicted (fluxtune.plan) vs measured peak memory of a LoRA training step.

    python scripts/plan_check.py               # CPU: medium FLUX.1- and FLUX.2-shaped models, fp32 (~30 s)
    python scripts/plan_check.py --bf16        # the same with bf16 weights under autocast (slow on CPU)
    python scripts/plan_check.py --calibrate   # re-derive fluxtune.plan.ACTIVATIONS (~5 minutes)
    python scripts/plan_check.py --real        # CUDA: real-size architectures, random bf16 weights

A model is a random-weight transformer of the given shape (scripts/bench_train.py builds it); the
step is the trainer's own (pack, noise, predict, flow loss, backward, optimizer step), measured at
its second run so the optimizer state exists, as in every later step. The prediction comes from
`fluxtune.plan.plan` on a config whose model.path is a folder holding only the model's config files.

How peaks are measured. On CUDA: torch.cuda.max_memory_allocated. On CPU there is no allocator
counter, so `cpu_step_peak` runs the step under torch.profiler with profile_memory=True, which
records every allocation and free of torch's CPU allocator (parameters, saved activations,
gradients, kernel workspaces) with its size and time; the running sum of those records is the
live-bytes curve, its maximum the step's peak above the bytes live before it. That is what the CUDA
counter counts (tensor bytes, no CUDA context), it is deterministic, and unlike the process RSS it
is not blurred by malloc caching, freed-but-kept pages or the page cache, so models of a few
hundred MB are enough and a test can assert on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxtune.config import build_config
from fluxtune.families import load_family
from fluxtune.lora import add_lora, resolve_targets
from fluxtune.optim import make_optimizer
from fluxtune.plan import ACTIVATIONS, CUDA_OVERHEAD, GIB, PerToken, image_tokens, plan


def _sibling(name: str):
    """A script beside this one, importable also when a test loads this file by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _sibling("bench_train")


def medium(pipeline: str, double: int, single: int, heads: int = 4) -> tuple[str, dict, dict | None]:
    """A FLUX.1- or FLUX.2-shaped transformer 128*heads wide: real head size, MLP ratio and block
    layout, few blocks. FLUX.2 gets a small text-encoder config (the family reads its width)."""
    if pipeline == "FluxPipeline":
        tcfg = {**bench.ARCHS["flux1-dev"][1], "joint_attention_dim": 1024}
        text = None
    else:
        tcfg = {**bench.ARCHS["flux2-klein-4b"][1], "joint_attention_dim": 3 * 256}
        text = {"hidden_size": 256, "num_hidden_layers": 6}
    return pipeline, {**tcfg, "num_layers": double, "num_single_layers": single, "num_attention_heads": heads}, text


def write_configs(folder: Path, files: dict[str, dict]) -> Path:
    """A checkpoint folder with config files only (no weights): what the planner reads."""
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content), encoding="utf-8")
    return folder


@dataclass
class Case:
    arch: tuple[str, dict, dict | None]  # (pipeline class, transformer config, text encoder config)
    resolution: int = 256
    text_tokens: int = 64
    batch: int = 1
    checkpointing: bool = False
    precision: str = "no"  # mixed_precision: "no" (fp32) or "bf16"
    optimizer: str = "adamw"

    def label(self) -> str:
        pipeline, t, _ = self.arch
        return (f"{pipeline[:-8]} {t['num_attention_heads'] * 128}w {t['num_layers']}+{t['num_single_layers']} "
                f"{self.resolution}px T{self.text_tokens} b{self.batch} {'ckpt' if self.checkpointing else 'full'} "
                f"{'fp32' if self.precision == 'no' else self.precision}")

    def config(self, folder: Path):
        pipeline, tcfg, text = self.arch
        files = {"model_index.json": {"_class_name": pipeline}, "transformer/config.json": tcfg}
        if text:
            files["text_encoder/config.json"] = text
        write_configs(folder, files)
        return build_config({
            "output_dir": str(folder / "out"),
            "model": {"path": str(folder), "max_sequence_length": self.text_tokens},
            "data": {"path": str(folder), "resolution": self.resolution},
            "lora": {"rank": 16, "targets": "attention"}, "optim": {"name": self.optimizer},
            "train": {"batch_size": self.batch, "gradient_checkpointing": self.checkpointing,
                      "mixed_precision": self.precision},
        })


@dataclass
class Result:
    case: Case
    predicted: int  # training step: weights + LoRA + gradients + optimizer state + activations
    measured: int
    predicted_dynamic: int  # gradients + activations: what the step allocates above the static bytes
    measured_dynamic: int

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


def cpu_step_peak(step) -> int:
    """Peak bytes above the starting point while `step()` runs on CPU (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def cuda_step_peak(step) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages: bitsandbytes' optimizers share one quantization map among all
    parameters' states."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def measure(case: Case, device: torch.device) -> tuple[int, int]:
    """(bytes live before the step: weights, LoRA, optimizer state; peak bytes the step adds)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = case.config(Path(tmp))
        family = load_family(cfg.model.path, max_sequence_length=case.text_tokens)
    dtype = torch.float32 if case.precision == "no" else torch.bfloat16
    torch.manual_seed(0)
    transformer = bench.random_transformer(family, case.arch[1], device, dtype)
    params = add_lora(transformer, rank=cfg.lora.rank, alpha=cfg.lora.rank, targets=resolve_targets(family, "attention"))
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = make_optimizer(params, cfg.optim.name, lr=1e-4, weight_decay=0.0, **cfg.optim.own_settings())
    latents, text = bench.fake_batch(family, transformer, case.batch, case.resolution, device)
    precision = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    generator = torch.Generator().manual_seed(0)

    def step():
        bench.train_step(family, transformer, optimizer, latents, text, generator, precision)

    step()  # the first step creates the optimizer state
    static = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    static += sum(tensor_bytes(state.values()) for state in optimizer.state.values())
    dynamic = cuda_step_peak(step) if device.type == "cuda" else cpu_step_peak(step)
    return static, dynamic


def check(case: Case, device: torch.device | None = None) -> Result:
    device = device or torch.device("cpu")
    static, dynamic = measure(case, device)
    with tempfile.TemporaryDirectory() as tmp:
        p = plan(case.config(Path(tmp)))
    rows = p.phases["training"]
    predicted = sum(rows.values()) - CUDA_OVERHEAD  # a step's tensors: neither counter sees the context
    dynamic_rows = [v for k, v in rows.items() if k.startswith(("LoRA gradients", "activations"))]
    return Result(case, predicted, static + dynamic, sum(dynamic_rows), dynamic)


def default_cases(precision: str = "no") -> list[Case]:
    """Other widths, depths, resolutions and batches than the calibration used."""
    cases = []
    for pipeline in ("FluxPipeline", "Flux2KleinPipeline"):
        arch = medium(pipeline, 2, 2, heads=5)
        for checkpointing in (False, True):
            cases.append(Case(arch, resolution=320, text_tokens=128, checkpointing=checkpointing, precision=precision))
        cases.append(Case(medium(pipeline, 1, 2, heads=4), resolution=256, text_tokens=96, batch=2, precision=precision))
    return cases


def print_results(results: list[Result]) -> None:
    mib = 2**20
    print(f"{'case':<46}{'predicted':>11}{'measured':>11}{'error':>8}   {'step adds: predicted':>20}{'measured':>10}")
    for r in results:
        print(f"{r.case.label():<46}{r.predicted / mib:>9.1f}Mi{r.measured / mib:>9.1f}Mi{100 * r.error:>+7.1f}%"
              f"   {r.predicted_dynamic / mib:>18.1f}Mi{r.measured_dynamic / mib:>8.1f}Mi", flush=True)


# ---------------------------------------------------------------------------- calibration


def calibrate(pipeline: str, precision: str) -> PerToken:
    """Least squares over 1-2 double and 1-2 single blocks: what the step adds per (token x hidden x
    sample), as a sum over blocks plus a constant. LoRA gradients are not taken out: most of them are
    allocated while backward frees activations, after the peak (the plan lists them apart anyway)."""
    full, ckpt = [], []
    for double, single in ((1, 1), (2, 1), (1, 2), (2, 2)):
        for checkpointing, rows in ((False, full), (True, ckpt)):
            case = Case(medium(pipeline, double, single), checkpointing=checkpointing, precision=precision)
            _, dynamic = measure(case, torch.device("cpu"))
            tokens = image_tokens(case.resolution) + case.text_tokens
            per_unit = dynamic / (case.batch * tokens * 128 * case.arch[1]["num_attention_heads"])
            rows.append(([double + single, 1] if checkpointing else [double, single, 1], per_unit))
            print(f"  {case.label()}: step adds {dynamic / 2**20:.1f} MiB, {per_unit:.2f} B per token x hidden", flush=True)
    return PerToken(*_lstsq(full), *_lstsq(ckpt))


def _lstsq(rows) -> list[float]:
    a = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    b = torch.tensor([[r[1]] for r in rows], dtype=torch.float64)
    return [round(v, 1) for v in torch.linalg.lstsq(a, b).solution.flatten().tolist()]


# ---------------------------------------------------------------------------- real sizes (CUDA)


def real_cases() -> list[Case]:
    """Real architectures at bf16, sized for one 80 GB GPU (FLUX.2-dev's 64 GB of weights plus
    activations only fits at 512 px with checkpointing)."""
    archs = bench.ARCHS
    return [
        Case(archs["flux1-dev"], resolution=512, text_tokens=512, checkpointing=True, precision="bf16"),
        Case(archs["flux1-dev"], resolution=1024, text_tokens=512, checkpointing=True, precision="bf16"),
        Case(archs["flux1-dev"], resolution=512, text_tokens=512, checkpointing=False, precision="bf16"),
        Case(archs["flux2-klein-4b"], resolution=1024, text_tokens=512, checkpointing=False, precision="bf16"),
        Case(archs["flux2-klein-9b"], resolution=1024, text_tokens=512, checkpointing=True, precision="bf16"),
        Case(archs["flux2-dev"], resolution=512, text_tokens=512, checkpointing=True, precision="bf16"),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bf16", action="store_true", help="medium models with bf16 weights under autocast")
    mode.add_argument("--calibrate", action="store_true", help="measure the per-token activation constants")
    mode.add_argument("--real", action="store_true", help="real-size architectures on a CUDA GPU")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # small ops: thread hand-offs cost more than they save
    if args.calibrate:
        for pipeline, family in (("FluxPipeline", "flux1"), ("Flux2KleinPipeline", "flux2")):
            for precision, key in (("no", "fp32"), ("bf16", "bf16")):
                print(f"{family} {key} (in fluxtune.plan now: {ACTIVATIONS[(family, key)]})", flush=True)
                print(f"    ({family!r}, {key!r}): {calibrate(pipeline, precision)!r},", flush=True)
        return
    if args.real:
        if not torch.cuda.is_available():
            sys.exit("--real needs a CUDA GPU")
        results = [check(case, torch.device("cuda")) for case in real_cases()]
        print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB")
    else:
        results = [check(case) for case in default_cases("bf16" if args.bf16 else "no")]
    print_results(results)


if __name__ == "__main__":
    main()
