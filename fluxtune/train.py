"""The training recipe, top to bottom: config -> family -> cache -> LoRA -> loop -> LoRA file.

    fluxtune train configs/tiny-demo.yaml train.max_steps=50
    accelerate launch -m fluxtune.cli train configs/flux1-dev.yaml    # several GPUs

This is the only module that sees the whole config; everything it calls takes plain arguments.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fluxtune import flow
from fluxtune.cache import CacheStats, build_cache, default_cache_dir
from fluxtune.config import Config
from fluxtune.data import CachedDataset, DataError, collate, scan_image_folder
from fluxtune.families import load_family
from fluxtune.lora import WEIGHTS_NAME, add_lora, count_adapted, resolve_targets, save_lora

log = logging.getLogger("fluxtune")


@dataclass
class RunResult:
    lora_path: Path
    steps: int
    final_loss: float
    cache: CacheStats
    seconds: float
    transformer: torch.nn.Module = field(repr=False)  # the trained model, LoRA attached (for notebooks, tests)

    def summary(self) -> dict:
        return {"lora_path": str(self.lora_path), "steps": self.steps, "final_loss": self.final_loss,
                "cache": asdict(self.cache), "seconds": round(self.seconds, 2)}


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
    set_seed(cfg.train.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    m = cfg.model
    family = load_family(
        m.path, m.family, m.revision, text_encoder_out_layers=m.text_encoder_out_layers,
        bypass_guidance=m.bypass_guidance, max_sequence_length=m.max_sequence_length, dtype=weight_dtype,
    )
    entries, cache_stats = _cache_dataset(cfg, family, accelerator)

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
    scheduler = _lr_scheduler(cfg, optimizer)
    loader = torch.utils.data.DataLoader(
        CachedDataset(entries, repeats=cfg.data.repeats), batch_size=cfg.train.batch_size, shuffle=True,
        collate_fn=collate, num_workers=cfg.data.num_workers, drop_last=len(entries) * cfg.data.repeats >= cfg.train.batch_size,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)

    final_loss = _loop(cfg, family, accelerator, transformer, optimizer, scheduler, loader, params, out)

    lora_path = out / "lora" / WEIGHTS_NAME
    if accelerator.is_main_process:
        save_lora(family.pipeline_cls, accelerator.unwrap_model(transformer), out / "lora")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = RunResult(lora_path, cfg.train.max_steps, final_loss, cache_stats, time.perf_counter() - started,
                       accelerator.unwrap_model(transformer))
    if accelerator.is_main_process:
        # what was resolved from the checkpoint (e.g. FLUX.2 text layers): inference must use the same
        model_info = {k: v for k, v in family.identity().items() if k != "weights"}
        summary = {**result.summary(), "model": model_info}
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def _cache_dataset(cfg: Config, family, accelerator):
    """Encode latents and captions once (main process first; the others then read the cache)."""
    items = scan_image_folder(cfg.data.path, cfg.data.default_caption, cfg.data.caption_extension)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    with accelerator.main_process_first():
        entries, stats = build_cache(family, items, cache_dir, cfg.data.resolution, accelerator.device)
    family.free_encoders()
    if not entries:
        raise DataError(f"data.path {cfg.data.path}: none of the {len(items)} images could be read (see warnings above)")
    log.info("dataset: %d images (%d skipped); cache %s: %d latents and %d captions encoded, %d reused",
             len(entries), stats.skipped, cache_dir, stats.latents_encoded, stats.texts_encoded, stats.reused)
    return entries, stats


def _lr_scheduler(cfg: Config, optimizer):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.optim.scheduler == "constant" else cfg.optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.max_steps)


def _batches(loader):
    """Endless iteration over epochs (the sampler reshuffles each epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loop(cfg, family, accelerator, transformer, optimizer, scheduler, loader, params, out) -> float:
    t = cfg.train
    guidance = t.guidance if t.guidance is not None else family.default_guidance
    # Noise and sigmas come from our own generator on CPU: the same seed gives the same run on any
    # device, and each rank draws different noise.
    gen = torch.Generator().manual_seed(t.seed * 1009 + accelerator.process_index)
    batches = _batches(loader)
    bar = tqdm(total=t.max_steps, desc="training", unit="step", disable=not accelerator.is_main_process)
    metrics = (out / "metrics.jsonl").open("a", encoding="utf-8") if accelerator.is_main_process else None
    loss_avg = math.nan
    for step in range(1, t.max_steps + 1):
        tick, losses = time.perf_counter(), []
        for _ in range(t.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(transformer):
                loss = _loss(cfg, family, transformer, batch, gen, guidance, accelerator.device)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
        scheduler.step()
        loss_avg = sum(losses) / len(losses)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if metrics:
            row = {"step": step, "loss": loss_avg, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm), "step_s": time.perf_counter() - tick}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if step % t.save_every == 0 and step < t.max_steps and accelerator.is_main_process:
            save_lora(family.pipeline_cls, accelerator.unwrap_model(transformer), out / "checkpoints" / f"step-{step:06d}")
    bar.close()
    if metrics:
        metrics.close()
    return loss_avg


def _loss(cfg, family, transformer, batch, gen, guidance, device) -> torch.Tensor:
    s = cfg.train.sigma
    latents = batch["latents"].to(device)
    text = {k: v.to(device) for k, v in batch["text"].items()}
    x0 = family.pack(latents)
    noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
    sigmas = flow.sample_sigmas(
        x0.shape[0], mode=s.sampling, generator=gen, logit_mean=s.logit_mean, logit_std=s.logit_std,
        shift=s.shift, num_tokens=x0.shape[1],
    ).to(device)
    noisy = flow.add_noise(x0, noise, sigmas)
    pred = family.predict(transformer, latents, noisy, sigmas, text, guidance)
    return flow.flow_loss(pred, flow.velocity_target(x0, noise))
