"""Predicted (fluxtune.plan) vs measured peak memory of a LoRA training step.

    python scripts/plan_check.py               # CPU: medium FLUX.1- and FLUX.2-shaped models, fp32 (~30 s)
    python scripts/plan_check.py --bf16        # the same with bf16 weights under autocast (slow on CPU)
    python scripts/plan_check.py --calibrate   # re-derive fluxtune.models.memory.ACTIVATIONS (~5 minutes)
    python scripts/plan_check.py --real        # CUDA: real-size architectures, random bf16 weights
    python scripts/plan_check.py --sharded     # train.sharding=fsdp: 2 CPU processes over gloo, per rank (~35 s)

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

Sharded (`check_sharded`, --sharded): the same model and step on each of N CPU processes over gloo
(this script, started once per rank with torchrun's environment), the base split by
fluxtune.models.sharding.shard_base (FSDP2) and the LoRA gradients averaged before the optimizer step, as
train.sharding=fsdp trains. Each rank measures its peak from the same profiler records, with their
addresses and enclosing ops, which also say what FSDP held at the peak (per unit: gathered weights,
all-gather buffers) and in which phase it falls; gloo's own scratch buffers, which NCCL does not
have, are left out (`fsdp_step_peak`). Each rank is compared with the plan for fsdp_gpus=N, and
the single-process step of the same case is measured too, for contrast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxtune.config import build_config
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_lora, resolve_targets
from fluxtune.training.optim import make_optimizer
from fluxtune.models.memory import ACTIVATIONS, CUDA_OVERHEAD, GIB, PerToken, image_tokens
from fluxtune.plan import plan


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

    def config(self, folder: Path, sharding: str = "none"):
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
                      "mixed_precision": self.precision, "sharding": sharding},
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
    transformer, optimizer, step = model_and_step(case, device)
    static = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    static += sum(tensor_bytes(state.values()) for state in optimizer.state.values())
    dynamic = cuda_step_peak(step) if device.type == "cuda" else cpu_step_peak(step)
    return static, dynamic


def model_and_step(case: Case, device: torch.device, sharding: str = "none"):
    """The case's random model with its LoRA and optimizer, and the trainer's step; with sharding
    "fsdp" (in a process of an initialized process group) the base is split by
    fluxtune.models.sharding.shard_base and the LoRA gradients averaged before the optimizer step, as
    the trainer does. Runs the first step (which creates the optimizer state); returns
    (transformer, optimizer, step)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = case.config(Path(tmp), sharding=sharding)
        family = load_family(cfg.model.path, max_sequence_length=case.text_tokens)
    dtype = torch.float32 if case.precision == "no" else torch.bfloat16
    torch.manual_seed(0)  # the same weights and batch on every rank
    transformer = bench.random_transformer(family, case.arch[1], device, dtype)
    params = add_lora(transformer, rank=cfg.lora.rank, alpha=cfg.lora.rank, targets=resolve_targets(family, "attention"))
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, cfg.optim.name, lr=1e-4, weight_decay=0.0, **cfg.optim.own_settings())
    if sharding != "none":
        from fluxtune.models.sharding import shard_base

        shard_base(transformer, params, device)
        optimizer = _AveragingOptimizer(optimizer, params)
    transformer.train()
    latents, text = bench.fake_batch(family, transformer, case.batch, case.resolution, device)
    precision = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    generator = torch.Generator().manual_seed(0)

    def step():
        bench.train_step(family, transformer, optimizer, latents, text, generator, precision)

    step()  # the first step creates the optimizer state
    return transformer, optimizer, step


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


# ---------------------------------------------------------------------------- sharded (train.sharding=fsdp)


@dataclass
class ShardedResult:
    """One rank of a sharded check."""

    case: Case
    rank: int
    processes: int
    predicted: int  # the plan for fsdp_gpus=processes, without the CUDA overhead row
    measured: int  # this rank's shards, LoRA and optimizer state, plus its step's peak
    predicted_dynamic: int  # the plan's gathered weights + LoRA gradients + activations
    measured_dynamic: int  # the peak the sharded step adds on this rank
    predicted_gathered: int  # the plan's "FSDP: gathered weights at the peak" row
    gathered_at_peak: int  # FSDP's gathered weights and all-gather buffers live at the peak
    at_peak: dict[str, int]  # those by unit ("root": everything outside the blocks)
    phase_at_peak: str  # "forward", "backward" or "after backward" (gradient averaging, optimizer)
    phases: dict[str, tuple[int, int]]  # each phase's own peak and the FSDP bytes then
    gloo_temporaries: int  # the largest gloo collective scratch buffer, left out of the peak (fsdp_step_peak)
    unbalanced: int  # bytes still counted live after the step: 0 when the profile saw every free
    single_dynamic: int | None = None  # the peak the same step adds in one process, unsharded

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1

    @property
    def fsdp_extra(self) -> int | None:
        """What sharding adds to the step's peak: its measured peak less the unsharded step's."""
        return None if self.single_dynamic is None else self.measured_dynamic - self.single_dynamic


def check_sharded(case: Case, processes: int = 2, compare_single: bool = True) -> list[ShardedResult]:
    """`case` trained sharded over `processes` CPU processes (gloo): one ShardedResult per rank."""
    return check_sharded_cases([case], processes, compare_single)[0]


def check_sharded_cases(cases: list[Case], processes: int = 2, compare_single: bool = True,
                        timeout: float = 600) -> list[list[ShardedResult]]:
    """Several cases in one launch (each process imports torch, diffusers and peft once: most of
    the time on a small machine); per case, one ShardedResult per rank. With `compare_single`, each
    case's single-process step is measured here too (`measure`)."""
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = _launch_workers(cases, processes, Path(tmp), timeout)
        plans = [plan(case.config(Path(tmp) / f"plan{i}", sharding="fsdp"), gpus=processes)
                 for i, case in enumerate(cases)]
    results = []
    for i, (case, p) in enumerate(zip(cases, plans)):
        rows = p.phases["training"]
        predicted = sum(rows.values()) - CUDA_OVERHEAD
        dynamic = sum(v for k, v in rows.items() if k.startswith(("FSDP: gathered", "LoRA gradients", "activations")))
        gathered = sum(v for k, v in rows.items() if k.startswith("FSDP: gathered"))
        single = measure(case, torch.device("cpu"))[1] if compare_single else None
        results.append([ShardedResult(case, rank, processes, predicted, r["static"] + r["dynamic"], dynamic,
                                      r["dynamic"], gathered, sum(r["at_peak"].values()), r["at_peak"], r["phase"],
                                      {k: tuple(v) for k, v in r["phases"].items()}, r["gloo"], r["unbalanced"], single)
                        for rank, r in enumerate(ranks[i] for ranks in per_rank)])
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_workers(cases: list[Case], processes: int, folder: Path, timeout: float) -> list[list[dict]]:
    """Start this script with --sharded-worker once per rank, with the environment torchrun would
    give it (one thread each); per rank, its measurements of the cases."""
    (folder / "cases.json").write_text(json.dumps([dataclasses.asdict(c) for c in cases]), encoding="utf-8")
    env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    procs, logs = [], [folder / f"rank{rank}.log" for rank in range(processes)]
    for rank, log in enumerate(logs):  # output to files: a full pipe would stall a rank, and with it the others
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--sharded-worker", str(folder / "cases.json"),
                 str(folder / f"rank{rank}.json")],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        # A rank that failed or is stuck leaves the others waiting at their next collective.
        if time.monotonic() > deadline or any(proc.poll() not in (None, 0) for proc in procs):
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            break
        time.sleep(0.2)
    if any(proc.returncode != 0 for proc in procs):
        tails = "\n".join(f"--- rank {r} (exit {proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}"
                          for r, (proc, log) in enumerate(zip(procs, logs)))
        raise RuntimeError(f"sharded check over {processes} processes failed or timed out:\n{tails}")
    return [json.loads((folder / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in range(processes)]


def _sharded_worker(cases_file: str, out_file: str) -> None:
    """One rank of --sharded: for each case, build and shard the model, measure its second step."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = []
        for fields in json.loads(Path(cases_file).read_text(encoding="utf-8")):
            step, static = sharded_step(Case(**{**fields, "arch": tuple(fields["arch"])}))
            results.append({"static": static, **fsdp_step_peak(step)})
            del step
            dist.barrier()
        Path(out_file).write_text(json.dumps(results), encoding="utf-8")
    finally:
        dist.destroy_process_group()


class _AveragingOptimizer:
    """The trainer's order under sharding (fluxtune.train): average the LoRA gradients over the
    processes, then step; lets bench.train_step, which calls optimizer.step(), run it."""

    def __init__(self, optimizer, params):
        self.optimizer, self.params, self.state = optimizer, params, optimizer.state

    def step(self):
        from fluxtune.models.sharding import average_gradients

        average_gradients(self.params)
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def local_tensor_bytes(tensors) -> int:
    """tensor_bytes of this process's part: a sharded parameter (a DTensor) counts its local
    shard, whose storage holds FSDP's padding to a multiple of the process count too."""
    from torch.distributed.tensor import DTensor

    return tensor_bytes([t.to_local() if isinstance(t, DTensor) else t for t in tensors])


def sharded_step(case: Case):
    """`measure`'s model and step with the base sharded, in a process of an initialized process
    group; returns (step, bytes live before it on this process)."""
    transformer, optimizer, step = model_and_step(case, torch.device("cpu"), sharding="fsdp")
    static = local_tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    static += sum(tensor_bytes(state.values()) for state in optimizer.state.values())
    return step, static


def fsdp_step_peak(step) -> dict:
    """`cpu_step_peak` for a sharded step, from the profile's allocation records with their
    addresses and enclosing ops, which also say what FSDP held at the peak. Two gloo effects
    that NCCL does not have are corrected, or the peak would differ from run to run and rank to rank:

    - gloo's collectives allocate scratch buffers (inside the c10d::* op and on gloo's worker
      thread, under gloo:*): an all-gather, two as large as its output, a whole unit. NCCL gathers
      in place, so these are left out of the peak; the largest is reported as "gloo".
    - gloo's work object holds the collective's output too, and when the worker thread drops it
      last, the free happens on a thread the profiler does not record: in backward, where FSDP
      drops a unit's all-gather buffer right after copying it out, on some runs it would count
      as live until its address is handed out again. A free missing from the profile (an address
      allocated twice, or still live after the step) is put where FSDP dropped it: at the end of
      that unit's next copy-out for an all-gather buffer, else when the address is reused.
      Bytes still counted live after the step are "unbalanced" (0 when nothing is left unexplained).

    Returns {"dynamic": peak bytes above the start, "at_peak": {unit: bytes of its gathered
    weights or all-gather buffer live at the peak}, "phase": where the peak is, "phases": {phase:
    (its own peak, FSDP's bytes then)} for forward, backward and "after backward" (gradient
    averaging, optimizer step), "gloo": largest scratch buffer, "unbalanced": see above}."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations, copy_outs, backward_starts, backward_ends = [], {}, [], []
    todo = [(root, ()) for root in prof.profiler.kineto_results.experimental_event_tree()]
    while todo:
        event, parents = todo.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.ptr, parents))
            continue
        if event.name.startswith("FSDP::all_gather_copy_out"):
            copy_outs.setdefault(_fsdp_unit((event.name,))[0], []).append(event.end_time_ns)
        elif event.name.startswith("FSDP::pre_backward"):
            backward_starts.append(event.start_time_ns)
        elif event.name.startswith("FSDP::root_post_backward_callback"):
            backward_ends.append(event.end_time_ns)
        todo.extend((child, (*parents, event.name)) for child in event.children)
    allocations.sort(key=lambda a: (a[0], a[1]))

    # Frees the profile missed, put where FSDP dropped the buffer.
    owner, missed = {}, []
    for i, (when, size, ptr, _) in enumerate(allocations):
        if size > 0:
            if ptr in owner:
                missed.append((owner[ptr], when))
            owner[ptr] = i
        else:
            owner.pop(ptr, None)
    missed += [(i, None) for i in owner.values()]
    for i, reused in missed:
        when, size, ptr, parents = allocations[i]
        unit, kind = _fsdp_unit(parents) or (None, None)
        ends = [t for t in copy_outs.get(unit, []) if t > when and (reused is None or t <= reused)]
        free_at = min(ends) if kind == "all-gather buffer" and ends else reused
        if free_at is not None:
            allocations.append((free_at, -size, ptr, parents))
    allocations.sort(key=lambda a: (a[0], a[1]))

    def phase_at(when):
        if not backward_starts or when < min(backward_starts):
            return "forward"
        return "backward" if not backward_ends or when < max(backward_ends) else "after backward"

    live, scratch, owner, phases = 0, set(), {}, {}
    peak, peak_owner, peak_time, gloo = 0, {}, None, 0
    for when, size, ptr, parents in allocations:
        if size > 0 and any(name.startswith(("c10d::", "gloo:")) for name in parents):
            scratch.add(ptr)
            gloo = max(gloo, size)
            continue
        if size < 0 and ptr in scratch:
            scratch.discard(ptr)
            continue
        live += size
        if size > 0:
            owner[ptr] = (size, _fsdp_unit(parents))
        else:
            owner.pop(ptr, None)
        phase = phase_at(when)
        if live > phases.get(phase, (0, 0))[0]:
            phases[phase] = (live, sum(size for size, unit in owner.values() if unit))
        if live > peak:
            peak, peak_time, peak_owner = live, when, dict(owner)
    at_peak: dict[str, int] = {}
    for size, unit in peak_owner.values():
        if unit:
            name = f"{unit[0]} ({unit[1]})"
            at_peak[name] = at_peak.get(name, 0) + size
    return {"dynamic": peak, "at_peak": at_peak, "phase": phase_at(peak_time), "phases": phases, "gloo": gloo,
            "unbalanced": live}


def _fsdp_unit(parents: tuple[str, ...]) -> tuple[str, str] | None:
    """(unit, "gathered") for an allocation FSDP made to hold a unit's gathered weights, (unit,
    "all-gather buffer") for the flat buffer its all-gather lands in, from the innermost FSDP op
    enclosing it; unit is the block's name, "root" for the rest. None for anything else
    (activations, gradients, temporaries)."""
    for name in reversed(parents):
        for label, kind in (("FSDP::all_gather_copy_out", "gathered"), ("FSDP::all_gather", "all-gather buffer")):
            if name.startswith(label):
                return name[len(label):].strip(" ()") or "root", kind
    return None


def print_sharded(results: list[ShardedResult]) -> None:
    mib = 2**20
    print(f"{'case':<46}{'rank':>5}{'predicted':>11}{'measured':>11}{'error':>8}   {'FSDP gathered: plan':>19}"
          f"{'at peak':>10}   {'step adds: sharded':>18}{'1 process':>11}{'difference':>12}")
    for r in results:
        single = "" if r.single_dynamic is None else f"{r.single_dynamic / mib:>9.1f}Mi{r.fsdp_extra / mib:>10.1f}Mi"
        print(f"{r.case.label():<46}{r.rank:>5}{r.predicted / mib:>9.1f}Mi{r.measured / mib:>9.1f}Mi"
              f"{100 * r.error:>+7.1f}%   {r.predicted_gathered / mib:>17.1f}Mi{r.gathered_at_peak / mib:>8.1f}Mi"
              f"   {r.measured_dynamic / mib:>16.1f}Mi{single}", flush=True)
        held = ", ".join(f"{unit} {size / mib:.1f}Mi" for unit, size in r.at_peak.items()) or "nothing"
        print(f"{'':<8}peak in {r.phase_at_peak}; FSDP held then: {held}; gloo scratch (left out) up to "
              f"{r.gloo_temporaries / mib:.1f}Mi", flush=True)
        phases = "; ".join(f"{name} {peak / mib:.1f}Mi (FSDP {fsdp / mib:.1f}Mi)"
                           for name, (peak, fsdp) in r.phases.items())
        print(f"{'':<8}step adds, by phase: {phases}; unbalanced {r.unbalanced / mib:.1f}Mi", flush=True)


def sharded_cases() -> list[Case]:
    """Sized for two processes on a 2-core machine: FLUX.1 without checkpointing (activations
    comparable to the gathered blocks) and FLUX.2 with it (gathered blocks dominate)."""
    return [
        Case(medium("FluxPipeline", 2, 2, heads=4), resolution=256, text_tokens=64),
        Case(medium("Flux2KleinPipeline", 2, 2, heads=4), resolution=256, text_tokens=64, checkpointing=True),
    ]


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
    mode.add_argument("--sharded", action="store_true",
                      help="train.sharding=fsdp over 2 CPU processes (gloo), per rank")
    mode.add_argument("--sharded-worker", nargs=2, metavar=("CASES_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sharded_worker:  # one rank of --sharded, started by check_sharded
        _sharded_worker(*args.sharded_worker)
        return
    torch.set_num_threads(1)  # small ops: thread hand-offs cost more than they save
    if args.sharded:
        print_sharded([r for ranks in check_sharded_cases(sharded_cases()) for r in ranks])
        return
    if args.calibrate:
        for pipeline, family in (("FluxPipeline", "flux1"), ("Flux2KleinPipeline", "flux2")):
            for precision, key in (("no", "fp32"), ("bf16", "bf16")):
                print(f"{family} {key} (in fluxtune.models.memory now: {ACTIVATIONS[(family, key)]})", flush=True)
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
