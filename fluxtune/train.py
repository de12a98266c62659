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

from fluxtune.cache import CacheStats, build_cache, default_cache_dir
from fluxtune.config import Config
from fluxtune.data import CachedDataset, DataError, collate, scan_image_folder, split_holdout
from fluxtune.ema import LoraEMA
from fluxtune.evaluation import evaluation_loss
from fluxtune.families import load_family
from fluxtune.lora import WEIGHTS_NAME, add_file_metadata, add_lora, count_adapted, resolve_targets, save_lora
from fluxtune.objective import batch_loss
from fluxtune.sampling import TrainingSampler, image_grid
from fluxtune.tracking import make_tracker

log = logging.getLogger("fluxtune")


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
    ema: LoraEMA | None = None
    sampler: TrainingSampler | None = None
    eval_set: CachedDataset | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)


def train(cfg: Config) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    # accelerate keeps its settings in a process-wide singleton; a second train() in the same
    # process (a notebook, a sweep) may ask for another precision. The distributed setup is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    # First, so a missing tracking package fails before anything is loaded.
    tracker = _tracker(cfg, out, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    m = cfg.model
    family = load_family(
        m.path, m.family, m.revision, text_encoder_out_layers=m.text_encoder_out_layers,
        bypass_guidance=m.bypass_guidance, max_sequence_length=m.max_sequence_length, dtype=weight_dtype,
    )
    train_entries, eval_entries, cache_stats, sampler = _prepare_data(cfg, family, accelerator)

    transformer = family.load_transformer(weight_dtype).to(accelerator.device)
    params = add_lora(
        transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
        targets=resolve_targets(family, cfg.lora.targets),
    )
    adapted = count_adapted(transformer)
    log.info("LoRA on %d double-block and %d single-block modules, %.2fM parameters",
             adapted["double"], adapted["single"], sum(p.numel() for p in params) / 1e6)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    dataset = CachedDataset(train_entries, repeats=cfg.data.repeats)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
        num_workers=cfg.data.num_workers, drop_last=len(dataset) >= cfg.train.batch_size,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    run = _Run(
        cfg, family, accelerator, transformer, params, optimizer, _lr_scheduler(cfg, optimizer), loader,
        tracker, out, weight_dtype,
        cfg.train.guidance if cfg.train.guidance is not None else family.default_guidance,
        ema=LoraEMA(params, cfg.train.ema_decay) if cfg.train.ema_decay else None, sampler=sampler,
        eval_set=CachedDataset(eval_entries) if eval_entries else None,
    )

    final_loss, eval_loss = _loop(run)

    lora_path = out / "lora" / WEIGHTS_NAME
    if run.main:
        _save(run, out / "lora", cfg.train.max_steps)
    accelerator.wait_for_everyone()
    run.tracker.finish()
    accelerator.end_training()
    result = RunResult(lora_path, cfg.train.max_steps, final_loss, cache_stats, time.perf_counter() - started,
                       run.model, out, run.tracker.run_id, eval_loss)
    if run.main:
        # what was resolved from the checkpoint (e.g. FLUX.2 text layers): inference must use the same
        model_info = {k: v for k, v in family.identity().items() if k != "weights"}
        summary = {**result.summary(), "model": model_info}
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def _prepare_data(cfg: Config, family, accelerator):
    """Encode latents and captions once (main process first; the others then read the cache), and
    the sample prompts while the text encoders are loaded; then free the encoders."""
    items = scan_image_folder(cfg.data.path, cfg.data.default_caption, cfg.data.caption_extension)
    if cfg.eval.path:
        held_out = scan_image_folder(cfg.eval.path, cfg.data.default_caption, cfg.data.caption_extension)
    else:
        items, held_out = split_holdout(items, cfg.eval.fraction)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    with accelerator.main_process_first():
        entries, stats = build_cache(family, items + held_out, cache_dir, cfg.data.resolution, accelerator.device)
    sampler = None
    if cfg.sample.every and accelerator.is_main_process:
        prompts = cfg.sample.resolved_prompts()
        *embeds, negative = family.encode_prompts([p.prompt for p in prompts] + [""], accelerator.device)
        sampler = TrainingSampler(family, prompts, embeds, negative, default_size=cfg.data.resolution,
                                  default_steps=cfg.sample.steps, default_guidance=cfg.sample.guidance)
    family.free_encoders()
    train_entries = [entries[i] for i in items if i in entries]
    eval_entries = [entries[i] for i in held_out if i in entries]
    if not train_entries:
        raise DataError(f"data.path {cfg.data.path}: none of the {len(items)} images could be read (see warnings above)")
    log.info("dataset: %d training and %d held-out images (%d skipped); cache %s: %d latents and %d captions "
             "encoded, %d reused", len(train_entries), len(eval_entries), stats.skipped, cache_dir,
             stats.latents_encoded, stats.texts_encoded, stats.reused)
    return train_entries, eval_entries, stats, sampler


def _tracker(cfg: Config, out: Path, main: bool):
    # A fresh run starts a fresh W&B run even in an old output folder (W&B drops steps below the
    # last one logged); only a run resumed from a training checkpoint may continue the old run id.
    lg = cfg.log
    return make_tracker(lg.backend, project=lg.project, run_name=lg.run_name, tags=list(lg.tags),
                        config=cfg.to_dict(), output_dir=out, resume_id=None, enabled=main)


def _lr_scheduler(cfg: Config, optimizer):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.optim.scheduler == "constant" else cfg.optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.max_steps)


def _batches(loader):
    """Endless (epoch, batch) over epochs (the sampler reshuffles each epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def _loop(run: _Run) -> tuple[float, dict]:
    cfg, t, acc = run.cfg, run.cfg.train, run.accelerator
    # Noise and sigmas come from our own generator on CPU: the same seed gives the same run on any
    # device, and each rank draws different noise.
    gen = torch.Generator().manual_seed(t.seed * 1009 + acc.process_index)
    sigma_sampling = {"mode": t.sigma.sampling, "logit_mean": t.sigma.logit_mean,
                      "logit_std": t.sigma.logit_std, "shift": t.sigma.shift}
    batches = _batches(run.loader)
    bar = tqdm(total=t.max_steps, desc="training", unit="step", disable=not run.main)
    metrics = (run.out / "metrics.jsonl").open("a", encoding="utf-8") if run.main else None
    window: list[dict] = []
    loss_avg, eval_loss = math.nan, {}
    if cfg.sample.every and cfg.sample.before_training:
        _sample(run, 0)
    for step in range(1, t.max_steps + 1):
        tick, losses = time.perf_counter(), []
        for _ in range(t.grad_accum):
            epoch, batch = next(batches)
            with acc.accumulate(run.transformer):
                loss = batch_loss(run.family, run.transformer, batch, generator=gen, sigma_sampling=sigma_sampling,
                                  guidance=run.guidance, device=acc.device)
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.optim.max_grad_norm:
                    grad_norm = acc.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
        run.scheduler.step()
        if run.ema:
            run.ema.update()
        loss_avg = sum(losses) / len(losses)
        row = {"step": step, "loss": loss_avg, "lr": run.scheduler.get_last_lr()[0], "epoch": epoch,
               "grad_norm": None if grad_norm is None else float(grad_norm), "step_s": time.perf_counter() - tick}
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{row['lr']:.2e}")
        window.append(row)
        eval_loss = _after_step(run, step, window, metrics) or eval_loss
    bar.close()
    if metrics:
        metrics.close()
    return loss_avg, eval_loss


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
        eval_loss = evaluation_loss(run.family, run.transformer, run.eval_set, sigmas=cfg.eval.sigmas,
                                    seed=cfg.eval.seed, guidance=run.guidance, device=run.accelerator.device)
        run.tracker.log(eval_loss, step)
        if metrics:
            metrics.write(json.dumps({"step": step, **eval_loss}) + "\n")
    if cfg.sample.every and (step % cfg.sample.every == 0 or last):
        _sample(run, step)
    if step % cfg.train.save_every == 0 and not last and run.main:
        _save(run, run.out / "checkpoints" / f"step-{step:06d}", step)
    return eval_loss


def _sample(run: _Run, step: int) -> None:
    if not run.main or run.sampler is None:
        return
    with run.ema.applied() if run.ema else contextlib.nullcontext():
        with run.accelerator.autocast():
            results = run.sampler.render(run.model, run.weight_dtype, run.accelerator.device)
    folder = run.out / "samples"
    folder.mkdir(exist_ok=True)
    images, captions = [r[0] for r in results], [r[1] for r in results]
    image_grid(images).save(folder / f"step-{step:06d}.png")
    run.tracker.log_images("samples", images, captions, step)


def _save(run: _Run, folder: Path, step: int) -> None:
    """The LoRA (and its EMA twin), stamped with the run id and step so a file traces back to its run."""
    stamp = {"fluxtune.step": str(step), "fluxtune.run_id": run.tracker.run_id or ""}
    targets = [(folder, contextlib.nullcontext())]
    if run.ema:
        targets.append((folder.with_name(folder.name + "_ema"), run.ema.applied()))
    for target, weights in targets:
        with weights:
            save_lora(run.family.pipeline_cls, run.model, target)
        add_file_metadata(target / WEIGHTS_NAME, stamp)
        if run.cfg.log.artifacts:
            run.tracker.log_artifact(target, name=f"{run.out.name}-{target.name}", metadata=stamp)


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
