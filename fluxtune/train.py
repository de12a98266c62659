"""The training recipe, top to bottom: config -> family -> cache -> LoRA -> loop -> LoRA file.

    fluxtune train configs/tiny-demo.yaml train.max_steps=50
    accelerate launch -m fluxtune.cli train configs/flux1-dev.yaml    # several GPUs

This is the only module that sees the whole config; everything it calls takes plain arguments.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fluxtune.data.cache import CacheStats
from fluxtune.training.checkpoint import (
    CheckpointError,
    StopOnSignal,
    check_output_dir,
    load_state,
    optimizer_from_flat,
    optimizer_to_flat,
    read_meta,
    resolve_resume,
    restore_rng,
    rng_state,
    save_state,
)
from fluxtune.data.buckets import BucketBatchSampler
from fluxtune.config import Config
from fluxtune.errors import Preempted, UserError
from fluxtune.training.ema import LoraEMA
from fluxtune.training.evaluation import evaluation_loss
from fluxtune.lora.export import training_metadata
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import (
    WEIGHTS_NAME,
    add_file_metadata,
    add_lora,
    count_adapted,
    describe_base,
    resolve_targets,
    save_lora,
)
from fluxtune.training.objective import batch_loss, sample_generators
from fluxtune.models.offload import BlockSwap, blocks_to_swap, compile_blocks
from fluxtune.training.optim import lr_scheduler, make_optimizer, require_optimizer
from fluxtune.models.quantize import enable_input_grads, require_quantization
from fluxtune.data.loader import CachedDataset, cache_captions, make_loader, prepare_data, report_buckets
from fluxtune.training.sampling import TrainingSampler, image_grid
from fluxtune.models.sharding import average_gradients, refuse_accelerate_sharding, shard_base, use_sharding
from fluxtune.training.tracking import make_tracker

log = logging.getLogger("fluxtune")


class TrainingDiverged(UserError):
    """Too many NaN/Inf steps in a row; the last good state was checkpointed."""


@dataclass
class RunResult:
    lora_path: Path
    steps: int
    final_loss: float
    cache: CacheStats
    seconds: float
    transformer: torch.nn.Module = field(repr=False)  # the trained model, LoRA attached (for notebooks, tests)
    output_dir: Path = Path(".")
    run_id: str | None = None
    eval_loss: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"lora_path": str(self.lora_path), "steps": self.steps, "final_loss": self.final_loss,
                "eval": self.eval_loss, "run_id": self.run_id, "cache": asdict(self.cache),
                "seconds": round(self.seconds, 2)}


@dataclass
class _Run:
    """What the loop works with; built once by train()."""

    cfg: Config
    family: object
    accelerator: object
    transformer: torch.nn.Module
    params: list
    optimizer: object
    scheduler: object
    loader: object
    tracker: object
    out: Path
    weight_dtype: torch.dtype
    guidance: float | None
    order: BucketBatchSampler | None = None
    ema: LoraEMA | None = None
    sampler: TrainingSampler | None = None
    eval_set: CachedDataset | None = None
    resume_from: Path | None = None
    position: tuple[int, int] = (0, 0)  # (epoch, batches done in it): where the data order resumes
    dataset: dict = field(default_factory=dict)  # size and content hash, for the LoRA's header
    skipped_steps: int = 0
    sharded: bool = False  # train.sharding split the base over the processes (fluxtune/sharding.py)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)

    def autocast(self):
        """Mixed precision for a forward pass: accelerate put it inside a model it prepared; a
        sharded model it did not prepare gets it here."""
        return self.accelerator.autocast() if self.sharded else contextlib.nullcontext()


def train(cfg: Config) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    require_optimizer(cfg.optim.name)  # a missing optional package fails before anything is loaded
    require_quantization(cfg.model.quantize, cfg.model.quantize_text_encoders)  # and so does a missing GPU
    from fluxtune.plan import warn_if_too_big

    warn_if_too_big(cfg)  # on a GPU: say up front when the predicted peak memory exceeds it
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    # accelerate keeps its settings in a process-wide singleton; a second train() in the same
    # process (a notebook, a sweep) may ask for another precision. The distributed setup is kept
    # (one run per process under `accelerate launch`: the run's end closes its process group).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
    )
    refuse_accelerate_sharding(accelerator)
    if accelerator.is_main_process:
        check_output_dir(out)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    resume_from = resolve_resume(cfg.train.resume, out / "state")
    # First, so a missing tracking package fails before anything is loaded. A resumed run goes on
    # logging into its W&B run; a fresh one starts its own, even in an old output folder (W&B
    # drops steps below the last one it has).
    run_id = read_meta(resume_from).get("run_id") if resume_from else None
    tracker = _tracker(cfg, out, accelerator.is_main_process, run_id)
    set_seed(cfg.train.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    m = cfg.model
    family = load_family(
        m.path, m.family, m.revision, text_encoder_out_layers=m.text_encoder_out_layers,
        bypass_guidance=m.bypass_guidance, max_sequence_length=m.max_sequence_length, dtype=weight_dtype,
        quantize=m.quantize, quantize_text_encoders=m.quantize_text_encoders,
    )
    data = prepare_data(cfg.data, cfg.eval, family, accelerator)
    # Sample prompts are embedded now, while the encoders are loaded. Under sharding every process
    # takes part in each sampling forward pass, so each needs them.
    t, s = cfg.train, cfg.sample
    sampler = (TrainingSampler.encode(family, s.resolved_prompts(), accelerator.device, default_size=cfg.data.resolution,
                                      default_steps=s.steps, default_guidance=s.guidance)
               if s.every and (accelerator.is_main_process or t.sharding != "none") else None)
    loader, order = make_loader(data, repeats=cfg.data.repeats, resolution=cfg.data.resolution,
                                batch_size=t.batch_size, seed=t.seed, processes=accelerator.num_processes,
                                grad_accum=t.grad_accum, num_workers=cfg.data.num_workers)
    if data.caption_settings:
        cache_captions(family, data, loader, order, accelerator, seed=t.seed, batches=t.max_steps * t.grad_accum)
    family.free_encoders()  # every text the run will train with is in the cache by now

    # Seed again here: loading encoders (only when the cache is cold) may draw random numbers, and
    # the LoRA's initial weights must not depend on the cache.
    set_seed(cfg.train.seed)
    transformer, params, placement = _lora_model(cfg, family, weight_dtype, accelerator)
    optimizer = make_optimizer(params, cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                               **cfg.optim.own_settings())
    if data.sizes and accelerator.is_main_process:
        report_buckets(order.summary(), out)
    if placement == "sharded":  # already split and placed; accelerate must not wrap it for data parallel
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:  # swapped blocks keep their weights on the CPU: accelerate must not move the model
        transformer, optimizer, loader = accelerator.prepare(
            transformer, optimizer, loader, device_placement=[False if placement == "swapped" else None, None, None])
    scheduler = lr_scheduler(optimizer, cfg.optim.scheduler, warmup_steps=cfg.optim.warmup_steps, max_steps=t.max_steps)
    run = _Run(
        cfg, family, accelerator, transformer, params, optimizer, scheduler, loader, tracker, out, weight_dtype,
        cfg.train.guidance if cfg.train.guidance is not None else family.default_guidance,
        order=order, resume_from=resume_from,
        ema=LoraEMA(params, cfg.train.ema_decay) if cfg.train.ema_decay else None, sampler=sampler,
        eval_set=CachedDataset(data.eval_entries) if data.eval_entries else None, dataset=data.identity,
        sharded=placement == "sharded",
    )

    final_loss, eval_loss = _loop(run)

    lora_path = out / "lora" / WEIGHTS_NAME
    if run.main:
        _save_state(run, cfg.train.max_steps)  # lets a later run extend train.max_steps
        _save(run, out / "lora", cfg.train.max_steps)
    accelerator.wait_for_everyone()
    run.tracker.finish()
    accelerator.end_training()
    result = RunResult(lora_path, cfg.train.max_steps, final_loss, data.stats, time.perf_counter() - started,
                       run.model, out, run.tracker.run_id, eval_loss)
    if run.main:
        # what was resolved from the checkpoint (e.g. FLUX.2 text layers): inference must use the same
        model_info = {k: v for k, v in family.identity("text").items() if k != "weights"}
        summary = {**result.summary(), "model": model_info}
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result


def _lora_model(cfg: Config, family, weight_dtype: torch.dtype, accelerator):
    """The transformer with its LoRA on the accelerator's device, except the frozen weights of
    swapped blocks (train.blocks_to_swap) and those of other processes' shards (train.sharding).
    Returns (transformer, LoRA parameters, placement: "whole", "swapped" or "sharded")."""
    transformer = family.load_transformer(weight_dtype)
    swap = blocks_to_swap(cfg.train.blocks_to_swap, transformer, accelerator.device, accelerator.num_processes)
    shard = use_sharding(cfg.train.sharding, accelerator.num_processes)
    if not (swap or shard):  # swap and sharding place the weights themselves: the whole model may not fit
        transformer = transformer.to(accelerator.device)
    params = add_lora(
        transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
        targets=resolve_targets(family, cfg.lora.targets),
    )
    adapted = count_adapted(transformer)
    log.info("LoRA on %d double-block and %d single-block modules, %.2fM parameters",
             adapted["double"], adapted["single"], sum(p.numel() for p in params) / 1e6)
    if swap:
        BlockSwap(transformer, swap, offload=torch.device("cpu"), compute=accelerator.device)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if cfg.model.quantize != "none":
            enable_input_grads(transformer)
    if cfg.train.compile:
        compile_blocks(transformer)
    if shard:
        shard_base(transformer, params, accelerator.device)
    transformer.train()
    return transformer, params, "sharded" if shard else "swapped" if swap else "whole"


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def _tracker(cfg: Config, out: Path, main: bool, run_id: str | None):
    lg = cfg.log
    return make_tracker(lg.backend, project=lg.project, run_name=lg.run_name, tags=list(lg.tags),
                        config=cfg.to_dict(), output_dir=out, resume_id=run_id, enabled=main)


def _batches(loader, order: BucketBatchSampler, epoch: int, done: int):
    """Endless (epoch, batches done in that epoch, batch), starting after `done` batches of `epoch`."""
    while True:
        # accelerate's loader sets its sampler's epoch from its own counter on every pass: set
        # that counter (it passes the epoch on), or a resumed run would replay epoch 0's order.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        order.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)  # accelerate passes the epoch to the sampler only
        for i, batch in enumerate(loader):
            if i >= done:
                yield epoch, i + 1, batch
        epoch, done = epoch + 1, 0


def _loop(run: _Run) -> tuple[float, dict]:
    cfg, t, acc = run.cfg, run.cfg.train, run.accelerator
    sigma_sampling = {"mode": t.sigma.sampling, "logit_mean": t.sigma.logit_mean,
                      "logit_std": t.sigma.logit_std, "shift": t.sigma.shift}
    start = _resume(run, run.resume_from) if run.resume_from else None
    first_step = 1 if start is None else start["step"] + 1
    position = (0, 0) if start is None else tuple(start["data"])
    batches = _batches(run.loader, run.order, *position)
    bar = tqdm(total=t.max_steps, initial=first_step - 1, desc="training", unit="step", disable=not run.main)
    metrics = _metrics_file(run.out, first_step - 1) if run.main else None
    window: list[dict] = []
    loss_avg, eval_loss, bad_in_a_row = math.nan, {}, 0
    if cfg.sample.every and cfg.sample.before_training and start is None:
        _sample(run, 0)
    with StopOnSignal() as stop:
        for step in range(first_step, t.max_steps + 1):
            tick, losses, bad = time.perf_counter(), [], False
            for _ in range(t.grad_accum):
                epoch, done, batch = next(batches)
                with acc.accumulate(run.transformer), run.autocast():
                    gens = sample_generators(t.seed, epoch, batch)
                    loss = batch_loss(run.family, run.transformer, batch, generator=gens, device=acc.device,
                                      sigma_sampling=sigma_sampling, guidance=run.guidance)
                    losses.append(loss.detach().item())  # the one host sync for the loss
                    bad = bad or not math.isfinite(losses[-1])
                    # With several processes every one must join backward (its collectives would wait
                    # forever otherwise); a NaN there reaches every rank's gradients, so all skip the step.
                    if not bad or acc.num_processes > 1:
                        acc.backward(loss)
                    if acc.sync_gradients:
                        if run.sharded:  # the LoRA is outside what accelerate wrapped: average it here
                            average_gradients(run.params)
                        grad_norm = float(acc.clip_grad_norm_(run.params, cfg.optim.max_grad_norm or math.inf))
                        bad = bad or not math.isfinite(grad_norm)
                        if not bad:
                            run.optimizer.step()
                        run.optimizer.zero_grad(set_to_none=True)
            run.position = (epoch, done) if done < len(run.loader) else (epoch + 1, 0)
            run.scheduler.step()
            if run.ema and not bad:
                run.ema.update()
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            run.skipped_steps += bad
            loss_avg = sum(losses) / len(losses)
            if acc.num_processes > 1:  # the loss over the whole global batch, as one process logs it
                loss_avg = float(acc.reduce(torch.tensor(loss_avg, device=acc.device), "mean"))
            row = {"step": step, "loss": loss_avg, "lr": run.scheduler.get_last_lr()[0], "epoch": epoch,
                   "grad_norm": grad_norm, "step_s": time.perf_counter() - tick,
                   "skipped_steps": run.skipped_steps}
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{row['lr']:.2e}")
            window.append(row)
            eval_loss = _after_step(run, step, window, metrics) or eval_loss
            signal_name = _stop_requested(acc, stop.requested)
            if bad_in_a_row >= t.max_bad_steps or signal_name:
                _save_state(run, step)
                _stop(run, step, bad_in_a_row, signal_name)
    bar.close()
    if metrics:
        metrics.close()
    return loss_avg, eval_loss


def _stop_requested(acc, requested: str | None) -> str | None:
    """The signal name when this or any other process was asked to stop. Processes get a signal at
    slightly different moments; all must stop after the same step, or the ones going on would wait
    forever for the others, and the main one must write the checkpoint."""
    if acc.num_processes == 1:
        return requested
    import torch.distributed as dist

    flag = torch.tensor([1 if requested else 0], device=acc.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return requested or ("a signal to another process" if flag.item() else None)


def _stop(run: _Run, step: int, bad_in_a_row: int, signal_name: str | None):
    where = f"{run.out / 'state'} (step {step})"
    if signal_name:
        raise Preempted(f"stopped on {signal_name}; checkpoint {where}. Resume with train.resume=latest")
    raise TrainingDiverged(
        f"loss or gradients were NaN/Inf for {bad_in_a_row} steps in a row; stopped with the last good "
        f"weights in {where}. Try a lower optim.lr, optim.max_grad_norm (e.g. 1.0), mixed_precision bf16 "
        "instead of fp16, or check the dataset for broken images"
    )


def _metrics_file(out: Path, last_step: int):
    """Append to metrics.jsonl, first dropping rows a killed run wrote after the checkpoint resumed from."""
    path = out / "metrics.jsonl"
    if last_step and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return path.open("a" if last_step else "w", encoding="utf-8")


def _save_state(run: _Run, step: int) -> None:
    """Everything a resumed run needs to continue bit for bit (main process writes it)."""
    if not run.main:
        return
    tensors = {f"lora.{n}": p for n, p in run.model.named_parameters() if "lora_" in n}
    optim_tensors, optim_meta = optimizer_to_flat(run.optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    tensors |= optim_tensors | rng_tensors
    if run.ema:
        tensors |= {f"ema.{i}": s for i, s in enumerate(run.ema.shadow)}
    meta = {"data": list(run.position), "optimizer": optim_meta, "scheduler": run.scheduler.state_dict(),
            "rng": rng_meta, "run_id": run.tracker.run_id, "skipped_steps": run.skipped_steps,
            "optimizer_name": run.cfg.optim.name}
    save_state(run.out / "state", step, tensors, meta, keep=run.cfg.train.keep_checkpoints)


def _resume(run: _Run, folder: Path) -> dict:
    tensors, meta = load_state(folder)
    params = dict(run.model.named_parameters())
    expected = {f"lora.{n}" for n in params if "lora_" in n}
    found = {k for k in tensors if k.startswith("lora.")}
    if found != expected or any(tensors[k].shape != params[k[5:]].shape for k in found):
        raise CheckpointError(f"checkpoint {folder} was written for another model or LoRA shape "
                              "(model.path, lora.rank, lora.targets must match the run that wrote it)")
    saved_optimizer = meta.get("optimizer_name", "adamw")  # checkpoints before the choice were AdamW
    if saved_optimizer != run.cfg.optim.name:
        raise CheckpointError(f"checkpoint {folder} holds {saved_optimizer} optimizer state, but optim.name is "
                              f"{run.cfg.optim.name}; resume with optim.name={saved_optimizer}, or start a new "
                              "output_dir (or train.resume=null) to change optimizer")
    with torch.no_grad():
        for key in found:
            params[key[5:]].copy_(tensors[key])
    run.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
    run.scheduler.load_state_dict(meta["scheduler"])
    if run.ema:
        for i, shadow in enumerate(run.ema.shadow):
            shadow.copy_(tensors[f"ema.{i}"])
    restore_rng(tensors, meta["rng"])
    run.skipped_steps = meta.get("skipped_steps", 0)
    log.info("resumed from %s (step %d)", folder, meta["step"])
    return meta


def _after_step(run: _Run, step: int, window: list[dict], metrics) -> dict | None:
    """Log, evaluate, sample and save as the config asks; returns the evaluation loss if computed."""
    cfg, last = run.cfg, step == run.cfg.train.max_steps
    row = window[-1]
    if metrics:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    if step % cfg.log.every == 0 or last:
        seconds = sum(r["step_s"] for r in window)
        images = len(window) * cfg.train.batch_size * cfg.train.grad_accum * run.accelerator.num_processes
        run.tracker.log({"loss": sum(r["loss"] for r in window) / len(window), "lr": row["lr"],
                         "grad_norm": row["grad_norm"] or 0.0, "step_s": seconds / len(window),
                         "images_per_s": images / seconds, "peak_memory_gib": _peak_memory_gib(),
                         "epoch": row["epoch"]}, step)
        window.clear()
    eval_loss = None
    if run.eval_set is not None and cfg.eval.every and (step % cfg.eval.every == 0 or last):
        with run.autocast():
            eval_loss = evaluation_loss(run.family, run.transformer, run.eval_set, sigmas=cfg.eval.sigmas,
                                        seed=cfg.eval.seed, guidance=run.guidance, device=run.accelerator.device)
        run.tracker.log(eval_loss, step)
        if metrics:
            metrics.write(json.dumps({"step": step, **eval_loss}) + "\n")
    if cfg.sample.every and (step % cfg.sample.every == 0 or last):
        _sample(run, step)
    if step % cfg.train.save_every == 0 and not last and run.main:
        _save(run, run.out / "checkpoints" / f"step-{step:06d}", step)
        _save_state(run, step)
    return eval_loss


def _sample(run: _Run, step: int) -> None:
    """The main process renders and writes; under sharding every process renders (each forward
    needs all of them) and the others drop their copy."""
    if run.sampler is None or not (run.main or run.sharded):
        return
    with run.ema.applied() if run.ema else contextlib.nullcontext():
        with run.accelerator.autocast():
            results = run.sampler.render(run.model, run.weight_dtype, run.accelerator.device)
    if not run.main:
        return
    folder = run.out / "samples"
    folder.mkdir(exist_ok=True)
    images, captions = [r[0] for r in results], [r[1] for r in results]
    image_grid(images).save(folder / f"step-{step:06d}.png")
    run.tracker.log_images("samples", images, captions, step)


def _save(run: _Run, folder: Path, step: int) -> None:
    """The LoRA (and its EMA twin), stamped with the run id and step so a file traces back to its run."""
    stamp = {"fluxtune.step": str(step), "fluxtune.run_id": run.tracker.run_id or "",
             **describe_base(run.model, run.cfg.model.path), **_training_metadata(run, step)}
    targets = [(folder, contextlib.nullcontext())]
    if run.ema:
        targets.append((folder.with_name(folder.name + "_ema"), run.ema.applied()))
    for target, weights in targets:
        with weights:
            save_lora(run.family.pipeline_cls, run.model, target)
        add_file_metadata(target / WEIGHTS_NAME, stamp)
        if run.cfg.log.artifacts:
            run.tracker.log_artifact(target, name=f"{run.out.name}-{target.name}", metadata=stamp)


def _training_metadata(run: _Run, step: int) -> dict[str, str]:
    cfg = run.cfg
    summary = {
        "steps": step, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank, "targets": cfg.lora.targets,
        "dataset": run.dataset, "optimizer": {"name": cfg.optim.name, "lr": cfg.optim.lr},
        "batch_size": cfg.train.batch_size * cfg.train.grad_accum * run.accelerator.num_processes,
        "resolution": cfg.data.resolution, "seed": cfg.train.seed, "precision": run.accelerator.mixed_precision,
    }
    return training_metadata(family=run.family.name, transformer_config=run.model.config,
                             title=cfg.log.run_name or run.out.name, resolution=cfg.data.resolution,
                             base_model=cfg.model.path, summary=summary)


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
